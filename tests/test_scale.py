"""The sweep at many targets: the scale benchmark's table, the fresh re-evaluation as Ray tasks, the
MLflow searches that replaced per-run and per-target queries, the Ray internals the restore path relies
on, and a test run that writes only where it is told."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "sweep_scale.py"
sys.path.insert(0, str(REPO / "benchmarks"))


def test_growth_exponent_of_linear_and_quadratic_figures():
    from sweep_scale import growth
    recs = [{"targets": n, "wall_s": 3.0 * n, "tables_s": 0.01 * n * n, "optuna_mib": 5.0} for n in (10, 30, 100)]
    k = growth(recs)
    assert k["wall_s"] == pytest.approx(1.0, abs=0.01)
    assert k["tables_s"] == pytest.approx(2.0, abs=0.01)
    assert k["optuna_mib"] == pytest.approx(0.0, abs=0.01)
    assert k["mlflow_mib"] is None                       # no figure: no exponent invented


def test_target_specs_are_distinct_valid_targets():
    from orchestration.targets import parse_targets
    from sweep_scale import MAX_TARGETS, target_specs
    specs = target_specs(1000)
    assert len(set(specs)) == 1000
    targets = parse_targets(specs, "next")
    assert len({t.slug for t in targets}) == 1000      # each its own folder, study and MLflow run
    with pytest.raises(SystemExit, match="distinct ones exist"):
        target_specs(MAX_TARGETS + 1)


def test_rebind_restored_pins_the_tuner_internals_it_uses():
    """The restore path swaps the unpickled scheduler and callbacks on Ray's private TunerInternal; a Ray
    upgrade that renames them must fail here and in the sweep, by name, not resume with stale callbacks."""
    from ray import tune

    from orchestration.sweep import _rebind_restored

    tuner = tune.Tuner(lambda config: None, tune_config=tune.TuneConfig(num_samples=1))
    sched, cb = object(), object()
    _rebind_restored(tuner, sched, [cb])
    assert tuner._local_tuner._tune_config.scheduler is sched
    assert tuner._local_tuner._run_config.callbacks == [cb]

    class Renamed:                                        # negative control: what a Ray without them looks like
        _local_tuner = type("Inner", (), {"_config": None})()
    with pytest.raises(RuntimeError, match=r"--resume: Ray .* _local_tuner"):
        _rebind_restored(Renamed(), sched, [cb])


def test_the_suite_keeps_caches_out_of_home():
    from sfd.evaluate.forgetting import cache_dir
    from sfd.stage1 import cache_root
    home = Path.home().resolve()
    for path in (cache_root(), cache_dir()):
        assert home not in Path(path).resolve().parents, f"{path}: a test run would write into {home}"


@pytest.fixture
def store(tmp_path):
    from orchestration.tracking import MLflowSweep
    return MLflowSweep(f"sqlite:///{tmp_path / 'mlflow.db'}", "scale")


def test_search_pages_through_every_run(store, monkeypatch):
    from types import SimpleNamespace

    from orchestration.targets import parse_targets
    store.start_parent("sweep", {}, {})
    targets = parse_targets(["digits:0->1", "digits:2->3"], "next")
    for i in range(7):
        store.start_trial(f"t{i}", targets[i % 2], i < 2, {})
    calls = []
    real = store.client.search_runs

    def small_pages(ids, filter_string="", max_results=1000, page_token=None):
        calls.append(page_token)
        return real(ids, filter_string=filter_string, max_results=3, page_token=page_token)
    monkeypatch.setattr(store.client, "search_runs", small_pages)
    found = store._children(None, "trial")
    assert sorted(r.data.tags["trial_id"] for r in found) == [f"t{i}" for i in range(7)]
    assert len(calls) == 3                                # 3 + 3 + 1: every page read, in one search
    del SimpleNamespace


def test_end_open_runs_ends_only_this_sweeps_running_runs(store):
    from orchestration.targets import parse_targets
    from orchestration.tracking import MLflowSweep
    store.start_parent("sweep", {}, {})
    t = parse_targets(["digits:0->1"], "next")[0]
    done, open_ = store.start_trial("a", t, True, {}), store.start_trial("b", t, False, {})
    store.finish(done, "finished")
    other = MLflowSweep(store.uri, "scale")               # another sweep in the same experiment
    other.start_parent("other", {}, {})
    foreign = other.start_trial("c", t, True, {})
    ended = store.end_open_runs("interrupted")
    assert set(ended) == {open_, store.target_runs[t.name]}
    status = {r: store.client.get_run(r).info.status for r in (done, open_, foreign)}
    assert status == {done: "FINISHED", open_: "KILLED", foreign: "RUNNING"}


@pytest.mark.slow
def test_benchmark_runs_the_real_sweep_and_reports_its_costs(tmp_path):
    """1 and 2 targets x 2 trials through benchmarks/sweep_scale.py: its report has every figure for the size, the
    fresh re-evaluations ran as Ray tasks (cached per trial, the same figures the driver computes, no
    evaluation on the driver), and the run wrote nothing into $HOME."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HOME": str(home),
           "SFD_CACHE": str(tmp_path / "cache")}
    report, png = tmp_path / "report.json", tmp_path / "scale.png"
    p = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "1,2", "--out", str(tmp_path / "runs"),
                        "--report", str(report), "--plot", str(png)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(report.read_text())
    assert [s["targets"] for s in r["sizes"]] == [1, 2]
    for s in r["sizes"]:
        assert s["exit"] == 0 and s["trials"] == s["planned_trials"] == 2 * s["targets"]
        for key in ("wall_s", "driver_cpu_s", "driver_peak_rss_mib", "mlflow_mib", "optuna_mib", "tune_state_mib",
                    "summary_s", "mlflow_write_s_per_trial"):
            assert s[key] > 0, (key, s)
        # the driver evaluated nothing: the phase that reads the fresh figures spent (almost) no CPU
        assert s["phases"]["fresh_on_driver"]["cpu_s"] < 0.5 and "fresh_wait" in s["phases"], s["phases"]
    assert set(r["growth"]) >= {"wall_s", "driver_peak_rss_mib"} and png.stat().st_size > 10_000
    assert "| growth exponent k |" in p.stdout
    # the cached fresh figures are what the driver itself would measure on the same run
    from sfd.runs import evaluate_run
    out = tmp_path / "runs" / "n2"
    cached = sorted(out.glob("trials/*/*/evaluation_fresh_seed4242.json"))
    assert len(cached) >= 2                               # each target's best and baseline (one trial may be both)
    mine = json.loads(cached[0].read_text())
    again = evaluate_run(cached[0].parent, seed=4242)
    assert mine["ua"] == pytest.approx(again["ua"]) and mine["fd_ratio"] == pytest.approx(again["fd_ratio"], rel=1e-4)
    import pandas as pd
    summary = pd.read_parquet(out / "summary.parquet")
    assert summary["fd_ratio_fresh"].notna().all() and summary["baseline_fd_ratio_fresh"].notna().all()
    assert sorted(str(x.relative_to(home)) for x in home.rglob("*")) == []


def test_an_attempt_tune_never_saved_is_tagged_superseded(store):
    """After a kill -9 as a trial starts, the resumed sweep asks its configuration again under another trial id;
    the first attempt's KILLED run is tagged, the runs of the table's trials (KILLED ones included) are not."""
    from orchestration.targets import parse_targets
    store.start_parent("sweep", {}, {})
    t = parse_targets(["digits:0->1"], "next")[0]
    done = store.start_trial("a", t, True, {})
    orphan, cut = store.start_trial("b", t, False, {}), store.start_trial("c", t, False, {})
    store.finish(done, "finished")
    store.end_open_runs("interrupted")                    # what --summarize-only / --resume do to a dead driver's
    again = store.start_trial("d", t, False, {})
    store.finish(again, "finished")
    assert store.mark_superseded(["a", "c", "d"]) == [orphan]
    tags = {r: store.client.get_run(r).data.tags for r in (done, orphan, cut, again)}
    assert tags[orphan]["superseded"] == "true" and "ran this configuration again" in tags[orphan]["note"]
    assert not any("superseded" in tags[r] for r in (done, cut, again))   # control: rows of the table untouched
    assert store.mark_superseded(["a", "c", "d"]) == []   # once
