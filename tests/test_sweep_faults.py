"""The sweep's lifecycle under faults, with real Ray, real processes and real signals (no mocks):

- bad search-space values and sweep flags are refused before Ray starts (exit 2, the value named,
  nothing in --out touched), and so is an --out holding another sweep;
- SIGINT and SIGTERM end a running sweep cleanly: the cut-off trial marked as such in
  trials.parquet, its MLflow run and the sweep's run KILLED, none left RUNNING;
- the process that trains killed by PID mid-trial (--max-failures 1) -- a Ray Train worker
  (--trial-runner train) or the Tune trial's own process (tune, the default for one worker): the
  trial continues from its checkpoint in Ray's storage (the local copy deleted first), in the same
  MLflow run;
- the driver killed with SIGKILL, then --resume: every trial exactly once, in trials.parquet, in
  MLflow (FINISHED, none RUNNING) and in the Optuna studies (COMPLETE);
- SIGTERM sent to the sweep's whole process group (what `timeout`, a container stop or a batch
  scheduler sends: Ray's GCS and raylet get it too) ends the sweep in seconds with exit 143, the
  same tables and MLflow statuses as a graceful stop, and --resume finishes it (negative control:
  without the driver's watch on Ray's processes it waits 60 s on the dead GCS, exits 1 and leaves
  every run RUNNING); a second SIGINT during the graceful stop exits at once, tables consistent.

Each sweep is one target with two trials of a tiny budget on 2 CPUs, one trial at a time.
"""
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestration.space import space_path

REPO = Path(__file__).resolve().parent.parent
TINY = {"budget_kimg": 0.5, "eval_every_kimg": 0.25, "checkpoint_every_kimg": 0.25, "eval_forget_samples": 40,
        "eval_remain_per_class": 20, "batch_remain": 16, "batch_forget": 16}
SLUG = "digits_forget0_to_1"


def _space(path: Path, **defaults) -> Path:
    doc = yaml.safe_load(space_path("digits").read_text())
    doc["defaults"].update({**TINY, **defaults})
    doc["search"].pop("batch_remain", None)      # the tiny batch is not among its choices
    doc.pop("trial", None)
    doc["stage1_kimg"] = 0
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    e = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "SFD_CACHE": str(root / "cache")}
    return {"root": root, "env": e, "tiny": _space(root / "tiny.yaml"),
            "long": _space(root / "long.yaml", budget_kimg=1.5, eval_every_kimg=0.25)}


def _args(out, space, *extra):
    return ["--targets", "digits:0", "--trials-per-target", "2", "--space", str(space), "--out", str(out),
            "--num-cpus", "2", "--max-concurrent", "1", "--ua-threshold", "0", "--fresh-seed", "-1", *extra]


def _start(env, args, log: Path):
    f = open(log, "w")
    return subprocess.Popen([sys.executable, str(REPO / "orchestration" / "sweep.py"), *args], cwd=REPO, env=env,
                            stdout=f, stderr=subprocess.STDOUT, start_new_session=True), f


def _wait(pred, proc, log: Path, timeout: float, what: str):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.25)
    _kill_tree(proc.pid)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Linux /proc): the sweep's Ray processes."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_tree(pid: int) -> None:
    for p in [pid, *_children(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _trial_dirs(out: Path) -> list[Path]:
    return sorted((out / "trials" / SLUG).glob("*/run.json"), key=lambda p: p.stat().st_mtime)


def _stored(out: Path, trial_id: str) -> bool:
    """A checkpoint of the trial is committed to storage: Ray Train's snapshot names one
    (--trial-runner train), or Tune's result rows of the trial do (tune)."""
    snap = out / "ray" / f"train-{trial_id}" / "checkpoint_manager_snapshot.json"
    try:
        if '"checkpoint_dir_name"' in snap.read_text():
            return True
    except OSError:
        pass
    for rows in (out / "ray").glob(f"tune-*/run_trial_{trial_id}_*/result.json"):
        try:
            if any(json.loads(x).get("checkpoint_dir_name") for x in rows.read_text().splitlines() if x.strip()):
                return True
        except (OSError, ValueError):                 # Tune is writing it: look again at the next poll
            continue
    return False


def _finished(log: Path, n: int) -> bool:
    return f"trial {n}/2" in log.read_text()


def _runs(out: Path):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sfd-sweep")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return client, {kind: [r for r in runs if r.data.tags.get("kind") == kind] for kind in ("sweep", "target", "trial")}


def _checksums(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fake_sweep(folder: Path) -> dict:
    """A folder holding another sweep (its record and table), to be left untouched."""
    import pandas as pd
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps({"kind": "sfd-sweep", "sweep_id": "0123456789ab",
                                                   "targets": ["digits:3->4"], "trials_per_target": 5, "seed": 0,
                                                   "status": "finished"}))
    pd.DataFrame({"target": ["digits:3->4"], "trial_id": ["aaaa"], "status": ["finished"]}).to_parquet(
        folder / "trials.parquet")
    (folder / "trials").mkdir()
    (folder / "trials" / "notes.txt").write_text("a finished sweep\n")
    return _checksums(folder)


# -- refused before anything starts -------------------------------------------------------------

SPACE_CASES = [
    (lambda d: d["defaults"].update(lr_gen="fast"), "lr_gen 'fast' (str) must be a number"),   # -1e-4 is a number now (sfd/yamlfile.py)
    (lambda d: d["defaults"].update(budget_kimg="twenty"), "budget_kimg 'twenty'"),
    (lambda d: d["defaults"].update(batch_remain=64.5), "batch_remain 64.5"),
    (lambda d: d["defaults"].update(lr_gen=-1e-4), "lr_gen (--lr-gen) -0.0001 is out of range"),
    (lambda d: d["defaults"].update(eval_forget_samples=0), "eval_forget_samples"),
    (lambda d: d["search"].update(lr_gen={"type": "uniform", "low": -1e-3, "high": 1e-3}), "search.lr_gen: low=-0.001 is not a valid lr_gen"),
    (lambda d: d["search"].update(ema_beta={"type": "uniform", "low": 0.0, "high": 1.5}), "search.ema_beta: high=1.5 is not a valid ema_beta"),
    (lambda d: d["search"].update(sigma_dist={"type": "choice", "values": ["loguniform", "gaussian"]}),
     "search.sigma_dist: 'gaussian' is not a valid sigma_dist"),
    (lambda d: d["search"].update(batch_forget={"type": "choice", "values": [16, 32.5]}), "search.batch_forget: 32.5 is not a valid batch_forget"),
    (lambda d: d["search"].update(guidance={"type": "choice", "values": [0.0, -1.0]}), "search.guidance: -1.0 is not a valid guidance"),
    (lambda d: d["search"].update(sigma_max={"type": "loguniform", "low": 5.0, "high": 5000.0}),
     "search.sigma_max: high=5000.0 is not a valid sigma_max"),
]
FLAG_CASES = [
    (["--budget-kimg=-1"], "--budget-kimg -1.0 is invalid"),
    (["--budget-kimg", "nan"], "--budget-kimg nan is invalid"),
    (["--trials-per-target", "0"], "--trials-per-target 0 is invalid"),
    (["--ua-threshold", "1.5"], "--ua-threshold 1.5 is invalid"),
    (["--max-failures", "-2"], "--max-failures -2 is invalid"),
    (["--cpus-per-worker", "0"], "--cpus-per-worker 0.0 is invalid"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict"),
    (["--trial-runner", "tune", "--workers-per-trial", "2"], "--trial-runner tune runs one worker per trial, got "
                                                               "--workers-per-trial 2 — use --trial-runner train"),
    (["--space", str(space_path("cifar10"))], "is a search space for preset 'cifar10'"),
]


@pytest.mark.parametrize("mutate, needle", SPACE_CASES)
def test_bad_search_space_values_are_refused_before_ray(tmp_path, capsys, mutate, needle):
    from orchestration.sweep import main
    doc = yaml.safe_load(space_path("digits").read_text())
    doc.pop("trial", None)           # its schedule would replace the defaults' budget settings
    mutate(doc)
    space = tmp_path / "bad.yaml"
    space.write_text(yaml.safe_dump(doc))
    out = tmp_path / "held"
    before = _fake_sweep(out)
    rc = main(["--targets", "digits:0", "--space", str(space), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.startswith("sweep.py: error: search space "), err
    assert _checksums(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "held"]


@pytest.mark.parametrize("flags, needle", FLAG_CASES)
def test_bad_sweep_flags_are_refused(tmp_path, capsys, flags, needle):
    from orchestration.sweep import main
    out = tmp_path / "held"
    before = _fake_sweep(out)
    rc = main(["--targets", "digits:0", "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.startswith("sweep.py: error: ") and " — " in err, err
    assert _checksums(out) == before


def test_out_holding_another_sweep_is_refused(tmp_path, env):
    out = tmp_path / "held"
    before = _fake_sweep(out)
    r = subprocess.run([sys.executable, str(REPO / "orchestration" / "sweep.py"), *_args(out, env["tiny"])],
                       cwd=REPO, env=env["env"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    msg = r.stderr.strip()
    assert msg.startswith(f"sweep.py: error: --out {out} already holds sweep 0123456789ab"), msg
    assert "--resume" in msg and "--overwrite" in msg and "held.old-<timestamp>" in msg
    assert _checksums(out) == before and not list(tmp_path.glob("held.old-*"))
    # --resume of a sweep planned differently is refused too, naming the difference
    r = subprocess.run([sys.executable, str(REPO / "orchestration" / "sweep.py"), *_args(out, env["tiny"]),
                        "--resume"], cwd=REPO, env=env["env"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "trials_per_target: 5" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert _checksums(out) == before


# -- damaged stores at --resume ------------------------------------------------------------------

def _resumable(folder: Path) -> dict:
    """A sweep folder --resume would continue (the plan of _args' sweep): its record, real SQLite
    stores and a table."""
    import sqlite3

    import pandas as pd
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps({"kind": "sfd-sweep", "sweep_id": "0123456789ab",
                                                   "targets": ["digits:0->1"], "trials_per_target": 2, "seed": 0,
                                                   "trial_runner": "tune", "status": "interrupted"}))
    for name in ("optuna.db", "mlflow.db"):
        con = sqlite3.connect(folder / name)
        con.execute("create table t (x text)")
        con.executemany("insert into t values (?)", [("x" * 200,)] * 2000)
        con.commit()
        con.close()
    pd.DataFrame({"target": ["digits:0->1"] * 200, "trial_id": [f"t{i}" for i in range(200)],
                  "status": ["finished"] * 200}).to_parquet(folder / "trials.parquet")
    return _checksums(folder)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


DAMAGES = [
    ("optuna.db", lambda p: p.write_bytes(b"not a database\n" * 100), "optuna.db is damaged (SQLite: file is not a database)"),
    ("optuna.db", _truncate, "optuna.db is damaged (SQLite: database disk image is malformed)"),
    ("mlflow.db", _truncate, "mlflow.db is damaged (SQLite: database disk image is malformed)"),
    ("trials.parquet", _truncate, "trials.parquet is damaged (ArrowInvalid"),
]


def test_resume_of_intact_stores_passes_the_check(tmp_path):
    from orchestration.sweep import check_stores
    _resumable(tmp_path / "sweep")
    check_stores(tmp_path / "sweep")          # control: the same stores undamaged are accepted


@pytest.mark.parametrize("name, damage, needle", DAMAGES)
def test_resume_refuses_a_damaged_store_naming_it_and_the_way_out(tmp_path, env, capsys, name, damage, needle):
    from orchestration.sweep import main
    out = tmp_path / "sweep"
    _resumable(out)
    damage(out / name)
    before = _checksums(out)
    rc = main([*_args(out, env["tiny"]), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert err.startswith(f"sweep.py: error: --resume: {out / name}") and needle in err, err
    assert ("--overwrite" if name.endswith(".db") else "move it aside") in err, err
    assert _checksums(out) == before and not list(tmp_path.glob("sweep.old-*"))


def test_summarize_only_names_a_damaged_table(tmp_path, capsys):
    from orchestration.sweep import main
    out = tmp_path / "sweep"
    _resumable(out)
    _truncate(out / "trials.parquet")
    before = _checksums(out)
    assert main(["--summarize-only", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sweep.py: error: {out / 'trials.parquet'} is damaged (ArrowInvalid") and "--resume" in err
    assert _checksums(out) == before


# -- interrupted sweeps ----------------------------------------------------------------------

def _assert_interrupted(out: Path, sig_name: str):
    """After SIGINT/SIGTERM during the second trial: tables for what finished, the cut-off trial
    marked, no MLflow run RUNNING, the sweep's run KILLED."""
    import pandas as pd
    trials = pd.read_parquet(out / "trials.parquet")
    assert sorted(trials["status"]) == ["cut_off", "finished"], trials[["trial_id", "status", "note"]]
    cut = trials[trials["status"] == "cut_off"].iloc[0]
    assert cut["note"] == f"cut off by {sig_name}" and cut["error"] == ""
    summary = pd.read_parquet(out / "summary.parquet")
    assert summary["state"].tolist() == ["interrupted"] and summary["finished"].tolist() == [1]
    assert json.loads((out / "sweep.json").read_text())["status"] == "interrupted"
    client, runs = _runs(out)
    statuses = {r.info.run_id: r.info.status for k in runs for r in runs[k]}
    assert "RUNNING" not in statuses.values(), statuses
    assert [r.info.status for r in runs["sweep"]] == ["KILLED"]
    assert runs["sweep"][0].data.tags["status"] == "interrupted"
    by_trial = {r.data.tags["trial_id"]: r for r in runs["trial"]}
    assert len(by_trial) == 2 == len(runs["trial"])
    assert by_trial[cut["trial_id"]].info.status == "KILLED"
    assert by_trial[cut["trial_id"]].data.tags["status"] == "cut_off"
    done = trials[trials["status"] == "finished"].iloc[0]
    assert by_trial[done["trial_id"]].info.status == "FINISHED" and done["kimg"] >= 0.5
    return trials, client, by_trial


@pytest.mark.slow
def test_sigint_ends_the_sweep_cleanly_and_overwrite_moves_the_old_one_aside(tmp_path, env):
    out = tmp_path / "sweep"
    before = _fake_sweep(out)                       # --overwrite: moved aside, never deleted
    log = tmp_path / "log.txt"
    proc, f = _start(env["env"], _args(out, env["tiny"], "--overwrite"), log)
    try:
        _wait(lambda: _finished(log, 1) and len(_trial_dirs(out)) == 2, proc, log, 240, "the second trial")
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        _kill_tree(proc.pid)
        f.close()
    text = log.read_text()
    assert rc == 130, text[-3000:]
    assert "interrupted by SIGINT: 1/2 trials finished" in text and "Traceback" not in text, text[-3000:]
    _assert_interrupted(out, "SIGINT")
    old = list(tmp_path.glob("sweep.old-*"))
    assert len(old) == 1 and _checksums(old[0]) == before


# the process that runs train_sfd: a Ray Train worker actor, or the Tune trial's own (function trainable)
TRAINING_PROCESS = {"train": "RayTrainWorker", "tune": "ImplicitFunc"}


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["train", "tune"])
def test_worker_killed_mid_trial_resumes_from_storage_then_sigterm(tmp_path, env, runner):
    """--max-failures 1: the process training the first trial (Ray Train's worker, or the Tune
    trial's own) is SIGKILLed after a checkpoint reached Ray's storage and the local copies were
    deleted; the restarted one continues from the storage copy; then SIGTERM during the second trial
    ends the sweep cleanly."""
    out = tmp_path / "sweep"
    log = tmp_path / "log.txt"
    proc, f = _start(env["env"], _args(out, env["long"], "--max-failures", "1", "--trial-runner", runner), log)
    try:
        def stored():
            dirs = _trial_dirs(out)
            return bool(dirs) and _stored(out, dirs[0].parent.name)
        _wait(stored, proc, log, 240, "a checkpoint of the first trial in Ray's storage")
        run_dir = _trial_dirs(out)[0].parent
        workers = [p for p in _children(proc.pid) if TRAINING_PROCESS[runner] in _cmdline(p)]
        assert len(workers) == 1, [(p, _cmdline(p)) for p in _children(proc.pid)]
        import shutil
        shutil.rmtree(run_dir / "checkpoints")       # only the storage copy is left to resume from
        os.kill(workers[0], signal.SIGKILL)
        _wait(lambda: _finished(log, 1) and len(_trial_dirs(out)) == 2, proc, log, 300, "the second trial")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        _kill_tree(proc.pid)
        f.close()
    text = log.read_text()
    assert rc == 143, text[-3000:]
    assert "interrupted by SIGTERM" in text and "Traceback" not in text.split("SIGTERM")[-1], text[-3000:]
    trials, client, by_trial = _assert_interrupted(out, "SIGTERM")
    row = trials[trials["trial_id"] == run_dir.name].iloc[0]
    assert row["status"] == "finished" and row["kimg"] >= 1.5
    # one MLflow run for the trial, whose reports continue after the restart instead of starting over
    # (from scratch they read 0, 8, 0, 8, ...; a checkpoint's step is logged twice: metrics + model)
    hist = client.get_metric_history(by_trial[run_dir.name].info.run_id, "iteration")
    its = [m.value for m in sorted(hist, key=lambda m: m.timestamp)]
    assert its.count(0.0) == 1 and its == sorted(its) and max(its) == 47, its
    # the run folder records the restart: from Ray's storage copy, with nothing left locally
    restarts = [json.loads(x) for x in (run_dir / "restarts.jsonl").read_text().splitlines()]
    assert len(restarts) == 1 and restarts[0]["iteration"] > 0 and restarts[0]["local_iteration"] == -1, restarts
    assert Path(restarts[0]["from"]).name.startswith("checkpoint_") and restarts[0]["iteration"] in its


@pytest.mark.slow
def test_sigkill_then_resume_runs_every_trial_exactly_once(tmp_path, env):
    out = tmp_path / "sweep"
    log = tmp_path / "log.txt"
    proc, f = _start(env["env"], _args(out, env["tiny"]), log)
    try:
        _wait(_second_stored(out, log), proc, log, 240, "a checkpoint of the second trial")
        first = _trial_dirs(out)[0].parent
        first_metrics = (first / "metrics.json").read_bytes()
        _kill_tree(proc.pid)                            # the driver and its Ray processes, no clean-up
        proc.wait(timeout=60)
    finally:
        _kill_tree(proc.pid)
        f.close()
    assert proc.returncode == -signal.SIGKILL
    _, runs = _runs(out)
    assert "RUNNING" in {r.info.status for r in runs["trial"]}      # what a killed driver leaves behind

    r = _assert_resumed(out, env, first, first_metrics)
    assert [x for x in r.stdout.splitlines() if "marked KILLED" in x] == [
        "[sweep] --resume: 2 MLflow runs the killed driver left RUNNING marked KILLED (1 target, 1 trial)"]


def _sweep_cmd(env, out: Path, *extra, space: str = "tiny", timeout: float = 400, wait: bool = True):
    cmd = [sys.executable, str(REPO / "orchestration" / "sweep.py"), *_args(out, env[space]), *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env["env"], capture_output=True, text=True, timeout=timeout)


def _statuses(out: Path) -> dict:
    _, runs = _runs(out)
    return {r.info.run_id: (k, r.info.status, r.data.tags.get("status")) for k in runs for r in runs[k]}


@pytest.mark.slow
def test_kill_9_of_the_drivers_group_then_summarize_only_marks_its_runs_killed_and_resume_finishes(tmp_path, env):
    """kill -9 of the sweep's whole process group (driver, GCS, raylet) leaves its MLflow runs RUNNING;
    a later --summarize-only marks them KILLED and says so in one line, and --resume finishes the sweep.
    Negative control, first: while the driver lives, --summarize-only and --resume are refused (exit 2,
    naming its pid) and its runs stay RUNNING -- they are a live driver's, not a dead one's."""
    import optuna
    import pandas as pd
    out = tmp_path / "sweep"
    log = tmp_path / "log.txt"
    proc, f = _start(env["env"], _args(out, env["long"]), log)      # 1.5 kimg trials: still running when asked
    try:
        _wait(lambda: _trial_dirs(out) and _stored(out, _trial_dirs(out)[0].parent.name), proc, log, 240,
              "a checkpoint of the first trial")
        asked = [_sweep_cmd(env, out, extra, space="long", wait=False) for extra in ("--summarize-only", "--resume")]
        answers = [(p.args[-1], *p.communicate(timeout=180), p.returncode) for p in asked]
        assert proc.poll() is None, "the sweep ended before the control was done: it proves nothing"
        for extra, stdout, stderr, rc in answers:
            assert rc == 2, (extra, stdout[-2000:], stderr[-2000:])
            assert f"is still running (its driver is pid {proc.pid} on this host)" in stderr, (extra, stderr)
        before = _statuses(out)
        assert {k for k, st, _ in before.values() if st == "RUNNING"} == {"sweep", "target", "trial"}, before
        assert not (out / "summary.md").exists() and json.loads((out / "sweep.json").read_text())["status"] == "running"
        tree = _children(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)                             # kill -9 -- -PGID: no clean-up at all
        proc.wait(timeout=60)
    finally:
        _kill_tree(proc.pid)
        for pid in locals().get("tree", []):         # Ray's workers sit in process groups of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        f.close()
    assert proc.returncode == -signal.SIGKILL
    left = _statuses(out)
    running = {k: sum(st == "RUNNING" for kk, st, _ in left.values() if kk == k) for k in ("sweep", "target", "trial")}
    assert running["sweep"] == 1 and running["target"] == 1 and running["trial"] >= 1, left     # what it left

    r = _sweep_cmd(env, out, "--summarize-only", space="long", timeout=120)
    said = [x for x in r.stdout.splitlines() if "marked KILLED" in x]
    n = sum(running.values())
    assert said == [f"[sweep] the sweep's driver (pid {proc.pid}) is gone: {n} MLflow runs the killed driver left "
                    f"RUNNING marked KILLED (1 sweep, 1 target, {running['trial']} trial); continue the sweep with "
                    f"--resume"], r.stdout
    # no table yet (the driver died before writing one): said, with the way on
    assert r.returncode == 2 and "the sweep was stopped before it wrote its tables: continue it with --resume" in r.stderr
    after = _statuses(out)
    for run_id, (kind, status, tag) in left.items():
        if status == "RUNNING":                       # each ended as what happened to it
            assert after[run_id] == (kind, "KILLED", "cut_off" if kind == "trial" else "interrupted"), after[run_id]
        else:                                         # the rest untouched
            assert after[run_id] == (kind, status, tag)
    assert json.loads((out / "sweep.json").read_text())["status"] == "interrupted"
    again = _sweep_cmd(env, out, "--summarize-only", space="long", timeout=120)     # said once, not twice
    assert "marked KILLED" not in again.stdout and again.returncode == 2

    r = _sweep_cmd(env, out, "--resume", space="long", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "marked KILLED" not in r.stdout                            # nothing was left RUNNING to mark
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 2 and trials["trial_id"].is_unique and (trials["status"] == "finished").all(), trials
    _, runs = _runs(out)
    assert len(runs["sweep"]) == 1 and runs["sweep"][0].info.status == "FINISHED"          # the same sweep run
    # one FINISHED run per trial of the table; a kill -9 that lands as a trial starts, before Tune saved it, leaves
    # that attempt's run, marked KILLED by --summarize-only (its trial is asked again under a new id): never RUNNING
    statuses = sorted(x.info.status for x in runs["trial"])
    assert statuses.count("FINISHED") == 2 and set(statuses) <= {"FINISHED", "KILLED"}, statuses
    finished_ids = {x.data.tags.get("trial_id") for x in runs["trial"] if x.info.status == "FINISHED"}
    assert finished_ids == set(trials["trial_id"]), (finished_ids, trials["trial_id"])
    # such an attempt's run says why it is not in the table
    assert all(x.data.tags.get("superseded") == "true" for x in runs["trial"] if x.info.status == "KILLED")
    study = optuna.load_study(study_name="digits:0->1", storage=f"sqlite:///{out / 'optuna.db'}")
    states = sorted(t.state.name for t in study.trials)
    assert states.count("COMPLETE") == 2 and set(states) <= {"COMPLETE", "FAIL"}, states


def _assert_resumed(out: Path, env, first: Path, first_metrics: bytes, space: str = "tiny"):
    """`--resume` of a sweep cut off during its second trial: every trial exactly once, in
    trials.parquet, MLflow (FINISHED, none RUNNING, the same sweep run) and the Optuna study
    (COMPLETE); the finished trial not run again, the cut-off one continued from its checkpoint."""
    import optuna
    import pandas as pd
    r = subprocess.run([sys.executable, str(REPO / "orchestration" / "sweep.py"), *_args(out, env[space]), "--resume"],
                       cwd=REPO, env=env["env"], capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "restoring the Tune experiment" in r.stdout
    killed = [x for x in r.stdout.splitlines() if "marked KILLED" in x]   # what a killed driver left: one line
    assert len(killed) <= 1 and all(x.startswith("[sweep] --resume: ") for x in killed), killed
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 2 and trials["trial_id"].is_unique and (trials["status"] == "finished").all(), trials
    assert (first / "metrics.json").read_bytes() == first_metrics     # the finished trial did not run again
    second = _trial_dirs(out)[1].parent
    restarts = [json.loads(x) for x in (second / "restarts.jsonl").read_text().splitlines()]
    assert len(restarts) == 1 and restarts[0]["iteration"] > 0        # the cut-off trial continued
    _, runs = _runs(out)
    assert [x.info.status for x in runs["trial"]].count("FINISHED") == 2 and len(runs["trial"]) == 2
    assert "RUNNING" not in {x.info.status for k in runs for x in runs[k]}
    assert len(runs["sweep"]) == 1 and runs["sweep"][0].info.status == "FINISHED"     # the same sweep run
    study = optuna.load_study(study_name="digits:0->1", storage=f"sqlite:///{out / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2, states
    assert sorted(t.user_attrs["tune_trial_id"] for t in study.trials
                  if t.state == optuna.trial.TrialState.COMPLETE) == sorted(trials["trial_id"])
    return r


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _second_stored(out: Path, log: Path):
    def pred():
        dirs = _trial_dirs(out)
        return _finished(log, 1) and len(dirs) == 2 and _stored(out, dirs[1].parent.name)
    return pred


# the sweep with the driver's watch on Ray's processes switched off: how it ended before the fix
UNWATCHED = ("import sys; from orchestration.lifecycle import SignalGuard; SignalGuard._watch = lambda self: None; "
             "from orchestration.sweep import main; sys.exit(main(sys.argv[1:]))")


UNWATCHED_GIVE_UP_S = 15


def _group_sigterm(tmp_path, env, watched: bool = True):
    """The sweep in its own process group, SIGTERM to the whole group once the second trial has a
    checkpoint in storage; returns (exit code, seconds to exit, log text, out, first trial's folder
    and metrics)."""
    out = tmp_path / "sweep"
    log = tmp_path / "log.txt"
    # the long space (three checkpoints a trial): the signal lands while the second trial still trains, not as
    # it finishes (the tiny one's two checkpoints left a window of a fraction of a second)
    if watched:
        proc, f = _start(env["env"], _args(out, env["long"]), log)
    else:
        f = open(log, "w")
        # Ray's driver gives up on a dead GCS after RAY_gcs_rpc_server_reconnect_timeout_s (60 s by default);
        # 15 s here: the control shows the same failure without waiting a minute for it
        proc = subprocess.Popen([sys.executable, "-c", UNWATCHED, *_args(out, env["long"])], cwd=REPO,
                                env={**env["env"], "RAY_gcs_rpc_server_reconnect_timeout_s": str(UNWATCHED_GIVE_UP_S)},
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(_second_stored(out, log), proc, log, 240, "a checkpoint of the second trial")
        first = _trial_dirs(out)[0].parent
        first_metrics = (first / "metrics.json").read_bytes()
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGTERM)             # the driver, Ray's GCS, raylet, monitors: all at once
        rc = proc.wait(timeout=180)
        seconds = time.time() - t0
        while _group_alive(proc.pid) and time.time() - t0 < 60:
            time.sleep(0.2)
        left = _group_alive(proc.pid)
    finally:
        _kill_tree(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        f.close()
    print(f"process-group SIGTERM ({'watched' if watched else 'unwatched'}): exit {rc} after {seconds:.1f} s; "
          f"process group {'still alive' if left else 'gone'} {time.time() - t0:.1f} s after the signal")
    return rc, seconds, left, log.read_text(), out, first, first_metrics


@pytest.mark.slow
def test_process_group_sigterm_ends_the_sweep_in_seconds_then_resume_finishes_it(tmp_path, env):
    rc, seconds, left, text, out, first, first_metrics = _group_sigterm(tmp_path, env)
    assert rc == 143, text[-3000:]
    assert seconds < 45, f"{seconds:.1f} s to exit"      # generous (3 s measured); Ray's own give-up is 60 s
    assert not left, "the sweep's Ray processes outlived it"
    tail = text.split("SIGTERM", 1)[1]
    assert "Ray's own processes were stopped too" in tail and "Traceback" not in tail, text[-3000:]
    assert "interrupted by SIGTERM: 1/2 trials finished" in tail, text[-3000:]
    _assert_interrupted(out, "SIGTERM")                  # tables, record, every MLflow run ended
    import optuna
    study = optuna.load_study(study_name="digits:0->1", storage=f"sqlite:///{out / 'optuna.db'}")
    # the cut-off trial's Optuna trial stays RUNNING: --resume continues it with its Tune trial
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "RUNNING"], study.trials
    _assert_resumed(out, env, first, first_metrics, space="long")


@pytest.mark.slow
def test_negative_control_without_the_watch_a_group_sigterm_leaves_runs_running(tmp_path, env):
    rc, seconds, _, text, out, _, _ = _group_sigterm(tmp_path, env, watched=False)
    # Ray's wait for the GCS (shortened to UNWATCHED_GIVE_UP_S), then exit 1; the watched sweep exits 143 in seconds
    assert rc != 143 and seconds > UNWATCHED_GIVE_UP_S - 3, (rc, seconds, text[-3000:])
    assert not (out / "trials.parquet").exists()
    _, runs = _runs(out)
    assert [r.info.status for r in runs["sweep"]] == ["RUNNING"] and [r.info.status for r in runs["target"]] == ["RUNNING"]
    # nothing is marked: the cut-off trial's run stays RUNNING (or FINISHED when, on a loaded machine, the
    # second trial ended before the signal landed); the watched sweep marks it KILLED
    assert "KILLED" not in {r.info.status for r in runs["trial"]}


@pytest.mark.slow
def test_a_second_sigint_during_the_graceful_stop_exits_at_once_with_consistent_tables(tmp_path, env):
    out = tmp_path / "sweep"
    log = tmp_path / "log.txt"
    # the long space: the first signal lands while the second trial trains (the tiny one's could finish first)
    proc, f = _start(env["env"], _args(out, env["long"]), log)
    try:
        _wait(_second_stored(out, log), proc, log, 240, "a checkpoint of the second trial")
        proc.send_signal(signal.SIGINT)                 # the driver only: Ray alive, Tune's graceful stop starts
        _wait(lambda: "stopping the sweep" in log.read_text(), proc, log, 30, "the graceful stop")
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
        print(f"second SIGINT: exit {rc} after {time.time() - t0:.1f} s")
    finally:
        _kill_tree(proc.pid)
        f.close()
    text = log.read_text()
    assert rc == 130, text[-3000:]
    # Tune still stopping: it is not waited for; Tune already back: the tables under way are finished
    assert ("SIGINT again: not waiting for Tune" in text or "SIGINT again: finishing the tables" in text) \
        and "Traceback" not in text, text[-3000:]
    _assert_interrupted(out, "SIGINT")


def test_an_interrupt_raised_inside_rays_compiled_code_is_recognised():
    """ray.wait runs the signal handler in its own signal check; CPython then reports SystemError with
    the Interrupted as its cause. Only that SystemError counts as the interrupt (the control: another
    SystemError does not)."""
    from orchestration.lifecycle import Interrupted, interrupted_inside
    try:
        try:
            raise Interrupted("SIGINT")
        except Interrupted as inner:
            raise SystemError("<cyfunction CoreWorker.wait> returned a result with an exception set") from inner
    except SystemError as e:
        wrapped = e
    assert interrupted_inside(wrapped) and interrupted_inside(Interrupted("SIGTERM"))
    assert not interrupted_inside(SystemError("unrelated")) and not interrupted_inside(ValueError("x"))


# the first tabulate() call gets SIGINT from inside: the signal lands after Tune returned, mid-tables
LATE_SIGINT = ("import os, signal, sys; import orchestration.sweep as s; real = s.tabulate; calls = []\n"
               "def late(*a, **k):\n"
               "    calls.append(1)\n"
               "    if len(calls) == 1: os.kill(os.getpid(), signal.SIGINT)\n"
               "    return real(*a, **k)\n"
               "s.tabulate = late; sys.exit(s.main(sys.argv[1:]))")


@pytest.mark.slow
def test_a_sigint_after_tune_returned_still_writes_the_tables_of_every_finished_trial(tmp_path, env):
    """Both trials finished, then SIGINT while the tables are written: exit 130, and the tables, the
    summary and the report count both trials (not "0/2 finished" with no tables)."""
    import pandas as pd
    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-c", LATE_SIGINT, *_args(out, env["tiny"])], cwd=REPO, env=env["env"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 130, r.stderr[-3000:]
    assert "interrupted by SIGINT: 2/2 trials finished" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    trials = pd.read_parquet(out / "trials.parquet")
    assert sorted(trials["status"]) == ["finished", "finished"], trials[["trial_id", "status", "note"]]
    summary = pd.read_parquet(out / "summary.parquet")
    assert summary["finished"].tolist() == [2]
    assert json.loads((out / "sweep.json").read_text())["status"] == "interrupted"
    statuses = [r.info.status for k, rs in _runs(out)[1].items() for r in rs]
    assert "RUNNING" not in statuses, statuses


# -- a trial that fails inside Ray: the real cause recorded --------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("runner", ["train", "tune"])
def test_failed_trial_records_the_root_cause_not_rays_banner(tmp_path, monkeypatch, runner):
    """A trial whose worker raises (a corrupt teacher file, found inside the Ray Train worker or the
    Tune trial's own process): its row says failed with the worker's exception, its MLflow run is
    FAILED with the same error tag."""
    import ray
    from ray import tune

    from orchestration.results import root_cause, trial_rows
    from orchestration.targets import parse_targets
    from orchestration.tracking import MLflowSweep, MLflowTuneCallback
    from orchestration.trial import run_trial, trial_resources
    from sfd.config import config_for_preset

    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    bad = tmp_path / "teacher.safetensors"
    bad.write_bytes(b"\x1b[31mnot a safetensors file\x1b[0m")
    target = parse_targets(["digits:0->1"], "next")[0]
    cfg = config_for_preset("digits", **TINY, forget=[0], override="1", teacher=str(bad)).to_dict()
    out = tmp_path / "out"
    tracker = MLflowSweep(f"sqlite:///{tmp_path / 'mlflow.db'}", "sfd-sweep")
    tracker.start_parent("sweep-test", {}, {})
    callback = MLflowTuneCallback(tracker, {target.name: target}, out)
    resources = tune.PlacementGroupFactory([trial_resources(runner, 1, 0)])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        grid = tune.Tuner(
            tune.with_resources(run_trial, resources),
            param_space={"target": target.name, "target_slug": target.slug, "baseline": True, "params": {},
                         "sfd": cfg, "sweep": {"out": str(out), "storage": str(tmp_path / "ray"),
                                               "workers_per_trial": 1, "cpus_per_worker": 1, "gpus_per_worker": 0,
                                               "trial_runner": runner}},
            run_config=tune.RunConfig(name="t", storage_path=str(tmp_path / "ray"), callbacks=[callback], verbose=0),
        ).fit()
        # `sweep.py --resume` restores the experiment with resume_errored=False: Tune hands the failed
        # trial back without its config; its row must still be there, failed, with the same cause
        restored = tune.Tuner.restore(str(tmp_path / "ray" / "t"), trainable=tune.with_resources(
            run_trial, resources), resume_unfinished=True,
            resume_errored=False, restart_errored=False).fit()
    finally:
        ray.shutdown()
    assert [r.config for r in restored] == [None]             # what Tune gives back
    again = trial_rows(restored, {target.name: target}, out, {}, {})
    assert [r["status"] for r in again] == ["failed"] and again[0]["error"].startswith(
        f"CheckpointError: corrupted or unreadable weight file {bad}"), again
    raw = str(grid[0].error)
    assert "ray::ImplicitFunc.train()" in raw                 # what the table used to hold
    want = f"CheckpointError: corrupted or unreadable weight file {bad}"
    for got in (root_cause(grid[0].error), root_cause(raw)):  # the exception chain, and Ray's text
        assert got.startswith(want) and "\x1b" not in got and "ray::" not in got, got
    rows = trial_rows(grid, {target.name: target}, out, callback.outcome, callback.errors)
    assert [r["status"] for r in rows] == ["failed"] and rows[0]["error"].startswith(want), rows[0]["error"]
    run = tracker.client.get_run(tracker.trial_runs[rows[0]["trial_id"]])
    assert run.info.status == "FAILED" and run.data.tags["status"] == "failed"
    assert run.data.tags["error"].startswith(want)


def test_bad_storage_is_refused_before_anything_starts(tmp_path, env):
    """A --storage that cannot hold Ray's experiment (a regular file) is refused by the storage probe
    before the sweep opens an MLflow run or writes its record: exit 2, the message names the path,
    no run exists (so none is left RUNNING) and --out holds nothing."""
    storage = tmp_path / "not-a-folder"
    storage.write_text("a file\n")
    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, str(REPO / "orchestration" / "sweep.py"), *_args(out, env["tiny"]),
                        "--storage", str(storage)], cwd=REPO, env=env["env"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("sweep.py: error: ") and str(storage) in r.stderr
    assert not (out / "sweep.json").exists() and not (out / "mlflow.db").exists()
    assert storage.read_text() == "a file\n"


def test_dry_run_reports_an_out_holding_another_sweep_and_changes_nothing(tmp_path, capsys):
    from orchestration.sweep import main
    out = tmp_path / "held"
    before = _fake_sweep(out)
    assert main(["--targets", "digits:0", "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "the sweep itself would refuse to start: --out" in text and "plan: 1 target(s)" in text
    assert main(["--targets", "digits:0", "--out", str(out), "--dry-run", "--overwrite"]) == 0
    assert "would be moved aside" in capsys.readouterr().out
    assert _checksums(out) == before and not list(tmp_path.glob("held.old-*"))


# -- the two trial runners --------------------------------------------------------------------

@pytest.mark.slow
def test_both_trial_runners_train_the_same_trial(tmp_path, env):
    """--trial-runner train (a Ray Train job) and tune (inside the Tune trial's process) run the same
    per-worker body: the same trial (same seed, same parameters) gives a generator equal tensor by
    tensor (`==`) and the same metrics."""
    import pandas as pd
    import torch

    from sfd.io import load_tensors
    got, procs = {}, {}
    for runner in ("train", "tune"):   # both sweeps at once (two Ray clusters): most of each is waiting
        out = tmp_path / runner
        procs[runner] = subprocess.Popen(
            [sys.executable, str(REPO / "orchestration" / "sweep.py"), "--targets", "digits:0",
             "--trials-per-target", "1", "--space", str(env["tiny"]), "--out", str(out),
             "--num-cpus", "2", "--ua-threshold", "0", "--fresh-seed", "-1", "--trial-runner", runner],
            cwd=REPO, env=env["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        logs = {runner: proc.communicate(timeout=400)[0] for runner, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                _kill_tree(proc.pid)
    for runner, proc in procs.items():
        stdout = logs[runner]
        assert proc.returncode == 0, stdout[-4000:]
        assert ("in the Tune trial" if runner == "tune" else "on Ray Train") in stdout
        out = tmp_path / runner
        (gen,) = (out / "trials" / SLUG).glob("*/generator.safetensors")
        row = pd.read_parquet(out / "trials.parquet").iloc[0]
        got[runner] = (load_tensors(gen)[0], row)
    assert got["train"][0].keys() == got["tune"][0].keys()
    assert all(torch.equal(got["train"][0][k], got["tune"][0][k]) for k in got["train"][0]), \
        {k: float((got["train"][0][k].float() - got["tune"][0][k].float()).abs().max()) for k in got["train"][0]}
    for k in ("ua", "fd_remaining", "fd_forget_vs_override", "remaining_accuracy", "kimg"):
        assert got["train"][1][k] == got["tune"][1][k], k
    assert list((tmp_path / "tune" / "ray").glob("tune-*/run_trial_*/checkpoint_*"))   # tune: in Tune's folder
    assert not list((tmp_path / "tune" / "ray").glob("train-*"))          # and no Ray Train run
    assert list((tmp_path / "train" / "ray").glob("train-*/checkpoint_*"))


def _tune_two_trials(tmp_path, reuse: bool):
    """Two one-step trials, one at a time, max_failures 3; the process that is handed the second trial
    dies once as it starts (in ``reset_config`` when a finished trial's process is reused, in ``setup``
    when it is fresh). Returns {x: error or None} and the second trial's counted failures."""
    import shutil
    import tempfile

    import ray
    from ray import tune

    mark = tmp_path / "died"

    class Trial(tune.Trainable):            # defined here: Ray ships it to its workers by value
        def setup(self, config):
            if config["x"] == 2 and not mark.exists():
                mark.write_text("setup")
                os._exit(1)
            self.x = config["x"]

        def reset_config(self, new_config):
            if new_config["x"] == 2 and not mark.exists():
                mark.write_text("reset")
                os._exit(1)
            self.x = new_config["x"]
            return True

        def step(self):
            return {"x": self.x, "done": True}

        def save_checkpoint(self, d):
            return {}

        def load_checkpoint(self, c):
            pass

    ray_tmp = tempfile.mkdtemp(prefix="sfdrt-", dir="/tmp")          # short: socket paths <= 107 chars
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", _temp_dir=ray_tmp)
    try:
        grid = tune.Tuner(Trial, param_space={"x": tune.grid_search([1, 2])},
                          tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=reuse),
                          run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), verbose=0,
                                                    failure_config=tune.FailureConfig(max_failures=3))).fit()
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    errors = {r.path.split("x=")[1].split("_")[0]: r.error for r in grid}
    failures = [x for f in (tmp_path / "ray").rglob("error.txt") if "x=2" in f.parent.name
                for x in f.read_text().splitlines() if x.startswith("Failure #")]
    return errors, failures, mark.read_text()


@pytest.mark.slow
def test_a_kill_as_a_trial_starts_is_retried_because_the_sweep_does_not_reuse_processes_with_max_failures(tmp_path):
    """The chaos run's lost trial (two worker kills, --max-failures 3, the trial ERROR with no run): Ray
    Tune 2.60 handles the death of a reused process during its ``reset`` task twice, and the second
    time the trial is PENDING, which is final. The sweep does not reuse processes when Tune retries
    trials (orchestration.trial.reuse_actors), so the same death counts once and the trial finishes;
    the negative control reuses them and shows the trial lost after one death."""
    from orchestration.trial import reuse_actors
    assert reuse_actors("tune", 3) is False and reuse_actors("tune", -1) is False
    assert reuse_actors("tune", 0) is True and reuse_actors("train", 3) is True    # (Ray Train retries itself)

    errors, failures, where = _tune_two_trials(tmp_path / "sweep", reuse=reuse_actors("tune", 3))
    assert where == "setup" and errors == {"1": None, "2": None}, errors
    assert len(failures) == 1, failures                              # one death, one failure, retried

    errors, failures, where = _tune_two_trials(tmp_path / "reused", reuse=True)
    assert where == "reset" and errors["1"] is None
    assert type(errors["2"]).__name__ == "ActorDiedError", errors   # lost after a single death...
    assert len(failures) == 2, failures                              # ...counted twice, max_failures 3 not used
