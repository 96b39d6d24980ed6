"""The sweep's decision rules on hand-made trial rows, and metrics against independent computations.

Each rule is checked where it could go wrong: the best-trial rule's threshold, diversity
preference and fallback; the Pareto front's dominance and ties; the hopeless-trial stopper;
re-ranking a finished sweep; the long budget; Fréchet distance with non-commuting
covariances; the Inception Score against known answers.
"""
import math

import numpy as np
import pytest
import torch

from orchestration.results import choose_best, pareto_front, write_table


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


def test_pareto_front_dominance_ties_and_failures():
    rows = [row("a", 1.0, 2.0, 2.0), row("b", 0.99, 3.0, 3.0),       # b dominated by a
            row("c", 0.9, 1.0, 5.0), row("d", 1.0, 2.0, 2.0),        # d ties a exactly: both stay
            row("e", 1.0, 0.1, 0.1, status="failed"), row("f", 1.0, math.nan, 1.0)]
    assert pareto_front(rows) == {"a", "c", "d"}
    # better on one objective, worse on another: not dominated
    assert pareto_front([row("a", 1.0, 2.0, 2.0), row("g", 1.0, 1.5, 9.0)]) == {"a", "g"}
    assert pareto_front([]) == set()


def test_hopeless_trial_stopper():
    from orchestration.sweep import HopelessTrialStopper
    s = HopelessTrialStopper(ua_kimg=10, ua_min=0.5)
    assert "loss_generator" in s.verdict({"loss_generator": math.nan, "kimg": 1})
    assert "fd_remaining" in s.verdict({"fd_remaining": math.inf, "kimg": 1, "ua": 1.0})
    assert s.verdict({"kimg": 5, "ua": 0.0}) is None                  # too early to judge
    assert "UA 0.200 < 0.5" in s.verdict({"kimg": 10, "ua": 0.2})
    assert s.verdict({"kimg": 20, "ua": 0.7, "fd_remaining": 1.0, "loss_generator": -3.0}) is None


def test_summarize_only_reranks_a_finished_sweep(tmp_path, capsys):
    import pandas as pd

    from orchestration.sweep import main
    rows = [row("t1", 1.0, 1.5, 30.0, target="digits:3->4", baseline=True),
            row("t2", 0.995, 2.5, 2.0, target="digits:3->4"),
            row("t3", 0.95, 1.2, 1.0, target="digits:3->4")]
    for r in rows:
        r.update(run_dir=str(tmp_path / "trials" / r["trial_id"]), fd_remaining_teacher=0.1,
                 remaining_accuracy=0.99, train_seconds=10.0, param_lr_gen=1e-4)
    write_table(pd.DataFrame(rows), tmp_path / "trials.parquet")

    def best(*flags):
        assert main(["--summarize-only", "--out", str(tmp_path), "--fresh-seed", "-1", *flags]) == 0
        return pd.read_parquet(tmp_path / "summary.parquet").iloc[0]["best_trial"]

    assert best() == "t2"                                       # t1 collapses (30x), t3 did not forget
    assert best("--max-override-fd-ratio", "50") == "t1"
    assert best("--ua-threshold", "0.9", "--max-override-fd-ratio", "50") == "t3"
    assert "t3" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "pareto" / "digits_forget3_to_4.png").is_file()
    assert main(["--summarize-only", "--out", str(tmp_path / "none")]) == 2     # nothing to re-rank


def test_budget_long_and_explicit_overrides():
    from orchestration.sweep import apply_budget, build_parser, resolve

    def resolved(*flags):
        a = build_parser().parse_args(["--targets", "digits:1", *flags])
        apply_budget(a)
        targets, spaces, overrides = resolve(a)
        kimg = overrides.get("budget_kimg", spaces["digits"].baseline().budget_kimg)
        return a.trials_per_target, kimg

    quick_trials, quick_kimg = resolved()
    assert (quick_trials, quick_kimg) == (3, 20)
    assert resolved("--budget", "long") == (3 * quick_trials, 4 * quick_kimg)
    assert resolved("--budget", "long", "--trials-per-target", "3", "--budget-kimg", "7") == (3, 7)


def test_pareto_plot_marks_its_front(tmp_path):
    from sfd.evaluate.plots import plot_pareto
    pts = [row("a", 1.0, 2.0, 2.0, baseline=True), row("b", 0.99, 3.0, 3.0), row("c", 0.9, 1.0, 5.0)]
    drawn = plot_pareto(pts, tmp_path / "p.png", front_ids={"a", "c"}, best_id="a", ua_threshold=0.99)
    assert drawn["front"] == [(1.0, 0.9), (2.0, 1.0)]            # exactly the front's trials, in FD order
    assert drawn["best"] == (2.0, 1.0) and drawn["baseline"] == (2.0, 1.0)
    assert (tmp_path / "p.png").stat().st_size > 1000


def _frechet_independent(a, b):
    """FD from scipy's sqrtm of S1 S2, in float64: an independent route to the same number."""
    from scipy import linalg
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_non_commuting_covariances():
    from sfd.evaluate.metrics import frechet_distance
    rng = np.random.default_rng(1)
    A = rng.normal(size=(5, 5))
    B = rng.normal(size=(5, 5))
    a = rng.normal(size=(3000, 5)) @ A + 0.3
    b = rng.normal(size=(3000, 5)) @ B - 0.2
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert not np.allclose(s1 @ s2, s2 @ s1, atol=1e-3)          # the case an isotropic test cannot see
    want = _frechet_independent(a, b)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(want, rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-8 * np.trace(s1)


def test_inception_score_known_answers():
    from sfd.evaluate.inception import inception_score
    big = 50.0
    # identical predictions: p(y|x) = p(y) for every x -> IS = 1
    same = torch.zeros(12, 1008)
    same[:, 7] = big
    assert inception_score(same, splits=1)[0] == pytest.approx(1.0, abs=1e-9)
    # confident and spread evenly over k classes -> IS = k
    k = 4
    onehot = torch.full((12, 1008), -big)
    onehot[torch.arange(12), torch.arange(12) % k] = big
    assert inception_score(onehot, splits=1)[0] == pytest.approx(k, rel=1e-6)
    # a hand computation with two classes: p1 = (0.9, 0.1), p2 = (0.1, 0.9) -> marginal (0.5, 0.5)
    logits = torch.full((2, 1008), -1e4)
    logits[0, :2] = torch.tensor([math.log(0.9), math.log(0.1)])
    logits[1, :2] = torch.tensor([math.log(0.1), math.log(0.9)])
    kl = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert inception_score(logits, splits=1)[0] == pytest.approx(math.exp(kl), rel=1e-6)
    # splits: two halves, each of one confident class -> IS 1 per split
    assert inception_score(same.roll(0), splits=2) == pytest.approx((1.0, 0.0), abs=1e-9)
