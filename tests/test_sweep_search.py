"""The search's own machinery, called directly (no Ray cluster): the per-target early stopping
(orchestration/pruning.py) -- rungs, the rule, targets kept apart, the baseline never stopped, its
state across a resume -- and the warm starts of a target's study from the targets before it
(orchestration/search.py), down to the trial table and the summary."""
import math

import pytest

from orchestration.pruning import PerTargetHalving, milestones, rung_score


def rep(kimg, fd_ratio, ua=1.0):
    return {"kimg": kimg, "fd_ratio": fd_ratio, "ua": ua, "override_fd_ratio": 5.0}


def test_milestones_and_score():
    assert milestones(2, 3, 20) == [2, 6]                # 18 > 20 / 2: too late to save much
    assert milestones(1, 2, 16) == [1, 2, 4, 8]
    assert milestones(2, 3, 2) == [] and milestones(2, 3, 1) == []
    assert milestones(6, 3, 10) == [6]                   # the grace rung alone when it is past half the budget
    assert rung_score({"ua": 1.0, "fd_ratio": 1.5}, 0.99) == pytest.approx(1.5)
    assert rung_score({"ua": 0.94, "fd_ratio": 1.5}, 0.99) == pytest.approx(1.5 * 1.5)   # 0.05 short: x1.5
    assert math.isinf(rung_score({"ua": 1.0, "fd_ratio": math.nan}, 0.99))
    assert math.isinf(rung_score({"loss": 1.0}, 0.99))
    with pytest.raises(ValueError, match="reduction factor 1"):
        PerTargetHalving(2, 1, 0.99)
    with pytest.raises(ValueError, match="grace 0"):
        PerTargetHalving(0, 3, 0.99)


def test_asha_rule_keeps_the_best_third_and_never_stops_the_baseline():
    h = PerTargetHalving(2, 3, 0.99)
    assert h.on_result("base", "A", True, 20, rep(2.0, 2.0)) is None          # first at the rung
    assert h.on_result("good", "A", False, 20, rep(2.0, 1.5)) is None         # better than the baseline
    why = h.on_result("bad", "A", False, 20, rep(2.0, 2.5))
    assert why and why.startswith("early stop at the 2-kimg rung of A") and "3 trials" in why
    assert h.pruned == {"bad": why} and h.pruned_kimg == {"bad": 2.0}
    # a baseline worse than everyone at a rung still continues
    assert h.on_result("base", "A", True, 20, rep(6.0, 9.0)) is None
    # the same trial does not record a rung twice (a later report, or a resumed trial)
    assert h.on_result("good", "A", False, 20, rep(4.0, 50.0)) is None
    assert set(h.rungs["A"]["2"]) == {"base", "good", "bad"}
    # a checkpoint-only report (no figures) decides nothing
    assert h.on_result("late", "A", False, 20, {"kimg": 6.0}) is None


def test_a_trial_is_never_stopped_by_another_targets_trials():
    """Target B's trials are all far better than A's; A's trial is compared with A's only."""
    h = PerTargetHalving(2, 3, 0.99)
    for i, fd in enumerate((0.5, 0.6, 0.7, 0.8)):
        h.on_result(f"b{i}", "B", i == 0, 20, rep(2.0, fd))
    h.on_result("a-base", "A", True, 20, rep(2.0, 3.0))
    assert h.on_result("a1", "A", False, 20, rep(2.0, 2.9)) is None      # best of A at the rung: continues
    assert set(h.rungs["A"]["2"]) == {"a-base", "a1"}                    # B's scores are not in A's rung
    # negative control: the same trial in one shared set of rungs (what one ASHA over the whole sweep
    # does) is stopped by B's trials
    shared = PerTargetHalving(2, 3, 0.99)
    for i, fd in enumerate((0.5, 0.6, 0.7, 0.8)):
        shared.on_result(f"b{i}", "all", i == 0, 20, rep(2.0, fd))
    shared.on_result("a-base", "all", True, 20, rep(2.0, 3.0))
    assert shared.on_result("a1", "all", False, 20, rep(2.0, 2.9)) is not None


def test_rungs_survive_a_resume(tmp_path):
    path = tmp_path / "early_stop.json"
    h = PerTargetHalving(2, 3, 0.99, path=path)
    h.on_result("base", "A", True, 20, rep(2.0, 1.0))
    h.on_result("x", "A", False, 20, rep(2.0, 1.2))
    assert "x" in h.pruned and path.is_file()
    again = PerTargetHalving(2, 3, 0.99, path=path)                       # the resumed sweep's
    assert again.rungs == h.rungs and again.pruned == h.pruned
    # a new trial is compared with the scores recorded before the interruption
    assert again.on_result("y", "A", False, 20, rep(2.0, 1.1)) is not None
    # a resumed trial reporting the same rung again is not recorded (nor judged) twice
    assert again.on_result("base", "A", True, 20, rep(2.0, 5.0)) is None
    assert again.rungs["A"]["2"]["base"] == pytest.approx(1.0)
    # negative control: without the file the new trial would have been the first at its rung
    assert PerTargetHalving(2, 3, 0.99).on_result("y", "A", False, 20, rep(2.0, 1.1)) is None
    with pytest.raises(ValueError, match="--grace-kimg"):
        PerTargetHalving(4, 3, 0.99, path=path)


def _searcher(targets, n, warm, pruned=None):
    from orchestration.search import PerTargetSearch
    from orchestration.space import load_space, space_path
    from orchestration.targets import parse_targets

    space = load_space(space_path("digits"))
    return PerTargetSearch(parse_targets(targets), {"digits": space}, trials_per_target=n, ua_threshold=0.99,
                           warm_start=warm, pruned=pruned), space


def test_targets_one_after_the_other_and_warm_starts():
    s, space = _searcher(["digits:0->1", "digits:1->2"], 3, warm=2)
    a = [s.suggest(f"a{i}") for i in range(3)]
    assert [c["target"] for c in a] == ["digits:0->1"] * 3                # all of A's trials first
    assert not any(c["warm_start_from"] for c in a)                       # nothing finished before A
    s.on_trial_complete("a0", {"ua": 0.995, "fd_ratio": 1.5, "override_fd_ratio": 1.0})   # the baseline
    s.on_trial_complete("a1", {"ua": 1.0, "fd_ratio": 1.2, "override_fd_ratio": 2.0})
    s.on_trial_complete("a2", {"ua": 0.5, "fd_ratio": 1.0, "override_fd_ratio": 1.0})     # infeasible
    b = [s.suggest(f"b{i}") for i in range(3)]
    assert [c["target"] for c in b] == ["digits:1->2"] * 3
    assert b[0]["baseline"] and b[0]["params"] == space.baseline_point() and not b[0]["warm_start_from"]
    # B's first searched trial is A's best completed, feasible, searched configuration
    assert b[1]["warm_start_from"] == "digits:0->1#1" and b[1]["params"] == a[1]["params"]
    # the next one is not: neither A's baseline nor its infeasible trial is lent, and a1 is used
    assert not b[2]["warm_start_from"] and b[2]["params"] != a[1]["params"]
    # negative control: warm starts off
    s0, _ = _searcher(["digits:0->1", "digits:1->2"], 3, warm=0)
    [s0.suggest(f"a{i}") for i in range(3)]
    s0.on_trial_complete("a1", {"ua": 1.0, "fd_ratio": 1.2, "override_fd_ratio": 2.0})
    assert not any(s0.suggest(f"b{i}")["warm_start_from"] for i in range(3))


def test_a_trial_stopped_early_is_pruned_in_its_study_and_not_lent():
    pruned = {}
    s, _ = _searcher(["digits:0->1", "digits:1->2"], 2, warm=1, pruned=pruned)
    s.suggest("a0"), s.suggest("a1")
    pruned["a1"] = "early stop at the 2-kimg rung of digits:0->1: ..."
    s.on_trial_complete("a0", {"ua": 1.0, "fd_ratio": 1.5, "override_fd_ratio": 1.0})
    s.on_trial_complete("a1", {"ua": 1.0, "fd_ratio": 1.0, "override_fd_ratio": 1.0, "kimg": 2.0})
    t = s.studies["digits:0->1"].trials[1]
    assert t.state.name == "PRUNED" and t.user_attrs["stopped_reason"].startswith("early stop")
    assert t.user_attrs["stopped_kimg"] == 2.0
    s.suggest("b0")
    assert not s.suggest("b1")["warm_start_from"]                          # a pruned trial is no warm start


def test_summary_counts_early_stops_warm_starts_and_margins(tmp_path):
    from orchestration.results import summarise, summary_markdown
    from orchestration.targets import parse_targets

    targets = parse_targets(["digits:0->1"])

    def row(tid, fd, baseline=False, status="finished", note="", warm=""):
        return {"target": "digits:0->1", "method": "sfd", "trial_id": tid, "baseline": baseline, "status": status,
                "note": note, "warm_start_from": warm, "ua": 1.0, "fd_ratio": fd, "fd_remaining": fd / 10,
                "fd_remaining_teacher": 0.1, "override_fd_ratio": 1.0, "remaining_accuracy": 0.99,
                "train_seconds": 1.0, "run_dir": str(tmp_path / tid), "param_lr_gen": 1e-4}
    rows = [row("b", 1.5, baseline=True), row("w", 1.2, warm="digits:9->0#3"),
            row("s", 3.0, status="stopped", note="early stop at the 2-kimg rung of digits:0->1: ..."),
            row("h", 9.0, status="stopped", note="UA 0.1 < 0.5 after 10 kimg")]
    df = summarise(rows, targets, tmp_path, 0.99, 3.0)
    r = df.iloc[0]
    assert (r["started"], r["stopped_early"], r["warm_starts"]) == (4, 1, 1)
    assert r["best_trial"] == "w" and r["best_warm_start_from"] == "digits:9->0#3"
    text = (tmp_path / "summary.md").read_text()
    assert "warm start from digits:9->0#3" in text and "stopped early, per target: 1" in text
    # the margins line: fresh figures given by hand (the re-evaluation itself needs run folders)
    df = df.assign(search_improved=[True], fd_ratio_fresh=[1.25], baseline_fd_ratio_fresh=[1.6],
                   ua_fresh=[1.0], override_fd_ratio_fresh=[1.0], search_margin_fresh=[0.35])
    md = summary_markdown(df, 0.99, 3.0, fresh_seed=4242)
    assert "**1/1**" in md and "digits:0->1 1.60 -> 1.25" in md


def test_bad_early_stop_flags_are_refused(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent
    for flags, needle in ((["--early-stop", "--grace-kimg", "0"], "--grace-kimg 0.0 is invalid"),
                          (["--early-stop", "--reduction-factor", "1"], "--reduction-factor 1.0 is invalid"),
                          (["--warm-starts", "-1"], "--warm-starts -1 is invalid"),
                          # with early stopping turned off, its settings are a mistake, said so
                          (["--no-early-stop", "--grace-kimg", "4"], "--grace-kimg 4.0 sets the per-target early "
                                                                     "stopping, which is off — add --early-stop")):
        r = subprocess.run([sys.executable, str(repo / "orchestration" / "sweep.py"), "--targets", "digits:1",
                            *flags, "--out", str(tmp_path / "o"), "--dry-run"], cwd=repo, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and needle in r.stderr, r.stderr
        assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_tiny_sweep_stops_per_target_and_warm_starts(tmp_path, monkeypatch):
    """A real sweep: 2 targets x 4 trials (1 kimg each, rungs at 0.25 kimg); reduction factor 100, so at
    the rung only a trial best so far for its target continues."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import pandas as pd
    import yaml
    from mlflow.tracking import MlflowClient

    from orchestration.space import space_path

    repo = Path(__file__).resolve().parent.parent
    monkeypatch.setenv("SFD_CACHE", str(tmp_path / "cache"))
    doc = yaml.safe_load(space_path("digits").read_text())
    doc["trial"] = {"budget_kimg": 1.0, "eval_every_kimg": 0.25, "checkpoint_every_kimg": 0.5,
                    "eval_forget_samples": 60, "eval_remain_per_class": 20, "eval_at_start": False}
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(doc))
    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, str(repo / "orchestration" / "sweep.py"), "--targets", "digits:0->1",
                        "digits:5", "--trials-per-target", "4", "--space", str(space), "--out", str(out),
                        "--num-cpus", "2", "--ua-threshold", "0.0", "--early-stop", "--grace-kimg", "0.25",
                        "--reduction-factor", "100", "--warm-starts", "2", "--fresh-seed", "-1"], cwd=repo, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = pd.read_parquet(out / "trials.parquet")
    assert trials.groupby("target").size().to_dict() == {"digits:0->1": 4, "digits:5->6": 4}
    early = trials[trials["note"].str.startswith("early stop")]
    state = json.loads((out / "early_stop.json").read_text())
    assert len(early) >= 1 and set(early["trial_id"]) == set(state["pruned"])
    for _, t in early.iterrows():
        assert t["status"] == "stopped" and not t["baseline"] and f"rung of {t['target']}" in t["note"]
        assert t["kimg"] < 1.0
    # each target's rungs hold its own trials only
    for target, rungs in state["rungs"].items():
        own = set(trials[trials["target"] == target]["trial_id"])
        assert all(set(rung) <= own for rung in rungs.values())
    assert not trials[trials["baseline"]]["note"].str.startswith("early stop").any()
    # MLflow: the reason on the stopped trial's run
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sfd-sweep")
    runs = {r.data.tags.get("trial_id"): r for r in client.search_runs([exp.experiment_id], "tags.kind = 'trial'")}
    for tid in early["trial_id"]:
        assert runs[tid].data.tags["stop_reason"].startswith("early stop")
    # a warm start names a trial of the other target that ran its whole budget, with its parameters
    params = [c for c in trials.columns if c.startswith("param_")]
    for _, t in trials[trials["warm_start_from"] != ""].iterrows():
        origin, number = t["warm_start_from"].split("#")
        assert origin != t["target"]
        src = trials[(trials["target"] == origin) & (trials[params] == t[params]).all(axis=1)
                     & (trials["trial_id"] != t["trial_id"])]
        assert len(src) == 1 and src.iloc[0]["status"] == "finished" and not src.iloc[0]["baseline"]
    summary = pd.read_parquet(out / "summary.parquet")
    assert summary["started"].tolist() == [4, 4]
    assert summary["stopped_early"].sum() == len(early)
    assert "Configurations started per target: 4–4" in (out / "summary.md").read_text()


def test_searcher_state_survives_a_resume(tmp_path):
    """Tune keeps the searcher in tuner.pkl and its save() file; the studies live in Optuna's storage. A
    resumed sweep's searcher sees the warm starts and pruned trials of the interrupted one."""
    import pickle

    from orchestration.search import PerTargetSearch
    from orchestration.space import load_space, space_path
    from orchestration.targets import parse_targets

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    targets = parse_targets(["digits:0->1", "digits:1->2"])
    spaces = {"digits": load_space(space_path("digits"))}
    pruned = {}
    s = PerTargetSearch(targets, spaces, 3, ua_threshold=0.99, storage=storage, warm_start=1, pruned=pruned)
    a = [s.suggest(f"a{i}") for i in range(3)]
    s.on_trial_complete("a0", {"ua": 1.0, "fd_ratio": 1.5, "override_fd_ratio": 1.0})
    s.on_trial_complete("a1", {"ua": 1.0, "fd_ratio": 1.2, "override_fd_ratio": 1.0})
    pruned["a2"] = "early stop at the 2-kimg rung of digits:0->1: ..."
    s.on_trial_complete("a2", {"ua": 1.0, "fd_ratio": 0.9, "override_fd_ratio": 1.0, "kimg": 2.0})
    s.suggest("b0")
    s.save(str(tmp_path / "searcher.json"))
    # the interrupted sweep's searcher, as Tune restores it
    r = pickle.loads(pickle.dumps(s))
    r.restore(str(tmp_path / "searcher.json"))
    r.pruned = {}                                                    # this run's record (sweep._rebind_restored)
    b1 = r.suggest("b1")
    assert b1["warm_start_from"] == "digits:0->1#1" and b1["params"] == a[1]["params"]
    assert r.studies["digits:0->1"].trials[2].state.name == "PRUNED"
    # one warm start per target: the next searched trial is TPE's
    assert not r.suggest("b2")["warm_start_from"]


def test_the_sweep_scheduler_stops_per_target_and_never_at_the_end():
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from orchestration.sweep import HopelessTrialStopper, make_scheduler

    stopper = HopelessTrialStopper(10.0, 0.5)
    h = PerTargetHalving(2, 3, 0.99)
    sched = make_scheduler(stopper, h)

    def trial(tid, target, baseline=False, method="sfd"):
        return SimpleNamespace(trial_id=tid, config={"target": target, "baseline": baseline, "method": method,
                                                     "sfd": {"budget_kimg": 20.0}})
    assert sched.on_trial_result(None, trial("b", "A", True), rep(2.0, 1.0)) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, trial("x", "A"), rep(2.0, 3.0)) == TrialScheduler.STOP
    assert stopper.stopped["x"].startswith("early stop at the 2-kimg rung of A")
    # another target's trial, as bad, is the first at its own target's rung
    assert sched.on_trial_result(None, trial("y", "B"), rep(2.0, 3.0)) == TrialScheduler.CONTINUE
    # a report at the end of the budget stops nothing (a baseline method reports only there)
    assert sched.on_trial_result(None, trial("z", "A"), rep(20.0, 9.0)) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, trial("e", "A", method="esd"), rep(2.0, 9.0)) == TrialScheduler.CONTINUE
    # early stopping off (the default): only the hopeless-trial stop
    off = make_scheduler(HopelessTrialStopper(10.0, 0.5), None)
    assert off.on_trial_result(None, trial("x", "A"), rep(2.0, 3.0)) == TrialScheduler.CONTINUE


def test_progress_best_so_far_counts_whole_trials_only(capsys):
    from types import SimpleNamespace

    from orchestration.sweep import Progress
    from orchestration.targets import parse_targets

    p = Progress(parse_targets(["digits:0->1"]), {"digits:0->1": 3}, 0.99)
    t = SimpleNamespace(config={"target": "digits:0->1"}, trial_id="x")
    p("stopped", t, {"ua": 1.0, "fd_ratio": 1.1})            # early figures, stopped at a rung
    assert "no trial at the UA threshold yet" in capsys.readouterr().out
    p("finished", t, {"ua": 1.0, "fd_ratio": 1.6})
    assert "best so far UA 1.000, FD ratio 1.60" in capsys.readouterr().out


def test_studies_open_when_their_target_starts(tmp_path):
    """A sweep of many targets opens a target's study when its first trial is asked for, not every study
    before the first trial (at 1,000 targets that was minutes before anything trained, and again at every
    resume); a resume still finds an orphan RUNNING trial in a study this process has not opened."""
    import optuna

    from orchestration.search import PerTargetSearch
    from orchestration.space import load_space, space_path
    from orchestration.targets import parse_targets

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    names = [f"digits:{a}->{(a + 1) % 10}" for a in range(10)] + [f"digits:{a}+{(a + 1) % 10}->{(a + 2) % 10}"
                                                                   for a in range(10)]
    s = PerTargetSearch(parse_targets(names), {"digits": load_space(space_path("digits"))}, 2,
                        ua_threshold=0.99, storage=url)

    def held():
        return {x.study_name for x in optuna.get_all_study_summaries(url, include_best_trial=False)}
    assert held() == set() and dict(s.studies) == {}
    first = s.suggest("t0")
    assert first["baseline"] and held() == {names[0]}              # only the first target's study exists
    s.suggest("t1"), s.suggest("t2")                                 # t2 opens the second target's study
    assert held() == {names[0], names[1]}
    s.save(str(tmp_path / "searcher.json"))
    s.suggest("t3")                                                  # asked after Tune's last checkpoint
    r = PerTargetSearch(parse_targets(names), {"digits": load_space(space_path("digits"))}, 2,
                        ua_threshold=0.99, storage=url)
    r.restore(str(tmp_path / "searcher.json"))
    orphan = optuna.load_study(study_name=names[1], storage=url).trials[1]
    assert orphan.user_attrs["tune_trial_id"] == "t3" and orphan.state.name == "FAIL"
    assert held() == {names[0], names[1]}                            # restoring opened no other target's


def _space_with(tmp_path, policy: str):
    """The shipped digits space with its search-policy lines (early_stop, warm_starts) replaced by ``policy``."""
    from orchestration.space import space_path
    lines = [ln for ln in space_path("digits").read_text().splitlines()
             if not ln.startswith(("early_stop:", "warm_starts:"))]
    path = tmp_path / "digits.yaml"
    path.write_text("\n".join(lines) + "\n" + policy + "\n")
    return path


def test_space_search_policy_is_the_sweeps_default(tmp_path):
    """A space's ``early_stop`` and ``warm_starts`` set the sweep's early stopping and warm starts unless a flag
    does; a space without them leaves both off (the negative control: the policy comes from the space)."""
    from orchestration.space import load_space
    from orchestration.sweep import apply_search_policy, build_parser

    on = load_space(_space_with(tmp_path, "early_stop: {grace_kimg: 5, reduction_factor: 1.5}\nwarm_starts: 2"))
    assert on.early_stop == {"grace_kimg": 5.0, "reduction_factor": 1.5} and on.warm_starts == 2
    assert on.for_method("esd").early_stop == on.early_stop          # a baseline method's view keeps it

    def resolved(flags, space):
        a = build_parser().parse_args(["--targets", "digits:1", *flags])
        apply_search_policy(a, {"digits": space})
        return a.early_stop, a.grace_kimg, a.reduction_factor, a.warm_starts

    assert resolved([], on) == (True, 5.0, 1.5, 2)
    assert resolved(["--grace-kimg", "3"], on) == (True, 3.0, 1.5, 2)          # a flag wins
    assert resolved(["--no-early-stop", "--warm-starts", "0"], on) == (False, None, None, 0)
    off = load_space(_space_with(tmp_path, ""))
    assert (off.early_stop, off.warm_starts) == ({}, 0)
    assert resolved([], off) == (False, None, None, 0)
    assert resolved(["--early-stop", "--warm-starts", "1"], off)[::3] == (True, 1)


@pytest.mark.parametrize("policy, needle", [
    ("early_stop: {grace_kimg: 0, reduction_factor: 1.5}", "early_stop.grace_kimg 0 is invalid"),
    ("early_stop: {grace_kimg: 5, reduction_factor: 1}", "early_stop.reduction_factor 1 is invalid"),
    ("early_stop: {grace_kimg: 5}", "exactly grace_kimg and reduction_factor"),
    ("early_stop: [5, 1.5]", "early_stop must be false or a mapping"),
    ("warm_starts: -1", "warm_starts must be a whole number >= 0"),
    ("warm_starts: 1.5", "warm_starts must be a whole number >= 0"),
])
def test_bad_space_search_policy_is_refused(tmp_path, policy, needle):
    from orchestration.space import load_space
    with pytest.raises(ValueError, match=needle.replace(".", r"\.").replace("[", r"\[")):
        load_space(_space_with(tmp_path, policy))


def test_shipped_digits_space_turns_the_search_policy_on(tmp_path, capsys):
    """search_spaces/digits.yaml sets the main job's early stopping (5 kimg, x1.5) and 2 warm starts; the dry run
    says so, and a flag still turns either off."""
    from orchestration.sweep import main
    assert main(["--targets", "digits:3", "--dry-run", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "early stopping: per target from 5 kimg" in out and "warm starts: up to 2 per target" in out, out
    assert main(["--targets", "digits:3", "--no-early-stop", "--warm-starts", "0", "--dry-run",
                 "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "early stopping: off" in out and "warm starts: off" in out, out


def test_resume_keeps_the_search_policy_the_sweep_started_with(tmp_path):
    """The sweep record holds the early stopping and warm starts it ran with: --resume under another policy
    (a flag, or a space whose default changed since) is refused naming it; the same policy resumes; a record
    from before the policy was recorded is not compared on it."""
    import json
    from orchestration.sweep import SweepError, apply_budget, build_parser, check_flags, claim_out, resolve

    def args(*flags):
        a = build_parser().parse_args(["--targets", "digits:0", "--out", str(tmp_path / "s"), *flags])
        check_flags(a)
        targets, spaces, _ = resolve(a)
        apply_budget(a, spaces)
        check_flags(a)
        return a, targets

    a, targets = args()
    rec = claim_out(a, targets)
    assert (rec["early_stop"], rec["warm_starts"]) == ([5.0, 1.5], 2)      # the shipped digits space's policy
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text(json.dumps({**rec, "status": "interrupted"}))
    assert claim_out(*args("--resume"))["sweep_id"] == rec["sweep_id"]
    with pytest.raises(SweepError, match=r"early_stop: \[5\.0, 1\.5\] in s vs None now.*--no-early-stop"):
        claim_out(*args("--resume", "--no-early-stop"))
    with pytest.raises(SweepError, match=r"warm_starts: 2 in s vs 0 now"):
        claim_out(*args("--resume", "--warm-starts", "0"))
    legacy = {k: v for k, v in rec.items() if k not in ("early_stop", "warm_starts")}
    (tmp_path / "s" / "sweep.json").write_text(json.dumps({**legacy, "status": "interrupted"}))
    assert claim_out(*args("--resume", "--no-early-stop"))["sweep_id"] == rec["sweep_id"]
