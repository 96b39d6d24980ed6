"""The sweep driver's services, each on its own (no Ray): the MLflow run's lifecycle and the figures
the parent run carries, against a real MLflow store (SQLite); the record file; the signal guard."""
import contextlib
import json
import math
import os
import signal

import pandas as pd
import pytest

from orchestration.lifecycle import (SWEEP_FILE, Interrupted, Outcome, SignalGuard, driver_identity, driver_state,
                                     read_record, refuse_live_driver, settle_dead_driver, sweep_record)
from orchestration.targets import parse_targets
from orchestration.tracking import MLflowSweep, log_sweep_summary, sweep_tracking


@pytest.fixture
def tracker(tmp_path):
    return MLflowSweep(f"sqlite:///{tmp_path / 'mlflow.db'}", "sfd-sweep", artifact_root=(tmp_path / "art").as_uri())


TARGET = parse_targets(["digits:3"], "next")[0]


def _sweep(tracker, outcome, resume_id=None):
    return sweep_tracking(tracker, outcome, "sweep-test", {"trials_per_target": 2}, {"sweep_id": "abc"}, resume_id)


@pytest.mark.parametrize("ending, parent_status, parent_tag, target_tag", [
    (None, "FINISHED", "finished", "failed"),            # the body finished; a target still open was cut off
    (Interrupted("SIGTERM"), "KILLED", "interrupted", "interrupted"),
    (ValueError("bad stage 1"), "FAILED", "failed", "failed"),
])
def test_the_sweeps_mlflow_run_ends_as_the_sweep_did(tracker, ending, parent_status, parent_tag, target_tag):
    outcome = Outcome()
    with pytest.raises(type(ending)) if ending else contextlib.nullcontext():
        with _sweep(tracker, outcome):
            trial = tracker.start_trial("t1", TARGET, True, {"alpha": 1.2})   # left RUNNING: cut off
            if ending:
                raise ending
            outcome.status = "finished"
    target = tracker.target_runs[TARGET.name]
    runs = {r.info.run_id: r for r in tracker.client.search_runs([tracker.experiment_id])}
    parent = runs[tracker.parent_id]
    assert (parent.info.status, parent.data.tags["status"]) == (parent_status, parent_tag)
    # no run of the sweep is left RUNNING: the cut-off trial KILLED, its target as the sweep ended
    assert (runs[trial].info.status, runs[trial].data.tags["status"]) == ("KILLED", "cut_off")
    assert runs[target].data.tags["status"] == target_tag and runs[target].info.status != "RUNNING"
    assert parent.data.params == {"trials_per_target": "2"} and parent.data.tags["sweep_id"] == "abc"


def test_a_resumed_sweep_reopens_its_run_and_kills_what_the_dead_driver_left_running(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = MLflowSweep(uri, "sfd-sweep")
    _sweep(first, Outcome()).__enter__()                 # the driver dies mid-trial: nothing ends the runs
    trial = first.start_trial("t1", TARGET, True, {})
    again = MLflowSweep(uri, "sfd-sweep")
    with _sweep(again, Outcome(), resume_id=first.parent_id):
        assert again.parent_id == first.parent_id and again.trial_runs == {"t1": trial}
        assert again.client.get_run(first.parent_id).info.status == "RUNNING"
        assert again.client.get_run(trial).info.status == "KILLED"
    lines = [x for x in capsys.readouterr().out.splitlines() if "marked KILLED" in x]
    assert lines == ["[sweep] --resume: 2 MLflow runs the killed driver left RUNNING marked KILLED (1 target, 1 trial)"]
    assert len(again.client.search_runs([again.experiment_id], "tags.kind = 'sweep'")) == 1   # no second parent


def _summary(**fresh):
    df = pd.DataFrame([
        {"target": "digits:3->4", "state": "done", "best_trial": "a", "best_is_baseline": True, "ua": 0.995,
         "fd_ratio": 1.4, "override_fd_ratio": 2.0, "remaining_accuracy": 0.97, "baseline_fd_ratio": 1.4},
        {"target": "digits:5->6", "state": "done", "best_trial": "b", "best_is_baseline": False, "ua": 1.0,
         "fd_ratio": 1.2, "override_fd_ratio": 4.0, "remaining_accuracy": 0.98, "baseline_fd_ratio": 1.9},
        # no trial reached the UA threshold: it counts as a target, not in the best trials' figures
        {"target": "digits:7->8", "state": "done", "best_trial": "", "best_is_baseline": False, "ua": math.nan,
         "fd_ratio": math.nan, "override_fd_ratio": math.nan, "remaining_accuracy": math.nan,
         "baseline_fd_ratio": 1.1}])
    for k, v in fresh.items():
        df[k] = v
    return df


def test_the_parent_run_carries_the_figures_people_compare(tracker, tmp_path):
    tracker.start_parent("sweep-test", {}, {})
    (tmp_path / "summary.md").write_text("# SFD sweep summary\n\n| target | ... |\n")
    df = _summary(ua_fresh=[0.99, 0.98, math.nan], fd_ratio_fresh=[1.5, 1.3, math.nan],
                  override_fd_ratio_fresh=[2.5, 3.5, math.nan], search_improved=[False, True, False])
    log_sweep_summary(tracker, df, 6, tmp_path)
    run = tracker.client.get_run(tracker.parent_id)
    m = run.data.metrics
    assert m["targets"] == 3 and m["targets_with_best"] == 2 and m["trials"] == 6
    assert m["median_best_fd_ratio"] == pytest.approx(1.3)
    assert m["worst_best_fd_ratio"] == 1.4 and m["min_best_ua"] == 0.995          # the target without a best:
    assert m["median_best_override_fd_ratio"] == pytest.approx(3.0)               # not a NaN, not its baseline
    assert m["worst_best_fd_ratio_fresh"] == 1.5 and m["min_best_ua_fresh"] == 0.98
    assert m["median_best_fd_ratio_fresh"] == pytest.approx(1.4) and m["targets_search_improved"] == 1
    assert run.data.tags["mlflow.note.content"].startswith("# SFD sweep summary")  # the run's description
    assert json.loads(run.data.tags["mlflow.loggedArtifacts"]) == [{"path": "summary_table.json", "type": "table"}]
    got = tracker.client.download_artifacts(tracker.parent_id, "summary_table.json", str(tmp_path / "dl"))
    table = pd.read_json(got, orient="split")
    assert table["target"].tolist() == ["digits:3->4", "digits:5->6", "digits:7->8"]
    assert table["fd_ratio_fresh"].tolist()[:2] == [1.5, 1.3] and pd.isna(table["fd_ratio"].iloc[2])
    assert "summary.md" in {a.path for a in tracker.client.list_artifacts(tracker.parent_id)}
    # a resumed sweep logs its summary again: the table is replaced, not appended to (log_table would)
    log_sweep_summary(tracker, df, 6, tmp_path)
    again = tracker.client.download_artifacts(tracker.parent_id, "summary_table.json", str(tmp_path / "dl2"))
    assert len(pd.read_json(again, orient="split")) == 3
    assert len(json.loads(tracker.client.get_run(tracker.parent_id).data.tags["mlflow.loggedArtifacts"])) == 1


def test_an_interrupted_sweeps_parent_has_no_fresh_figures(tracker, tmp_path):
    """Negative control: without fresh re-evaluation (an interrupted sweep) no *_fresh metric is
    logged, and with no best trial at all no worst/min figure is invented."""
    tracker.start_parent("sweep-test", {}, {})
    log_sweep_summary(tracker, _summary(), 6, tmp_path)
    assert not [k for k in tracker.client.get_run(tracker.parent_id).data.metrics if k.endswith("_fresh")]
    tracker.start_parent("sweep-none", {}, {})
    none = _summary().assign(best_trial="", ua=math.nan, fd_ratio=math.nan, override_fd_ratio=math.nan)
    log_sweep_summary(tracker, none, 6, tmp_path)
    assert tracker.client.get_run(tracker.parent_id).data.metrics == {"targets": 3, "targets_with_best": 0,
                                                                      "trials": 6}


def test_the_experiment_opens_as_model_training(tracker):
    exp = tracker.client.get_experiment(tracker.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # MLflow 3.17's UI picks the page by the URL's workflowType (default: genai, the GenAI overview)
    assert tracker.runs_view_url() == (f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs"
                                       "?workflowType=machine_learning&viewStateShareKey=sfd-sweep")
    # the shared view the link names: the columns of the figures, first (the UI reads the tag as JSON)
    view = json.loads(exp.tags["mlflow.sharedViewState.sfd-sweep"])
    assert view["columnOrder"][:4] == ["metrics.`min_best_ua`", "metrics.`median_best_fd_ratio`",
                                       "metrics.`worst_best_fd_ratio`", "metrics.`ua`"]
    assert view["selectedColumns"] == view["columnOrder"]


@pytest.mark.parametrize("ending, status", [(None, "finished"), (Interrupted("SIGINT"), "interrupted"),
                                            (OSError("disk full"), "failed")])
def test_the_record_says_running_then_how_the_sweep_ended(tmp_path, ending, status):
    record, outcome = {"kind": "sfd-sweep", "sweep_id": "abc", "status": "new"}, Outcome()

    def body():
        with sweep_record(tmp_path, record, outcome, parent_run_id="p1", storage="s3://b/x"):
            on_disk = json.loads((tmp_path / SWEEP_FILE).read_text())
            assert on_disk["status"] == "running" and on_disk["parent_run_id"] == "p1"
            if ending is not None:
                raise ending
            outcome.status = "finished"

    if ending is None:
        body()
    else:
        with pytest.raises(type(ending)):
            body()
    assert json.loads((tmp_path / SWEEP_FILE).read_text()) == {**record, "status": status}
    assert record["storage"] == "s3://b/x"


@pytest.fixture
def saved_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_a_signal_outside_tunes_loop_unwinds_the_driver(saved_handlers):
    with pytest.raises(Interrupted, match="SIGTERM"):
        with SignalGuard() as guard:
            os.kill(os.getpid(), signal.SIGTERM)
    assert guard.signum == signal.SIGTERM and guard.caught


def test_inside_tunes_loop_the_first_signal_asks_tune_to_stop_and_a_second_one_unwinds(saved_handlers, capsys):
    stops = []
    with SignalGuard() as guard:
        with guard.tune_loop():
            signal.signal(signal.SIGUSR1, lambda *_: stops.append(1))    # stands in for Tune's stop handler
            os.kill(os.getpid(), signal.SIGINT)
            assert stops == [1] and guard.signum == signal.SIGINT
            with pytest.raises(Interrupted, match="SIGTERM"):
                os.kill(os.getpid(), signal.SIGTERM)
        assert not guard.in_tune
    assert guard.signum == signal.SIGINT                                 # the first one sets the exit code
    assert "SIGINT: stopping the sweep" in capsys.readouterr().err


# -- a later command and the driver a sweep record names ------------------------------------------------

def _dead_pid() -> int:
    """A pid that was a process of ours and is gone (reaped)."""
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_driver_state_tells_a_live_driver_from_a_dead_one():
    import subprocess
    import sys
    me = {"status": "running", "driver": driver_identity()}
    assert driver_state(me) == "alive"
    assert driver_state({**me, "status": "finished"}) == "ended"
    assert driver_state({"status": "running", "driver": {**me["driver"], "pid": _dead_pid()}}) == "dead"
    # the pid given to a later process: not the driver (its start differs)
    assert driver_state({"status": "running", "driver": {**me["driver"], "started": "other-boot:1"}}) == "dead"
    # killed but not yet reaped by its parent (a zombie): dead
    z = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    rec = {"status": "running", "driver": {"host": me["driver"]["host"], "pid": z.pid, "started": None}}
    assert driver_state(rec) == "alive"
    z.kill()
    import time
    time.sleep(0.5)
    assert driver_state(rec) == "dead"
    z.wait()
    # another host, or a record from before drivers were recorded: cannot be known from here
    assert driver_state({"status": "running", "driver": {**me["driver"], "host": "elsewhere"}}) == "unknown"
    assert driver_state({"status": "running"}) == "unknown"


def _left_running(tmp_path, driver: dict):
    """A sweep whose driver died mid-trial: its record says running, its runs are RUNNING."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = MLflowSweep(uri, "sfd-sweep")
    first.start_parent("sweep-test", {}, {})                          # started, never ended: the driver died
    trial = first.start_trial("t1", TARGET, True, {})
    rec = {"kind": "sfd-sweep", "sweep_id": "abc", "status": "running", "parent_run_id": first.parent_id,
           "mlflow_uri": uri, "experiment": "sfd-sweep", "driver": driver}
    (tmp_path / SWEEP_FILE).write_text(json.dumps(rec))
    return first, trial


def _statuses(tracker):
    return sorted((r.data.tags["kind"], r.info.status) for r in tracker.client.search_runs([tracker.experiment_id]))


def test_a_dead_drivers_runs_are_marked_killed_in_one_line(tmp_path):
    me = driver_identity()
    first, trial = _left_running(tmp_path, {**me, "pid": _dead_pid()})
    line = settle_dead_driver(tmp_path, read_record(tmp_path))
    assert line.startswith("[sweep] the sweep's driver (pid ") and "\n" not in line
    assert "3 MLflow runs the killed driver left RUNNING marked KILLED (1 sweep, 1 target, 1 trial)" in line
    assert _statuses(first) == [("sweep", "KILLED"), ("target", "KILLED"), ("trial", "KILLED")]
    assert first.client.get_run(trial).data.tags["status"] == "cut_off"
    assert read_record(tmp_path)["status"] == "interrupted"          # said once: a second look finds nothing
    assert settle_dead_driver(tmp_path, read_record(tmp_path)) is None


def test_negative_control_a_live_drivers_runs_are_left_alone_and_the_command_refused(tmp_path):
    first, _ = _left_running(tmp_path, driver_identity())            # this process: alive
    before = (tmp_path / SWEEP_FILE).read_bytes()
    assert settle_dead_driver(tmp_path, read_record(tmp_path)) is None
    with pytest.raises(ValueError, match=rf"--summarize-only: the sweep in {tmp_path} is still running \(its driver "
                                         rf"is pid {os.getpid()} on this host\) — wait for it to end"):
        refuse_live_driver(tmp_path, read_record(tmp_path), "--summarize-only")
    assert _statuses(first) == [("sweep", "RUNNING"), ("target", "RUNNING"), ("trial", "RUNNING")]
    assert (tmp_path / SWEEP_FILE).read_bytes() == before
    # a driver on another host cannot be checked from here: said, and nothing touched
    other = {**driver_identity(), "host": "elsewhere"}
    (tmp_path / SWEEP_FILE).write_text(json.dumps({**read_record(tmp_path), "driver": other}))
    line = settle_dead_driver(tmp_path, read_record(tmp_path))
    assert "cannot be checked from here: its MLflow runs are left as they are" in line and "host elsewhere" in line
    assert _statuses(first) == [("sweep", "RUNNING"), ("target", "RUNNING"), ("trial", "RUNNING")]


def test_a_tracking_store_that_cannot_be_opened_is_named_and_nothing_is_changed(tmp_path):
    first, _ = _left_running(tmp_path, {**driver_identity(), "pid": _dead_pid()})
    rec = {**read_record(tmp_path), "mlflow_uri": f"sqlite:///{tmp_path / 'no-such-dir' / 'mlflow.db'}"}
    (tmp_path / SWEEP_FILE).write_text(json.dumps(rec))
    before = (tmp_path / SWEEP_FILE).read_bytes()
    with pytest.raises(ValueError, match=r"could not be marked KILLED in sqlite:///.*no-such-dir/mlflow.db \(.*\) — "
                                         r"make the tracking store reachable"):
        settle_dead_driver(tmp_path, read_record(tmp_path))
    assert (tmp_path / SWEEP_FILE).read_bytes() == before              # the record still says running
    assert _statuses(first) == [("sweep", "RUNNING"), ("target", "RUNNING"), ("trial", "RUNNING")]
