"""The sweep's decision rules on hand-made trial rows, called directly (no Ray cluster).

Each rule is checked where it could go wrong: the best-trial rule's threshold, diversity
preference and fallback; the Pareto front's dominance, ties and objective directions; the
hopeless-trial stopper; re-ranking a finished sweep; the long budget; the Pareto plot's front.
"""
import math

import pandas as pd

from orchestration.results import choose_best, pareto_front, write_table
from orchestration.search import METRICS, MODES


def row(tid, ua, fd_ratio, ofd, fd=None, status="finished", baseline=False, **kw):
    return {"trial_id": tid, "ua": ua, "fd_ratio": fd_ratio, "override_fd_ratio": ofd,
            "fd_remaining": fd if fd is not None else fd_ratio / 10, "status": status, "baseline": baseline, **kw}


def test_best_trial_rule():
    rows = [row("a", 0.999, 3.0, 2.0), row("b", 0.995, 2.0, 30.0),   # b: lowest FD but a collapse
            row("c", 0.90, 1.0, 1.0),                                # c: best FD, did not forget
            row("d", 1.0, 2.5, 5.0), row("e", 1.0, 0.5, 1.0, status="failed")]
    assert choose_best(rows, 0.99, 10.0)["trial_id"] == "d"            # diverse, at the threshold, lowest FD
    assert choose_best(rows, 0.99, 100.0)["trial_id"] == "b"           # diversity limit lifted
    assert choose_best(rows, 0.85, 10.0)["trial_id"] == "c"            # threshold lowered
    # no diverse trial at the threshold: fall back to every trial at the threshold
    assert choose_best([row("b", 0.995, 2.0, 30.0), row("f", 0.999, 4.0, 40.0)], 0.99, 10.0)["trial_id"] == "b"
    assert choose_best([row("c", 0.90, 1.0, 1.0)], 0.99, 10.0) is None
    assert choose_best([row("x", 1.0, math.nan, 1.0, fd=math.nan)], 0.99, 10.0) is None
    assert choose_best([row("e", 1.0, 0.5, 1.0, status="failed")], 0.99, 10.0) is None
    assert choose_best([], 0.99, 10.0) is None
    # a trial stopped early (its figures at its last rung, no exported generator) loses to any finished one
    # at the threshold, however low its FD; alone, it is still the best there is
    rows = [row("base", 1.0, 1.64, 1.1, baseline=True), row("stop", 0.9997, 1.56, 1.9, status="stopped")]
    assert choose_best(rows, 0.99, 3.0)["trial_id"] == "base"
    assert choose_best(rows[1:], 0.99, 3.0)["trial_id"] == "stop"
    assert choose_best([row("base", 0.98, 1.64, 1.1), rows[1]], 0.99, 3.0)["trial_id"] == "stop"


def test_best_trial_rule_boundaries_and_key():
    # UA exactly at the threshold and override FD ratio exactly at the limit both qualify
    rows = [row("at", 0.99, 2.0, 10.0), row("below", 0.9899, 1.0, 1.0), row("over", 1.0, 1.5, 10.01)]
    assert choose_best(rows, 0.99, 10.0)["trial_id"] == "at"
    # the rule ranks by the remaining-class FD itself (README), not by the FD ratio
    rows = [row("lowfd", 1.0, 3.0, 1.0, fd=0.20), row("lowratio", 1.0, 2.0, 1.0, fd=0.25)]
    assert choose_best(rows, 0.99, 10.0)["trial_id"] == "lowfd"


def test_pareto_front_dominance_ties_and_failures():
    rows = [row("a", 1.0, 2.0, 2.0), row("b", 0.99, 3.0, 3.0),       # b dominated by a
            row("c", 0.9, 1.0, 5.0), row("d", 1.0, 2.0, 2.0),        # d ties a exactly: both stay
            row("e", 1.0, 0.1, 0.1, status="failed"), row("f", 1.0, math.nan, 1.0)]
    assert pareto_front(rows) == {"a", "c", "d"}
    # better on one objective, worse on another: not dominated
    assert pareto_front([row("a", 1.0, 2.0, 2.0), row("g", 1.0, 1.5, 9.0)]) == {"a", "g"}
    # equal on two objectives, worse on the third: dominated
    assert pareto_front([row("a", 1.0, 2.0, 2.0), row("h", 1.0, 2.0, 2.5)]) == {"a"}
    assert pareto_front([]) == set()


def test_pareto_front_follows_the_search_objectives():
    assert list(zip(METRICS, MODES)) == [("ua", "max"), ("fd_ratio", "min"), ("override_fd_ratio", "min")]
    base = {"ua": 0.9, "fd_ratio": 2.0, "ofd": 2.0}
    for metric, mode in zip(METRICS, MODES):
        key = {"override_fd_ratio": "ofd"}.get(metric, metric)
        lo = row("lo", **{**base, key: base[key] - 0.05})
        hi = row("hi", **{**base, key: base[key] + 0.05})
        assert pareto_front([lo, hi]) == ({"hi"} if mode == "max" else {"lo"}), metric


def test_hopeless_trial_stopper():
    from orchestration.sweep import HopelessTrialStopper
    s = HopelessTrialStopper(ua_kimg=10, ua_min=0.5)

    def stops(result):
        why = s.verdict(result)
        assert why is not None, f"{result} should stop the trial"
        return why

    assert "loss_generator" in stops({"loss_generator": math.nan, "kimg": 1})
    assert "loss_fake_score" in stops({"loss_fake_score": -math.inf, "kimg": 1})
    assert "fd_remaining" in stops({"fd_remaining": math.inf, "kimg": 1, "ua": 1.0})
    assert s.verdict({"kimg": 5, "ua": 0.0}) is None                  # too early to judge
    assert "UA 0.200 < 0.5" in stops({"kimg": 10, "ua": 0.2})        # at the kimg
    stops({"kimg": 30, "ua": 0.1})                                    # after it
    assert s.verdict({"kimg": 10, "ua": 0.5}) is None                 # at the minimum is not below it
    assert s.verdict({"kimg": 20}) is None                            # no UA measured yet
    assert s.verdict({"kimg": 20, "ua": 0.7, "fd_remaining": 1.0, "loss_generator": -3.0,
                      "loss_fake_score": 0.2}) is None


def _fake_sweep(out):
    """A finished two-target sweep: trials.parquet written by the sweep's own writer."""
    rows = [row("t1", 1.0, 1.5, 30.0, target="digits:3->4", baseline=True),   # collapse (30x)
            row("t2", 0.995, 2.5, 2.0, target="digits:3->4"),
            row("t3", 0.95, 1.2, 1.0, target="digits:3->4"),                   # did not forget
            row("u1", 0.999, 3.0, 3.0, target="digits:5->6", baseline=True),
            row("u2", 0.5, 0.5, 1.0, target="digits:5->6", status="failed")]
    for r in rows:
        r.update(run_dir=str(out / "trials" / r["trial_id"]), fd_remaining_teacher=0.1,
                 remaining_accuracy=0.99, train_seconds=10.0, param_lr_gen=1e-4)
    write_table(pd.DataFrame(rows), out / "trials.parquet")


def test_summarize_only_reranks_a_finished_sweep(tmp_path, capsys):
    from orchestration.sweep import main
    _fake_sweep(tmp_path)

    def best(*flags):
        assert main(["--summarize-only", "--out", str(tmp_path), "--fresh-seed", "-1", *flags]) == 0
        df = pd.read_parquet(tmp_path / "summary.parquet").set_index("target")
        md = (tmp_path / "summary.md").read_text()
        by_md = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in md.splitlines()
                 if line.startswith("| digits:")}
        assert by_md == {t: b + (" (baseline)" if df.loc[t, "best_is_baseline"] else "")
                         for t, b in df["best_trial"].items()}                 # the Markdown agrees
        return df["best_trial"].to_dict()

    assert best() == {"digits:3->4": "t2", "digits:5->6": "u1"}      # t1 collapses, t3 did not forget
    assert best("--max-override-fd-ratio", "50") == {"digits:3->4": "t1", "digits:5->6": "u1"}
    assert best("--ua-threshold", "0.9", "--max-override-fd-ratio", "50") == {"digits:3->4": "t3",
                                                                              "digits:5->6": "u1"}
    assert (tmp_path / "pareto" / "digits_forget3_to_4.png").is_file()
    table = pd.read_parquet(tmp_path / "trials.parquet").set_index("trial_id")
    assert table["best"].to_dict() == {"t1": False, "t2": False, "t3": True, "u1": True, "u2": False}
    assert table["pareto"].to_dict() == {"t1": True, "t2": True, "t3": True, "u1": True, "u2": False}
    # a target with no trial at the UA threshold has no best, and the re-ranking says so (exit 1)
    assert main(["--summarize-only", "--out", str(tmp_path), "--fresh-seed", "-1", "--ua-threshold", "0.9995"]) == 1
    assert pd.read_parquet(tmp_path / "summary.parquet")["best_trial"].tolist() == ["t1", ""]
    assert "| digits:5->6 | 2 | none |" in (tmp_path / "summary.md").read_text()
    assert main(["--summarize-only", "--out", str(tmp_path / "none")]) == 2     # nothing to re-rank


def test_budget_long_and_explicit_overrides():
    from orchestration.sweep import apply_budget, build_parser, resolve

    def resolved(*flags):
        a = build_parser().parse_args(["--targets", "digits:1", *flags])
        targets, spaces, overrides = resolve(a)
        apply_budget(a, spaces)
        kimg = overrides.get("budget_kimg", spaces["digits"].baseline().budget_kimg)
        return a.trials_per_target, kimg

    quick_trials, quick_kimg = resolved()
    assert (quick_trials, quick_kimg) == (2, 20)                 # digits.yaml: trials_per_target 2
    assert resolved("--budget", "quick") == (quick_trials, quick_kimg)
    assert resolved("--budget", "long") == (3 * quick_trials, 4 * quick_kimg)
    assert resolved("--budget", "long", "--trials-per-target", "3", "--budget-kimg", "7") == (3, 7)
    assert resolved("--budget", "long", "--trials-per-target", "5") == (5, 4 * quick_kimg)
    assert resolved("--budget", "long", "--budget-kimg", "7") == (3 * quick_trials, 7)


def _artist(ax, gid):
    found = [a for a in ax.get_children() if a.get_gid() == gid]
    assert len(found) <= 1, gid
    return found[0] if found else None


def test_pareto_plot_marks_its_front(tmp_path):
    from sfd.evaluate.plots import plot_pareto
    pts = [row("a", 1.0, 2.0, 2.0, baseline=True), row("b", 0.99, 3.0, 3.0), row("c", 0.9, 1.0, 5.0),
           row("d", 0.995, 4.0, 1.0)]
    front = pareto_front(pts)
    assert front == {"a", "c", "d"}
    fig = plot_pareto(pts, tmp_path / "p.png", front_ids=front, best_id="a", ua_threshold=0.99)
    ax = fig.axes[0]
    want = sorted((p["fd_ratio"], p["ua"]) for p in pts if p["trial_id"] in front)
    marks = _artist(ax, "pareto-front")
    assert marks is not None and sorted(map(tuple, marks.get_offsets().tolist())) == want
    assert marks.get_edgecolor()[0][3] > 0 and marks.get_sizes()[0] > 36      # visible: ringed, larger
    line = _artist(ax, "pareto-front-line")
    assert sorted(zip(line.get_xdata(), line.get_ydata())) == want
    assert sorted(map(tuple, _artist(ax, "trials").get_offsets().tolist())) == sorted(
        (p["fd_ratio"], p["ua"]) for p in pts)
    assert _artist(ax, "best").get_offsets().tolist() == [[2.0, 1.0]]
    assert _artist(ax, "baseline").get_offsets().tolist() == [[2.0, 1.0]]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("Pareto front (3") for t in legend)
    assert (tmp_path / "p.png").stat().st_size > 1000
    # no front: nothing drawn as one, nothing in the legend claims one
    ax = plot_pareto(pts, tmp_path / "q.png", front_ids=set()).axes[0]
    assert _artist(ax, "pareto-front") is None and _artist(ax, "pareto-front-line") is None
    assert not any("Pareto" in t.get_text() for t in ax.get_legend().get_texts())


def test_target_states_say_what_happened(tmp_path):
    """A target whose trials never started is 'not_started', not 'every trial failed'; cut-off
    trials never count as results or as the best."""
    from orchestration.results import summarise, target_state
    from orchestration.targets import parse_targets
    targets = parse_targets(["digits:3->4", "digits:5->6", "digits:7->8", "digits:1->2"], "next")
    rows = [row("a", 1.0, 2.0, 2.0, target="digits:3->4", baseline=True),
            row("b", 1.0, 0.1, 0.1, target="digits:3->4", status="cut_off"),       # best figures, but cut off
            row("c", math.nan, math.nan, math.nan, target="digits:5->6", status="failed", baseline=True),
            row("d", math.nan, math.nan, math.nan, target="digits:5->6", status="failed"),
            row("e", 1.0, 3.0, 2.0, target="digits:1->2", status="stopped", baseline=True)]
    for r in rows:
        r.update(run_dir=str(tmp_path / r["trial_id"]), fd_remaining_teacher=0.1, remaining_accuracy=0.99,
                 train_seconds=1.0)
    df = summarise(rows, targets, tmp_path, 0.99, 10.0).set_index("target")
    assert df["state"].to_dict() == {"digits:3->4": "interrupted", "digits:5->6": "failed",
                                     "digits:7->8": "not_started", "digits:1->2": "done"}
    assert df.loc["digits:3->4", "best_trial"] == "a" and df.loc["digits:3->4", "cut_off"] == 1
    assert df.loc["digits:1->2", "best_trial"] == "e"              # stopped by the scheduler: a result
    assert df["finished"].to_dict() == {"digits:3->4": 1, "digits:5->6": 0, "digits:7->8": 0, "digits:1->2": 1}
    assert target_state([row("x", 1, 1, 1, status="not_started")]) == "not_started"
    assert "b" not in pareto_front(rows)


BANNER = ("\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1, ip=1.2.3.4, actor_id=ab, repr=run_trial)\n"
          "  File \"/x/trainable.py\", line 329, in train\n    raise skipped from exception_cause(skipped)\n"
          "ray.train.WorkerGroupError: Training failed due to worker errors:\n[Rank 0 Error Snippet]:\n"
          "\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1, ip=1.2.3.4)\n"
          "  File \"/x/sfd/loop.py\", line 71, in train_sfd\n    cfg = SFDConfig.from_dict(cfg).validate(preset)\n"
          "ValueError: budget_kimg (--budget-kimg) -1.0 is out of range — give a positive budget in kimg\n")


def test_root_cause_digs_out_the_real_exception():
    from orchestration.results import root_cause
    got = root_cause(BANNER)
    assert got == "ValueError: budget_kimg (--budget-kimg) -1.0 is out of range — give a positive budget in kimg"
    # exception objects: Ray Train's worker_failures and a wrapper's cause are unwrapped
    from ray.train import WorkerGroupError
    inner = KeyError("lr_gen")
    assert root_cause(WorkerGroupError("boom", {0: inner})) == "KeyError: 'lr_gen'"
    try:
        try:
            raise OSError("\x1b[31mdisk full\x1b[0m")
        except OSError as e:
            raise RuntimeError("wrapper") from e
    except RuntimeError as e:
        assert root_cause(e) == "OSError: disk full"
    assert root_cause(None) == ""


def test_studies_resume_from_optunas_storage(tmp_path):
    """PerTargetSearch's state: Optuna's RDB storage plus Tune's small JSON map. A restored
    searcher completes the trials Tune resumes, fails the ones asked after Tune's last checkpoint,
    never tells a trial twice, and pickles without its studies."""
    import pickle

    from optuna.trial import TrialState

    from orchestration.search import PerTargetSearch
    from orchestration.space import load_space, space_path
    from orchestration.targets import parse_targets

    targets = parse_targets(["digits:3->4"])
    space = load_space(space_path("digits"))
    db = f"sqlite:///{tmp_path / 'optuna.db'}"
    s = PerTargetSearch(targets, {"digits": space}, trials_per_target=3, storage=db)
    assert s.suggest("t0")["baseline"]
    s.on_trial_complete("t0", {"ua": 1.0, "fd_ratio": 2.0, "override_fd_ratio": 1.5})
    s.suggest("t1")                                   # running when Tune checkpointed
    s.save(str(tmp_path / "searcher.json"))
    s.suggest("t2")                                   # asked after the checkpoint: Tune never saw it
    assert "studies" not in pickle.loads(pickle.dumps(s.__getstate__()))

    r = pickle.loads(pickle.dumps(s))                 # what Tuner.restore unpickles, then restore()
    r.restore(str(tmp_path / "searcher.json"))
    study = r.studies["digits:3->4"]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL]
    assert len(study.trials) == 3                     # the baseline was not enqueued again
    r.on_trial_complete("t1", {"ua": 1.0, "fd_ratio": 1.0, "override_fd_ratio": 1.0})
    r.on_trial_complete("t0", {"ua": 0.0, "fd_ratio": 9.0, "override_fd_ratio": 9.0})   # told before: ignored
    assert r.suggest("t3")["target"] == "digits:3->4"  # the third trial, asked again
    from ray.tune.search import Searcher
    assert r.suggest("t4") == Searcher.FINISHED and r.remaining == {"digits:3->4": 0}
    study = r.studies["digits:3->4"]
    assert [t.values for t in study.trials[:2]] == [[2.0, 1.5], [1.0, 1.0]]
    assert study.trials[1].user_attrs["tune_trial_id"] == "t1"


def test_a_checkpoint_removed_while_mlflow_copies_it_is_skipped_not_fatal(tmp_path, capsys, monkeypatch):
    """The driver logs a trial's checkpoint while the trial may already be rotating it out (or a user
    deleted it): the copy fails half-way (a file listed, gone when copied); that logged model is marked
    FAILED, a note names the folder, the next checkpoint is logged as usual (before, the
    FileNotFoundError ended the whole sweep)."""
    import shutil

    from orchestration.tracking import MLflowSweep
    tracker = MLflowSweep(f"sqlite:///{tmp_path / 'mlflow.db'}", "t", artifact_root=(tmp_path / "art").as_uri())
    run = tracker.client.create_run(tracker.experiment_id).info.run_id
    ckpts = []
    for step in (8, 16):
        d = tmp_path / f"ckpt-{step:08d}"
        d.mkdir()
        (d / "state.json").write_text('{"iteration": %d}' % step)
        (d / "state.safetensors").write_bytes(b"x" * 1000)
        ckpts.append(d)
    real_copy = shutil.copy2

    def vanishing(src, dst, **kw):              # the trial removes the folder in the middle of the copy
        if str(src).startswith(str(ckpts[0])):
            shutil.rmtree(ckpts[0], ignore_errors=True)
        return real_copy(src, dst, **kw)

    monkeypatch.setattr(shutil, "copy2", vanishing)
    assert tracker.log_checkpoint(run, "trial", ckpts[0], 8, {"ua": 1.0}) is None
    assert f"checkpoint {ckpts[0]} vanished while MLflow copied it" in capsys.readouterr().out
    model_id = tracker.log_checkpoint(run, "trial", ckpts[1], 16, {"ua": 0.5})
    models = {m.model_id: m for m in tracker.client.search_logged_models([tracker.experiment_id])}
    assert len(models) == 2 and str(models[model_id].status).endswith("READY")
    assert [str(m.status) for k, m in models.items() if k != model_id][0].endswith("FAILED")


def test_max_asr_prefers_trials_within_it_and_says_when_none_is(tmp_path):
    """--max-asr: the best trial is the lowest FD among trials within the limit; a target with none keeps its
    best at the UA threshold, flagged meets_max_asr False; a trial without the figure never counts as within."""
    from orchestration.results import summarise
    from orchestration.targets import parse_targets
    leaky = row("leaky", 1.0, 1.0, 1.0, asr_max=0.75, residue_worst_family=0.0, side_effect_worst_cell=0.1,
                leakage_worst_cell=0.2)
    tight = row("tight", 1.0, 2.0, 1.0, asr_max=0.125, residue_worst_family=0.0, side_effect_worst_cell=0.02)
    unmeasured = row("unmeasured", 1.0, 0.5, 1.0, asr_max=math.nan)
    assert choose_best([leaky, tight, unmeasured], 0.99, 10.0)["trial_id"] == "unmeasured"      # no limit
    assert choose_best([leaky, tight, unmeasured], 0.99, 10.0, max_asr=0.25)["trial_id"] == "tight"
    assert choose_best([leaky, tight], 0.99, 10.0, max_asr=0.125)["trial_id"] == "tight"       # at the limit
    assert choose_best([leaky, unmeasured], 0.99, 10.0, max_asr=0.25)["trial_id"] == "unmeasured"  # fallback

    targets = parse_targets(["digits:3->4", "digits:5->6"], "next")
    rows = [{**leaky, "target": "digits:3->4", "baseline": True}, {**tight, "target": "digits:3->4"},
            {**leaky, "trial_id": "leaky5", "target": "digits:5->6", "baseline": True}]
    for r in rows:
        r.update(run_dir=str(tmp_path / r["trial_id"]), fd_remaining_teacher=0.1, remaining_accuracy=0.99,
                 train_seconds=1.0)
    df = summarise(rows, targets, tmp_path, 0.99, 10.0, max_asr=0.25).set_index("target")
    assert df.loc["digits:3->4", "best_trial"] == "tight" and df.loc["digits:3->4", "asr_max"] == 0.125
    assert df["meets_max_asr"].to_dict() == {"digits:3->4": True, "digits:5->6": False}
    md = (tmp_path / "summary.md").read_text()
    assert "**1/2** targets meet --max-asr 0.25" in md and "worst 0.750 (digits:5->6)" in md
    assert "override leakage (worst cell above the teacher's share) worst 0.200" in md      # 5->6's leaky best
    assert "| 0.750 | 0.000 | 0.100 | 0.200 |" in md and "| 0.125 | 0.000 | 0.020 | - |" in md
    # negative control: without the limit the leaky trial (lower FD) wins again
    df = summarise(rows, targets, tmp_path, 0.99, 10.0).set_index("target")
    assert df.loc["digits:3->4", "best_trial"] == "leaky" and not df["meets_max_asr"].any()


def test_max_asr_flag_errors(tmp_path, capsys):
    from orchestration.sweep import main
    assert main(["--targets", "digits:3", "--max-asr", "1.5", "--dry-run", "--out", str(tmp_path / "a")]) == 2
    assert "--max-asr 1.5 is invalid" in capsys.readouterr().err
    assert main(["--targets", "digits:3", "--max-asr", "0.2", "--attack", "off", "--dry-run",
                 "--out", str(tmp_path / "b")]) == 2
    assert "--attack is off" in capsys.readouterr().err
    # the baselines are attacked too (their fine-tuned teacher through the teacher's sampler): accepted
    assert main(["--targets", "digits:3", "--methods", "sfd,esd", "--max-asr", "0.2", "--dry-run",
                 "--out", str(tmp_path / "c")]) == 0


def test_per_target_study_treats_max_asr_as_a_constraint():
    """With --max-asr the study's feasible front excludes the trial whose attack succeeds too often, and a trial
    whose attack did not report; without it the same results leave every trial feasible (negative control)."""
    import pytest

    from orchestration.search import PerTargetSearch
    from orchestration.space import load_space, space_path
    from orchestration.targets import parse_targets

    targets = parse_targets(["digits:3->4"])
    space = load_space(space_path("digits"))
    results = [{"ua": 1.0, "fd_ratio": 1.1, "override_fd_ratio": 1.0, "asr_max": 0.9},     # best FD, leaky
               {"ua": 1.0, "fd_ratio": 1.6, "override_fd_ratio": 1.2, "asr_max": 0.1},
               {"ua": 1.0, "fd_ratio": 1.0, "override_fd_ratio": 0.9}]                   # attack missing
    fronts = {}
    for limit in (0.25, None):
        s = PerTargetSearch(targets, {"digits": space}, trials_per_target=3, max_asr=limit)
        for i, r in enumerate(results):
            s.suggest(f"t{i}")
        for i, r in enumerate(results):
            s.on_trial_complete(f"t{i}", r)
        study = s.studies["digits:3->4"]
        fronts[limit] = {t.number for t in study.best_trials}
        if limit is not None:
            assert study.trials[0].constraints["max_asr"] == pytest.approx(0.65)
    assert fronts[0.25] == {1}
    assert fronts[None] == {2}                                      # dominates both others on FD


def test_a_resumed_driver_logs_each_checkpoint_once_and_the_ones_never_reported(tmp_path):
    """Checkpoints as MLflow logged models across drivers (`--resume`): a new driver finds what an earlier
    one logged and does not log it twice; a checkpoint whose report never reached any driver (written
    while a stop was under way) is logged when its trial ends. Control: the first driver logs it."""
    from types import SimpleNamespace

    from orchestration.targets import parse_targets
    from orchestration.tracking import MLflowSweep, MLflowTuneCallback
    uri, art = f"sqlite:///{tmp_path / 'mlflow.db'}", (tmp_path / "art").as_uri()
    target = parse_targets(["digits:3->4"])[0]
    run_dir = tmp_path / "out" / "trials" / target.slug / "t0"
    for step in (8, 16, 24):
        d = run_dir / "checkpoints" / f"ckpt-{step:08d}"
        d.mkdir(parents=True)
        (d / "state.json").write_text('{"iteration": %d}' % step)
        (d / "state.safetensors").write_bytes(b"x" * 100)
    first = MLflowSweep(uri, "t", artifact_root=art)
    first.start_parent("sweep", {}, {})
    run = first.start_trial("t0", target, True, {})
    for step in (8, 16):                              # reported to the first driver, then it was stopped
        assert first.log_checkpoint(run, "t0", run_dir / "checkpoints" / f"ckpt-{step:08d}", step, {}) is not None
    second = MLflowSweep(uri, "t", artifact_root=art)  # the resumed sweep's driver
    second.parent_id, second.trial_runs, second.target_runs = first.parent_id, {"t0": run}, dict(first.target_runs)
    assert second.log_checkpoint(run, "t0", run_dir / "checkpoints" / "ckpt-00000016", 16, {}) is None   # logged before
    callback = MLflowTuneCallback(second, {target.name: target}, tmp_path / "out")
    trial = SimpleNamespace(trial_id="t0", config={"target": target.name, "target_slug": target.slug}, last_result={})
    callback.on_trial_complete(0, [], trial)
    names = sorted(m.name for m in second.client.search_logged_models([second.experiment_id]))
    assert names == ["t0-ckpt-00000008", "t0-ckpt-00000016", "t0-ckpt-00000024"], names


def test_a_trial_failed_before_tune_wrote_its_config_keeps_its_row(tmp_path, capsys):
    """A trial whose process was killed as it started (Tune: ERROR, no params.json, no config handed
    back) is still a trial of its target: its row says failed, with the cause, its target taken from the
    Optuna studies' record (found missing from trials.parquet by the chaos run). Control: without that
    record the row is left out, with a note."""
    from types import SimpleNamespace

    from orchestration.results import trial_rows
    from orchestration.targets import parse_targets
    target = parse_targets(["digits:1->2"])[0]
    folder = tmp_path / "run_trial_1a0a3b4a_2_baseline=True,alpha=1.2000_2026-12-06_01-22-40"
    folder.mkdir()
    result = SimpleNamespace(config=None, metrics={}, path=str(folder), error=RuntimeError("ActorDiedError: killed"))
    rows = trial_rows([result], {target.name: target}, tmp_path, {}, {}, owners={"1a0a3b4a": target.name})
    assert [(r["target"], r["trial_id"], r["status"], r["baseline"]) for r in rows] == \
        [(target.name, "1a0a3b4a", "failed", True)]
    assert "ActorDiedError: killed" in rows[0]["error"]
    assert trial_rows([result], {target.name: target}, tmp_path, {}, {}) == []          # the control
    assert "its row is left out of trials.parquet" in capsys.readouterr().out
