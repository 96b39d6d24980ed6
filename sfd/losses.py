"""The losses, written once against denoiser outputs; no backbone, launcher or tracker here.

All functions return per-sample values (shape (B,)); callers weight and average them.
"""
from __future__ import annotations

import torch


def _per_sample_sum(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(dim=1)


def fake_score_loss(d_fake: torch.Tensor, x_g: torch.Tensor, weight: torch.Tensor,
                    reduction: str = "sum") -> torch.Tensor:
    """Denoising score matching on generated data (SFD.md section 4a).

    ``d_fake`` = D_psi(x_g + sigma n, sigma, c), ``x_g`` the detached generator output, ``weight``
    the backbone's native weight(sigma) per sample. Returns weight * sum_pixels (d_fake - x_g)^2,
    as the reference does (SFD.md section 11); ``reduction='mean'`` divides by the pixel count.
    """
    w = weight.reshape(-1)
    sq = (d_fake - x_g.detach()).pow(2).flatten(1)
    if reduction == "sum":
        return w * sq.sum(dim=1)
    if reduction == "mean":
        return w * sq.mean(dim=1)
    raise ValueError(f"reduction {reduction!r} must be 'sum' or 'mean'")


def generator_loss(y_real: torch.Tensor, y_fake: torch.Tensor, x_g: torch.Tensor, alpha: float) -> torch.Tensor:
    """SiD/SFD generator loss per sample (SFD.md section 4b).

    sum_pixels (y_real - y_fake) * ((y_real - x_g) - alpha (y_real - y_fake)) / omega, with
    omega = mean_pixels |x_g - y_real| per sample, computed without gradient and clamped at
    1e-5. With alpha = 1 this is (y_real - y_fake) * (y_fake - x_g) / omega. The value may be
    negative: it is a gradient surrogate, not a divergence.
    """
    with torch.no_grad():
        omega = (x_g - y_real).abs().flatten(1).mean(dim=1).clamp_min(1e-5)
    diff = y_real - y_fake
    return _per_sample_sum(diff * ((y_real - x_g) - alpha * diff)) / omega


def anchor_loss(x_g: torch.Tensor, x_teacher: torch.Tensor) -> torch.Tensor:
    """The anchor term per sample (a named addition, SFDConfig.lambda_anchor): the sum over pixels of
    (x_g - x_teacher)^2, where ``x_teacher`` is the teacher's ODE sample from the noise that made ``x_g``.
    Summed like the generator loss, so weight 1 gives gradients of its order. A pointwise regression keeps
    the teacher's share of each mode on its prompts, which the score terms above, matching local gradients,
    correct only slowly."""
    return _per_sample_sum((x_g - x_teacher.detach()).pow(2))


def edm_loss(denoiser, x0: torch.Tensor, cond: torch.Tensor, generator=None,
             p_mean: float = -1.2, p_std: float = 1.2) -> torch.Tensor:
    """EDM training loss of a teacher on real data (Karras et al. 2022), per sample."""
    n = x0.shape[0]
    ln_sigma = p_mean + p_std * torch.randn(n, generator=generator).to(x0.device)
    sigma = ln_sigma.exp().reshape(-1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    d = denoiser(x0 + sigma * noise, sigma, cond)
    return denoiser.loss_weight(sigma).reshape(-1) * (d - x0).pow(2).flatten(1).mean(dim=1)
