"""Evaluation primitives: Frechet distance, unlearning accuracy, per-class accuracy.

FD is biased by sample size, so every FD this project reports names its sample count and
compares like with like (same count for the generator, the teacher and the real floor).
"""
from __future__ import annotations

import numpy as np
import torch


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(a, b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D) or (mu, cov) pairs."""
    if not isinstance(a, tuple) and _low_rank(a):
        return _frechet_low_rank(a, b)
    if not isinstance(b, tuple) and _low_rank(b):
        return _frechet_low_rank(b, a)                     # the distance is symmetric
    mu1, s1 = a if isinstance(a, tuple) else feature_stats(a)
    mu2, s2 = b if isinstance(b, tuple) else feature_stats(b)
    # tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)): symmetric PSD, so it stays real and
    # well-defined when features have dead units (singular covariances), unlike sqrtm(S1 S2).
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


# Fewer samples than feature dimensions (Inception's 2,048 on a few hundred images): the covariance has rank
# < N, and the D x D eigendecompositions (seconds each at D = 2,048) are not needed. Only for wide features:
# the small judges' (64) figures stay those of the general path bit for bit.
_LOW_RANK_MIN_DIM = 256


def _low_rank(feats) -> bool:
    shape = np.shape(feats)
    return len(shape) == 2 and shape[1] >= _LOW_RANK_MIN_DIM and 2 <= shape[0] < shape[1]


def _frechet_low_rank(feats, other) -> float:
    """FD with S1 = A A^T, A = (F - mu1)^T / sqrt(N - 1) (D x N, N < D): the nonzero eigenvalues of S1 S2
    are those of the N x N matrix A^T S2 A, so tr sqrt(S1 S2) costs D^2 N instead of D^3."""
    f = np.asarray(feats, dtype=np.float64)
    mu1 = f.mean(axis=0)
    a = (f - mu1).T / np.sqrt(f.shape[0] - 1)
    mu2, s2 = other if isinstance(other, tuple) else feature_stats(other)
    m = a.T @ s2 @ a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + (a * a).sum() + np.trace(s2) - 2.0 * tr_covmean)


def unlearning_accuracy(pred: torch.Tensor, labels: torch.Tensor, forget: list[int]) -> float:
    """UA = 1 - (forget-class samples classified as their own forget class) / (forget-class samples).

    Divides by the number of forget-class samples only (the reference divided by all
    samples, inflating UA about tenfold on a 10-class folder; SFD.md section 8).
    """
    mask = torch.isin(labels, torch.as_tensor(forget))
    n = int(mask.sum())
    if n == 0:
        raise ValueError("no forget-class samples to compute UA on")
    return 1.0 - float((pred[mask] == labels[mask]).sum()) / n


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        raise ValueError("no samples to compute an accuracy on")
    return float((pred == labels).float().mean())


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[int, float]:
    return {c: accuracy(pred[labels == c], labels[labels == c]) for c in range(num_classes) if (labels == c).any()}


@torch.no_grad()
def judge_outputs(judge, x: torch.Tensor, batch_size: int = 1000):
    """(predicted labels, softmax probabilities, features) of ``judge`` on images ``x``."""
    device = next(judge.parameters()).device
    preds, probs, feats = [], [], []
    for chunk in x.split(batch_size):
        chunk = chunk.to(device)
        f, logits = judge.features_and_logits(chunk)
        p = logits.softmax(dim=1)
        preds.append(p.argmax(1).cpu())
        probs.append(p.cpu())
        feats.append(f.cpu())
    return torch.cat(preds), torch.cat(probs), torch.cat(feats).numpy()
