"""Fréchet distance and Inception Score against independent computations and known answers.

The isotropic FD check in test_foundation cannot see a formula that is only right for
commuting covariances; these use full, non-commuting ones. The Inception Score is checked on
fixed logits whose answer is known by hand, and against a float64 numpy/scipy computation of
exp(E_x KL(p(y|x) || p(y))) per split.
"""
import math

import numpy as np
import pytest
import torch
from scipy import linalg, special, stats

from sfd.evaluate.inception import inception_score
from sfd.evaluate.metrics import frechet_distance


# --------------------------------------------------------------------------- Fréchet distance

def _fd_sqrtm(mu1, s1, mu2, s2):
    """FD through scipy's sqrtm of the (non-symmetric) product S1 S2: another route to tr sqrt(S1 S2)."""
    covmean = linalg.sqrtm(s1 @ s2)
    assert np.abs(covmean.imag).max() < 1e-8
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def _fd_eigvals(mu1, s1, mu2, s2):
    """FD from the eigenvalues of S1 S2 (real and >= 0 for PSD S1, S2): tr sqrt = sum sqrt(eig)."""
    ev = np.linalg.eigvals(s1 @ s2)
    assert np.abs(ev.imag).max() < 1e-8
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev.real, 0, None)).sum())


def test_frechet_distance_2x2_non_commuting_closed_form():
    # For a 2x2 M with eigenvalues l1, l2 >= 0: tr sqrt(M) = sqrt(l1) + sqrt(l2) = sqrt(tr M + 2 sqrt(det M)).
    s1 = np.array([[2.0, 1.0], [1.0, 1.0]])
    s2 = np.array([[1.0, -0.5], [-0.5, 2.0]])
    mu1, mu2 = np.zeros(2), np.array([1.0, 2.0])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    # S1 S2 = [[1.5, 1], [0.5, 1.5]]: trace 3; det S1 det S2 = 1 * 1.75
    tr_sqrt = math.sqrt(3.0 + 2.0 * math.sqrt(1.75))
    want = 5.0 + 3.0 + 3.0 - 2.0 * tr_sqrt                          # = 6.24784...
    assert want == pytest.approx(6.247842, abs=1e-6)
    assert frechet_distance((mu1, s1), (mu2, s2)) == pytest.approx(want, abs=1e-12)
    assert frechet_distance((mu2, s2), (mu1, s1)) == pytest.approx(want, abs=1e-12)
    assert frechet_distance((mu1, s1), (mu1, s1)) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_full_covariances_match_scipy():
    rng = np.random.default_rng(1)
    d = 6
    a = rng.normal(size=(2000, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    b = rng.normal(size=(2000, d)) @ rng.normal(size=(d, d)) * 0.7 - 0.4
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    assert np.abs(s1 @ s2 - s2 @ s1).max() > 0.1 * np.abs(s1 @ s2).max()     # far from commuting
    want = _fd_sqrtm(mu1, s1, mu2, s2)
    assert _fd_eigvals(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    assert frechet_distance((mu1, s1), (mu2, s2)) == pytest.approx(want, rel=1e-9)   # (mu, cov) input
    assert frechet_distance(b, a) == pytest.approx(frechet_distance(a, b), rel=1e-12)
    assert abs(frechet_distance(a, a)) < 1e-9 * np.trace(s1)
    assert frechet_distance(a, a + 1.0) == pytest.approx(d, rel=1e-9)           # a pure shift: |dmu|^2


def test_frechet_distance_dead_unit_adds_nothing():
    # A feature that is constant in both sets (a dead unit: singular covariances) changes nothing.
    rng = np.random.default_rng(2)
    a = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4))
    b = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4)) + 0.5
    dead = np.full((500, 1), 3.0)
    fd = frechet_distance(a, b)
    assert math.isfinite(fd) and fd > 0
    assert frechet_distance(np.hstack([a, dead]), np.hstack([b, dead])) == pytest.approx(fd, rel=1e-9)


def test_frechet_distance_fewer_samples_than_dimensions():
    # N < D (few images, wide features): rank-deficient covariances whose round-off eigenvalues
    # are slightly negative; the FD must stay finite and agree with the eigenvalue route.
    rng = np.random.default_rng(4)
    a = rng.normal(size=(6, 8))
    b = rng.normal(size=(6, 8)) @ rng.normal(size=(8, 8)) * 0.5 + 0.3
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    assert np.linalg.eigvalsh(s1).min() < 0 or np.linalg.eigvalsh(s2).min() < 0       # the case at hand
    fd = frechet_distance(a, b)
    assert math.isfinite(fd)
    assert fd == pytest.approx(_fd_eigvals(mu1, s1, mu2, s2), rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(fd, rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-6 * np.trace(s1)


# --------------------------------------------------------------------------- Inception Score

def _is_numpy(logits, splits):
    """exp(mean_x KL(p(y|x) || p(y))) per split [i N // splits, (i+1) N // splits), in float64 numpy/scipy."""
    p = special.softmax(np.asarray(logits, dtype=np.float64), axis=1)
    n = len(p)
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        py = part.mean(0)
        scores.append(math.exp(np.mean([stats.entropy(row, py) for row in part])))
    return float(np.mean(scores)), float(np.std(scores))


def _onehot(classes, width=10, big=60.0):
    logits = torch.full((len(classes), width), -big, dtype=torch.float64)
    logits[torch.arange(len(classes)), torch.as_tensor(classes)] = big
    return logits


def test_inception_score_known_answers():
    # identical predictions (uniform, or confident on one class): p(y|x) = p(y) -> IS = 1
    assert inception_score(torch.zeros(12, 1008), splits=1) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert inception_score(_onehot([7] * 12, 1008), splits=1)[0] == pytest.approx(1.0, abs=1e-12)
    # confident and spread evenly over k distinct classes -> IS = k
    for k in (2, 4, 6):
        assert inception_score(_onehot([i % k for i in range(12)], 1008), splits=1)[0] == pytest.approx(k, rel=1e-9)
    # by hand: p1 = (0.9, 0.1), p2 = (0.1, 0.9), p(y) = (0.5, 0.5);
    # KL = 0.9 ln 1.8 + 0.1 ln 0.2 = 0.368064 for both -> IS = e^0.368064 = 1.444935
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.1, 0.9]], dtype=torch.float64))
    assert inception_score(logits, splits=1)[0] == pytest.approx(1.444935, abs=1e-6)
    # by hand, unequal KLs: p1 = (1, 0), p2 = (0.5, 0.5), p(y) = (0.75, 0.25);
    # KL1 = ln(4/3), KL2 = 0.5 ln(2/3) + 0.5 ln 2 -> IS = exp((KL1 + KL2) / 2)
    logits = torch.tensor([[0.0, -80.0], [0.0, 0.0]], dtype=torch.float64)
    want = math.exp((math.log(4 / 3) + 0.5 * math.log(2 / 3) + 0.5 * math.log(2)) / 2)
    assert inception_score(logits, splits=1)[0] == pytest.approx(want, rel=1e-9)


def test_inception_score_splits_are_scored_separately():
    # first half spread over 4 classes, second half all one class: split scores 4 and 1
    logits = _onehot([0, 1, 2, 3, 5, 5, 5, 5])
    assert inception_score(logits, splits=1)[0] == pytest.approx(_is_numpy(logits, 1)[0], rel=1e-9)
    assert inception_score(logits, splits=2) == pytest.approx((2.5, 1.5), rel=1e-9)
    # N not a multiple of splits: 5 samples in 4 splits are [0], [1], [2], [3, 4] -> scores 1, 1, 1, 2
    assert inception_score(_onehot([0, 1, 2, 3, 4]), splits=4) == pytest.approx((1.25, math.sqrt(0.1875)), rel=1e-9)
    with pytest.raises(ValueError, match="splits"):
        inception_score(_onehot([0, 1]), splits=3)


@pytest.mark.parametrize("n, splits", [(40, 1), (40, 4), (37, 5)])
def test_inception_score_matches_numpy(n, splits):
    logits = torch.from_numpy(np.random.default_rng(n + splits).normal(scale=3.0, size=(n, 1008)))
    got = inception_score(logits, splits=splits)
    want = _is_numpy(logits.numpy(), splits)
    assert got[0] == pytest.approx(want[0], rel=1e-9) and got[1] == pytest.approx(want[1], rel=1e-7, abs=1e-12)
    assert 1.0 < got[0] < 1008


# --------------------------------------------------------------------------- the teacher's floors

def test_teacher_floors_average_every_disjoint_set_of_equal_count(digits, teacher, judge, tmp_path, monkeypatch):
    """fd_remaining_teacher / fd_override_teacher: the teacher's FD at the generator's sample count,
    averaged over every disjoint set of that count its samples hold (recomputed here by hand)."""
    from sfd.config import SFDConfig
    from sfd.evaluate.forgetting import ForgetEvaluator, teacher_samples
    from sfd.evaluate.metrics import judge_outputs
    from sfd.evaluate.report import RealReference
    from sfd.tasks.classes import ClassTargets

    monkeypatch.setenv("SFD_CACHE", str(tmp_path))
    cfg = SFDConfig(forget=[2], override="5", device="cpu").validate(digits)
    ev = ForgetEvaluator(digits, judge, teacher, ClassTargets(cfg, 10), forget_samples=12, remain_per_class=4)
    x, labels = teacher_samples(teacher, 10, 12)                 # 12 per class: 3 sets of 4, 1 of 12
    _, _, feats = judge_outputs(judge, x)
    real = RealReference.from_preset(digits, judge)
    remain = [c for c in range(10) if c != 2]

    def rows(classes, n, k):
        return np.concatenate([np.nonzero(labels.numpy() == c)[0][k * n:(k + 1) * n] for c in classes])

    sets = [frechet_distance(feats[rows(remain, 4, k)], real.of(remain)) for k in range(3)]
    assert ev.teacher["teacher_floor_sets"] == 3
    assert ev.teacher["fd_remaining_teacher"] == pytest.approx(np.mean(sets), rel=1e-6)
    assert max(sets) - min(sets) > 1e-3 * np.mean(sets)          # the sets differ: the mean is not any one
    assert ev.teacher["fd_override_teacher"] == pytest.approx(
        frechet_distance(feats[rows([5], 12, 0)], real.of([5])), rel=1e-6)


@pytest.mark.parametrize("n", [2, 40, 300])
def test_frechet_distance_with_fewer_samples_than_dimensions_equals_the_general_path(n):
    """Inception-wide features from a few samples take the N x N path; it is the same distance as the
    D x D eigendecompositions (the control: the general path itself, with the shortcut switched off)."""
    from sfd.evaluate import metrics
    rng = np.random.default_rng(n)
    d = 512
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.05 + 0.3
    b_feats = rng.normal(size=(700, d)) * 0.7
    ref = metrics.feature_stats(b_feats)
    fast = [metrics.frechet_distance(a, ref), metrics.frechet_distance(ref, a), metrics.frechet_distance(a, b_feats)]
    assert metrics._low_rank(a)
    try:
        metrics._LOW_RANK_MIN_DIM = 10 ** 9                          # the general path for the same inputs
        slow = [metrics.frechet_distance(a, ref), metrics.frechet_distance(ref, a),
                metrics.frechet_distance(a, b_feats)]
    finally:
        metrics._LOW_RANK_MIN_DIM = 256
    assert not metrics._low_rank(b_feats)
    # the general path adds the square roots of the D - N eigenvalues that are zero up to rounding
    # (~1e-7 each): a few 1e-8 relative; the N x N path does not have them
    for f, s in zip(fast, slow):
        assert f == pytest.approx(s, rel=1e-6)


def test_generator_fd_averages_disjoint_draws_of_equal_count(digits, teacher, judge, tmp_path, monkeypatch):
    """eval_fd_draws = K: the generator's remaining-class FD is the mean of K FDs, each over its own draw of
    remain_per_class samples per class (the first draw is the one-draw evaluation's, to the bit), not one FD
    over the K draws pooled (a larger sample: a smaller figure in expectation, another metric)."""
    from sfd.config import SFDConfig
    from sfd.evaluate.forgetting import ForgetEvaluator
    from sfd.evaluate.metrics import judge_outputs
    from sfd.evaluate.report import RealReference
    from sfd.tasks.classes import ClassTargets

    monkeypatch.setenv("SFD_CACHE", str(tmp_path))
    cfg = SFDConfig(forget=[2], override="5", device="cpu").validate(digits)
    targets = ClassTargets(cfg, 10)
    seen = []

    def gen(z, labels):                                      # a stand-in generator: its images are kept
        x = torch.tanh(z + 0.3 * labels.float().view(-1, 1, 1, 1) - 1.0)
        seen.append((labels.clone(), x.clone()))
        return x

    one = ForgetEvaluator(digits, judge, teacher, targets, forget_samples=12, remain_per_class=6)(gen)
    seen.clear()
    ev = ForgetEvaluator(digits, judge, teacher, targets, forget_samples=12, remain_per_class=6, fd_draws=3)
    three = ev(gen)
    x = torch.cat([b for _, b in seen])[12:]                 # the remaining rows, in order
    _, _, feats = judge_outputs(judge, x)
    real = RealReference.from_preset(digits, judge)
    remain = [c for c in range(10) if c != 2]
    draws = [frechet_distance(f, real.of(remain)) for f in np.split(feats, 3)]
    assert three["n_remaining_samples"] == 3 * 9 * 6 and three["fd_draws"] == 3
    assert draws[0] == pytest.approx(one["fd_remaining"], rel=1e-6)    # draw 1 is the one-draw figure
    assert three["fd_remaining"] == pytest.approx(np.mean(draws), rel=1e-6)
    assert max(draws) - min(draws) > 1e-3 * np.mean(draws)             # the draws differ: the mean is none of them
    pooled = frechet_distance(feats, real.of(remain))                  # the control: not the pooled FD
    assert abs(three["fd_remaining"] - pooled) > 1e-3 * pooled
    assert three["fd_ratio"] == pytest.approx(three["fd_remaining"] / three["fd_remaining_teacher"])
    with pytest.raises(ValueError, match="fd_draws 0"):
        ForgetEvaluator(digits, judge, teacher, targets, forget_samples=12, remain_per_class=6, fd_draws=0)
