"""Selective Amnesia (Heng & Soh 2023), written against D.

Continual-learning view of forgetting: maximise the likelihood of a *surrogate* for the forget
condition (the DDPM reference: uniform noise images in [-1, 1]) while generative replay of the
remaining conditions (the teacher's own samples) and an EWC penalty on the teacher's Fisher
information keep the rest. Loss of one step (reference `train_forget`):

    L = l(x_surrogate, c_f) + gamma l(x_replay, c_r) + lambda sum_i F_i (theta_i - theta*_i)^2

with l the denoising loss averaged over the batch. The Fisher diagonal (reference `save_fim`)
is, per sample, the gradient of its loss *summed over noise levels*, squared, then averaged
over samples. The reference sums over all 1000 DDPM steps; sfd sums over ``levels`` noise levels
and scales by (1000 / levels)^2, so lambda keeps the reference's magnitude.
"""
from __future__ import annotations

import torch

from .common import denoise_loss

REFERENCE_LEVELS = 1000


def surrogate_images(n: int, shape, gen: torch.Generator) -> torch.Tensor:
    """The reference's surrogate for the forget condition: uniform noise in [-1, 1]."""
    return (torch.rand((n, *shape), generator=gen) - 0.5) * 2.0


def fisher_diagonal(net, x: torch.Tensor, cond: torch.Tensor, sigmas: torch.Tensor, weight_fn, gen: torch.Generator,
                    scale: float = 1.0, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """mean over samples of (sum over ``sigmas`` of d loss / d theta)^2, times ``scale``; one backward per
    sample (per-sample gradients are not averaged before squaring, as in the reference). ``noise``
    (samples x levels x image), else drawn from ``gen``."""
    params = {k: p for k, p in net.named_parameters() if p.requires_grad}
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(len(x)):
        xi = x[i:i + 1].expand(len(sigmas), *x.shape[1:])
        ci = cond[i:i + 1].expand(len(sigmas), *cond.shape[1:])
        ni = torch.randn(xi.shape, generator=gen).to(x.device) if noise is None else noise[i]
        loss = denoise_loss(net, xi, sigmas, ni, ci, weight_fn(sigmas)).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (k, _), g in zip(params.items(), grads):
            if g is not None:
                fisher[k] += g.detach() ** 2 / len(x)
    return {k: v * scale for k, v in fisher.items()}


def ewc_penalty(net, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum_i F_i (theta_i - theta*_i)^2 over the parameters that have a Fisher entry."""
    total = 0.0
    for k, p in net.named_parameters():
        if k in fisher:
            total = total + (fisher[k] * (p - anchor[k]) ** 2).sum()
    return total


def sa_loss(net, x_forget, c_forget, x_replay, c_replay, sigma, noise_forget, noise_replay, weight, fisher, anchor,
            gamma: float, lam: float) -> torch.Tensor:
    """The reference's step loss: surrogate + gamma replay (each a batch mean of the per-sample pixel sum)
    + lambda EWC. Both terms share the noise levels, as the reference shares t."""
    forget = denoise_loss(net, x_forget, sigma, noise_forget, c_forget, weight).mean()
    replay = denoise_loss(net, x_replay, sigma, noise_replay, c_replay, weight).mean()
    return forget + gamma * replay + lam * ewc_penalty(net, fisher, anchor)
