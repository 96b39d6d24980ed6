"""SalUn (Fan et al. 2024): saliency-masked random relabelling, written against D; data-free variant.

1. Weight saliency (reference `generate_mask`): the gradient of the forget images' denoising loss
   is accumulated over the forget set (each batch's gradient clipped by norm first), and the
   ``ratio`` of weights with the largest |gradient| (one threshold over all tensors) form the mask.
2. Unlearning (reference `saliency_unlearn`, method 'rl'): at noisy forget images x_t the model's
   prediction for the forget condition is regressed onto its own, detached, prediction for a
   relabelled condition (the reference: class c + 1, i.e. the override), plus ``alpha`` times the
   retain images' denoising loss; gradients outside the mask are zeroed after clipping.
The forget and retain images are real data in the paper; here they are the teacher's own samples
(the data-free variant).
"""
from __future__ import annotations

import torch

from ..denoisers.base import Guided, as_sigma
from .common import denoise_loss

MASK_GUIDANCE = 2.0          # the reference's --cond_scale default, in the same (1 + w) c - w null form


def saliency_scores(net, batches, weight_fn, gen: torch.Generator, clip_norm: float = 1.0,
                    guidance: float = MASK_GUIDANCE) -> dict[str, torch.Tensor]:
    """|sum over forget batches of the clipped gradient of the batch's denoising loss| per weight.

    ``batches``: (x0, cond, sigma) or (x0, cond, sigma, noise) of forget images (noise, else from ``gen``). The loss is that of the guided prediction
    (1 + w) D(c) - w D(null) with the network in eval mode, as the reference's ``mode="test"`` at its
    default ``--cond_scale 2``."""
    was_training = net.training
    net.eval()
    call = Guided(net, guidance)
    params = {k: p for k, p in net.named_parameters() if p.requires_grad}
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    for x0, cond, sigma, *given in batches:
        noise = given[0] if given else torch.randn(x0.shape, generator=gen).to(x0.device)
        loss = denoise_loss(call, x0, sigma, noise, cond, weight_fn(sigma)).mean()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())]
        if clip_norm > 0:
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            coef = (clip_norm / (total + 1e-6)).clamp(max=1.0)
            grads = [g * coef for g in grads]
        for k, g in zip(params, grads):
            acc[k] += g.detach()
    net.train(was_training)
    return {k: v.abs() for k, v in acc.items()}


def saliency_mask(scores: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """1 for the ``ratio`` of all weights with the largest score (one ranking over every tensor), else 0."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = int(len(flat) * ratio)
    keep = torch.zeros(len(flat), dtype=torch.bool)
    if k > 0:
        # stable descending order: ties keep the tensors' order, as the reference's argsort of -scores
        keep[torch.argsort(-flat, stable=True)[:k]] = True
    out, i = {}, 0
    for name, s in scores.items():
        out[name] = keep[i:i + s.numel()].reshape(s.shape).to(s.dtype)
        i += s.numel()
    return out


def apply_mask(net, mask: dict[str, torch.Tensor]) -> None:
    """Zero the gradients outside the mask (after clipping, as the reference)."""
    for name, p in net.named_parameters():
        if p.grad is not None and name in mask:
            p.grad *= mask[name].to(p.grad.device)


def relabel_loss(net, x_t: torch.Tensor, sigma: torch.Tensor, c_forget: torch.Tensor, c_pseudo: torch.Tensor,
                 weight: torch.Tensor) -> torch.Tensor:
    """mean over pixels and batch of weight(sigma) (D(x_t, c_f) - stopgrad D(x_t, c_pseudo))^2: the reference's
    ``MSELoss(pseudo, output)`` in eps units when weight is 1 / sigma^2."""
    with torch.no_grad():
        pseudo = net(x_t, sigma, c_pseudo).to(x_t.dtype)
    out = net(x_t, sigma, c_forget).to(x_t.dtype)
    return (as_sigma(weight, x_t) * (out - pseudo) ** 2).mean()


def salun_loss(net, x_forget, c_forget, c_pseudo, x_retain, c_retain, sigma_f, sigma_r, noise_f, noise_r, weight_fn,
               alpha: float) -> torch.Tensor:
    """forget (relabelling at noisy forget images) + alpha retain (denoising, batch mean of pixel sums)."""
    s = as_sigma(sigma_f, x_forget)
    x_t = x_forget + s * noise_f
    forget = relabel_loss(net, x_t, s.flatten(), c_forget, c_pseudo, weight_fn(sigma_f))
    retain = denoise_loss(net, x_retain, sigma_r, noise_r, c_retain, weight_fn(sigma_r)).mean()
    return forget + alpha * retain
