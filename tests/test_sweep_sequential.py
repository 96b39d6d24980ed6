"""`sweep.py --sequential`: a chain of per-stage sweeps (orchestration/sequential.py) against the joint sweep."""
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from orchestration import sweep
from orchestration.sequential import RECORD, ChainError, plan_chain, run_chain


# -- the plan ------------------------------------------------------------------------------------------------
def test_plan_resolves_next_against_the_chain_and_adds_the_joint_sweep():
    stages = plan_chain(["digits:3,5,8"], "next")
    assert [s.target.name for s in stages] == ["digits:3->4", "digits:5->6", "digits:8->9", "digits:3+5+8->4,6,9"]
    assert [s.index for s in stages] == [1, 2, 3, 0]
    assert stages[2].forgotten == (("3", "4"), ("5", "6"), ("8", "9"))
    # 'next' skips what an earlier stage forgot, as `sfd forget --init-from` does: 4 then 3 -> 3 goes to 5, not 4
    assert [s.target.name for s in plan_chain(["digits:4", "digits:3"], "next", joint=False)] == \
        ["digits:4->5", "digits:3->5"]
    # explicit overrides stay; text presets chain too
    assert [s.target.name for s in plan_chain(["colordigits:seven->one", "colordigits:red->blue"], "next")] == \
        ["colordigits:seven->one", "colordigits:red->blue", "colordigits:seven+red->one,blue"]


@pytest.mark.parametrize("targets, words", [
    (["digits:3", "digits:3"], "stage 2 (digits:3->4) forgets '3' again — stage 1 forgot it"),
    (["digits:3,5", "digits:5->7"], "forgets '5' again"),
    (["digits:3", "digits:5->3"], "override 3 (for 5) was forgotten by an earlier stage"),
    (["digits:3->4", "digits:4"], "forget 4: it is the override of [3]"),
    (["digits:3", "colordigits:red"], "mix presets (colordigits, digits)"),
    (["digits:3"], "one target (digits:3->4) is no chain"),
    (["all_digits_classes"], "'all_digits_classes' forgets every class"),
    (["colordigits:seven->one", "colordigits:red->seven"], "override 'seven' is a digit but 'red' is a color"),
    (["colordigits:seven->one", "colordigits:two->seven"], "override 'seven' (for 'two') was forgotten"),
])
def test_bad_chains_are_refused_naming_the_stage_and_the_value(targets, words):
    with pytest.raises(ChainError) as e:
        plan_chain(targets, "next")
    assert words in str(e.value)


def test_a_chain_that_does_not_chain_is_refused_before_anything_starts(tmp_path, capsys):
    out = str(tmp_path / "c")
    for argv, words in [
        (["--targets", "digits:3", "digits:3"], "forgets '3' again"),
        (["--targets", "digits:3,5", "--methods", "sfd,esd"], "--sequential chains SFD runs"),
        (["--targets", "digits:3,5", "--targets-file", str(tmp_path / "t.yaml")], "takes its stages from --targets"),
    ]:
        assert sweep.main(["--sequential", *argv, "--out", out]) == 2
        err = capsys.readouterr().err
        assert "sweep.py: error:" in err and words in err, err
    assert sweep.main(["--sequential", "--targets", "digits:3,5", "--summarize-only", "--out", out]) == 2
    assert "a chain's stages are sweeps of their own" in capsys.readouterr().err
    assert sweep.main(["--targets", "digits:3", "--no-joint", "--out", out]) == 2
    assert "--no-joint belongs to --sequential" in capsys.readouterr().err
    assert not Path(out).exists()                     # nothing written


def test_dry_run_prints_the_stages(tmp_path, capsys):
    assert sweep.main(["--sequential", "--targets", "digits:3,5,8", "--dry-run", "--out", str(tmp_path / "c")]) == 0
    text = capsys.readouterr().out
    assert "stage 2: digits:5->6 (from stage 1's best trial; forgotten after it: 3->4, 5->6)" in text
    assert "joint: digits:3+5+8->4,6,9" in text and "3 stages x 2 trials" in text


def test_help_describes_sequential():
    text = sweep.build_parser().format_help()
    assert "--sequential" in text and "--no-joint" in text and "best trial" in text


# -- the driver, with a stand-in for each stage's sweep ------------------------------------------------------
class FakeStages:
    """Runs a stage as a sweep would leave it: one finished trial with metrics.json, trials/summary tables;
    ``stop`` names a target whose first run is interrupted (exit 130)."""

    def __init__(self, stop: str | None = None, ua: float = 1.0, fresh: bool = True):
        self.calls, self.stop, self.ua, self.fresh = [], stop, ua, fresh

    def __call__(self, sa, extra) -> int:
        target = sa.targets[0]
        self.calls.append({"target": target, "init_from": extra.get("init_from"), "resume": sa.resume,
                           "tags": sa.mlflow_tags, "out": sa.out})
        out = Path(sa.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text("{}")
        if target == self.stop:
            self.stop = None
            return 130
        forgot = [t.split("->")[0] for t in target.split(":")[1].split("+")]
        earlier = {}
        if extra.get("init_from"):
            earlier = json.loads((Path(extra["init_from"]) / "metrics.json").read_text())["ua_per_target"]
        run_dir = out / "trials" / "t" / f"trial{len(self.calls)}"
        run_dir.mkdir(parents=True)
        per = {**earlier, **{f: self.ua for f in target.split(":")[1].split("->")[0].split("+")}}
        (run_dir / "metrics.json").write_text(json.dumps({
            "ua": sum(per.values()) / len(per), "ua_per_target": per, "fd_ratio": 1.5, "kimg": 20.0,
            "rebound_per_target": {k: 0.0 for k in earlier}, "rebound_max": 0.0}))
        row = {"target": target, "trial_id": f"trial{len(self.calls)}", "status": "finished", "baseline": True,
               "ua": sum(per.values()) / len(per), "fd_ratio": 1.5, "run_dir": str(run_dir)}
        if self.fresh:                     # the sweep's re-evaluation of its pick (--fresh-seed 4242)
            (run_dir / "evaluation_fresh_seed4242.json").write_text(json.dumps({
                "ua_per_target": {k: v - 0.01 for k, v in per.items()}, "fd_ratio": 1.25}))
        pd.DataFrame([row]).to_parquet(out / "trials.parquet")
        best = row["trial_id"] if row["ua"] >= 0.99 else ""
        pd.DataFrame([{"target": target, "best_trial": best}]).to_parquet(out / "summary.parquet")
        assert forgot
        return 0


def _args(tmp_path, *more):
    a = sweep.build_parser().parse_args(["--sequential", "--targets", "digits:3,5,8", "--trials-per-target", "2",
                                         "--out", str(tmp_path / "chain"), *more])
    return a


def test_each_stage_starts_from_the_last_ones_best_and_the_tables_say_which_stage(tmp_path):
    a = _args(tmp_path)
    stages = plan_chain(a.targets, "next")
    fake = FakeStages()
    assert run_chain(a, stages, fake) == 0
    calls = fake.calls
    assert [c["target"] for c in calls] == ["digits:3->4", "digits:5->6", "digits:8->9", "digits:3+5+8->4,6,9"]
    assert calls[0]["init_from"] is None and calls[3]["init_from"] is None          # stage 1 and joint: preset start
    assert calls[1]["init_from"].endswith("stage1-digits_forget3_to_4/trials/t/trial1")
    assert calls[2]["init_from"].endswith("stage2-digits_forget5_to_6/trials/t/trial2")
    out = tmp_path / "chain"
    chain = pd.read_parquet(out / "chain.parquet")
    assert list(chain["stage"]) == ["1", "2", "3", "joint"]
    assert json.loads(chain.iloc[2]["ua_per_target"]) == {"3": 1.0, "5": 1.0, "8": 1.0}
    # the fresh re-evaluation of each pick beside its search-time figures
    assert chain.iloc[2]["ua_worst_fresh"] == pytest.approx(0.99) and chain.iloc[2]["fd_ratio_fresh"] == 1.25
    assert chain.iloc[2]["fd_ratio"] == 1.5
    trials = pd.read_parquet(out / "trials.parquet")
    assert list(trials["stage"]) == ["1", "2", "3", "joint"] and trials["stage_best"].all()
    assert list(trials["mode"]) == ["sequential"] * 3 + ["joint"]
    # MLflow: each stage's sweep nested in the chain's run
    from mlflow.tracking import MlflowClient
    rec = json.loads((out / RECORD).read_text())
    assert rec["status"] == "finished" and all(s["status"] == "finished" for s in rec["stages"])
    assert {c["tags"]["mlflow.parentRunId"] for c in calls} == {rec["chain_run_id"]}
    run = MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_run(rec["chain_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "chain"
    assert run.data.metrics["stage3_ua_8"] == 1.0 and run.data.metrics["final_ua_worst"] == 1.0
    assert "| 3 | digits:8->9 | finished |" in (out / "chain.md").read_text()
    assert "| 1.000 (0.990) |" in (out / "chain.md").read_text()


def test_resume_continues_at_the_stage_that_stopped(tmp_path, capsys):
    a = _args(tmp_path)
    stages = plan_chain(a.targets, "next")
    first = FakeStages(stop="digits:5->6")
    assert run_chain(a, stages, first) == 130
    assert [c["target"] for c in first.calls] == ["digits:3->4", "digits:5->6"]
    rec = json.loads((tmp_path / "chain" / RECORD).read_text())
    assert rec["status"] == "interrupted" and [s["status"] for s in rec["stages"]] == \
        ["finished", "interrupted", "pending", "pending"]
    # without --resume the folder is refused; with it, stage 1 is kept and stage 2 resumes its own sweep
    with pytest.raises(ChainError, match="pass --resume"):
        run_chain(a, stages, FakeStages())
    again = FakeStages()
    assert run_chain(_args(tmp_path, "--resume"), stages, again) == 0
    assert [c["target"] for c in again.calls] == ["digits:5->6", "digits:8->9", "digits:3+5+8->4,6,9"]
    assert again.calls[0]["resume"] is True and again.calls[1]["resume"] is False
    assert again.calls[0]["init_from"] == rec["stages"][0]["best_run"]                # from stage 1's best
    assert "stage 1 (digits:3->4): finished earlier" in capsys.readouterr().out
    # a finished chain resumed runs nothing
    done = FakeStages()
    assert run_chain(_args(tmp_path, "--resume"), stages, done) == 0 and done.calls == []


def test_resume_refuses_another_plan_or_teacher(tmp_path):
    a = _args(tmp_path)
    stages = plan_chain(a.targets, "next")
    assert run_chain(a, stages, FakeStages(stop="digits:5->6")) == 130
    with pytest.raises(ChainError, match="planned differently.*trials_per_target: 2"):
        run_chain(_args(tmp_path, "--resume", "--trials-per-target", "3"), stages, FakeStages())
    path = tmp_path / "chain" / RECORD
    rec = json.loads(path.read_text())
    assert rec["teacher_fingerprint"]                                  # recorded at the start
    path.write_text(json.dumps({**rec, "teacher_fingerprint": "0123456789abcdef"}))
    with pytest.raises(ChainError, match="distilled another teacher"):
        run_chain(_args(tmp_path, "--resume"), stages, FakeStages())


def test_a_stage_without_a_trial_at_the_threshold_continues_from_its_highest_ua(tmp_path):
    a = _args(tmp_path)
    stages = plan_chain(a.targets, "next", joint=False)
    a.no_joint = True
    assert run_chain(a, stages, FakeStages(ua=0.9, fresh=False)) == 0
    rec = json.loads((tmp_path / "chain" / RECORD).read_text())
    assert all("no trial reached UA >= 0.99: continued from the highest UA (0.900)" in s["note"] for s in rec["stages"])
    assert "continued from the highest UA" in (tmp_path / "chain" / "chain.md").read_text()
    assert pd.read_parquet(tmp_path / "chain" / "chain.parquet")["fd_ratio_fresh"].isna().all()   # none re-evaluated


# -- the real thing: Ray Tune, Optuna, MLflow, SFD trials ----------------------------------------------------
@pytest.mark.slow
def test_sequential_sweep_end_to_end(tmp_path, monkeypatch):
    """Two one-trial stages of 0.5 kimg and the joint sweep: stage 2's trial starts from stage 1's best trial and
    keeps 3 in its forget set (its metrics report both targets); a resumed finished chain reruns nothing."""
    monkeypatch.setenv("SFD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "chain"
    argv = ["--sequential", "--targets", "digits:3,5", "--trials-per-target", "1", "--budget-kimg", "0.5",
            "--fresh-seed", "-1", "--num-cpus", "2", "--max-concurrent", "1", "--out", str(out)]
    assert sweep.main(argv) == 0
    rec = json.loads((out / RECORD).read_text())
    s1, s2, joint = rec["stages"]
    assert [s["status"] for s in rec["stages"]] == ["finished"] * 3
    cfg2 = json.loads((Path(s2["best_run"]) / "metrics.json").read_text())["config"]
    assert cfg2["init_from"] == s1["best_run"]                 # stage 2 started from stage 1's best trial
    assert cfg2["forget"] == [3, 5] and cfg2["override"] == "4,6"     # and kept its forgotten set
    assert set(s2["figures"]["ua_per_target"]) == {"3", "5"} and "3" in s2["figures"]["rebound_per_target"]
    assert set(joint["figures"]["ua_per_target"]) == {"3", "5"}
    cfgj = json.loads((Path(joint["best_run"]) / "metrics.json").read_text())["config"]
    assert "stage1" in str(cfgj["init_from"])                  # the joint sweep starts from the preset's start
    trials = pd.read_parquet(out / "trials.parquet")
    assert list(trials["stage"]) == ["1", "2", "joint"]
    assert all(math.isfinite(v) for v in trials["ua"])
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sfd-sweep").experiment_id])
    sweeps = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    assert len(sweeps) == 3 and {r.data.tags["mlflow.parentRunId"] for r in sweeps} == {rec["chain_run_id"]}
    assert sorted(r.data.tags["chain_stage"] for r in sweeps) == ["1", "2", "joint"]
    n_runs = len(runs)
    assert sweep.main([*argv, "--resume"]) == 0                # finished: nothing reruns, no new runs
    assert len(client.search_runs([client.get_experiment_by_name("sfd-sweep").experiment_id])) == n_runs


@pytest.mark.parametrize("damage", ['{"kind": "sfd-seq', '{"kind": "sfd-sweep"}'])
def test_a_damaged_record_is_named_and_nothing_changes(tmp_path, damage, capsys):
    """A chain's record (and, the same helper, a sweep's) that is truncated or of another kind is refused with
    the file named and the way out; the folder is left as it was."""
    a = _args(tmp_path)
    stages = plan_chain(a.targets, "next")
    assert run_chain(a, stages, FakeStages(stop="digits:5->6")) == 130
    path = tmp_path / "chain" / RECORD
    path.write_text(damage)
    before = sorted(p.name for p in (tmp_path / "chain").iterdir())
    with pytest.raises(ChainError, match=f"{path} is corrupted .*--overwrite"):
        run_chain(_args(tmp_path, "--resume"), stages, FakeStages())
    assert path.read_text() == damage and sorted(p.name for p in (tmp_path / "chain").iterdir()) == before
    # the sweep's own record through the same reader
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text(damage.replace("sfd-sweep", "sfd-chain"))
    assert sweep.main(["--targets", "digits:3", "--out", str(out), "--resume"]) == 2       # refused before Ray starts
    assert f"{out / 'sweep.json'} is corrupted" in capsys.readouterr().err
