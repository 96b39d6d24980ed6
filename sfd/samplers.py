"""Teacher samplers (pure functions over a denoiser) and noise-level distributions.

``sample_heun`` is EDM's deterministic 2nd-order sampler: ``steps`` noise levels on the
Karras grid cost 2 * steps - 1 network evaluations (35 for the default 18).
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .denoisers.base import Denoiser


def karras_sigmas(steps: int, sigma_min=0.002, sigma_max=80.0, rho=7.0, device="cpu") -> torch.Tensor:
    """``steps`` decreasing noise levels followed by a final 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    i = torch.arange(steps, dtype=torch.float64, device=device)
    denom = max(steps - 1, 1)
    s = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64, device=device)])


def teacher_grid(denoiser, steps: int = 18, device="cpu") -> torch.Tensor:
    """The Karras noise levels of a teacher's Heun sampler (``steps`` levels and a final 0), within the
    denoiser's sigma range clamped to [0.002, 80]."""
    return karras_sigmas(steps, max(denoiser.sigma_min, 0.002), min(denoiser.sigma_max, 80.0), device=device)


@torch.no_grad()
def sample_heun(denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond: torch.Tensor,
                callback=None, disable: bool = True) -> torch.Tensor:
    """Integrate the probability-flow ODE from ``x`` (already scaled by sigmas[0]) to sigma 0."""
    return heun(denoiser, x, sigmas, cond, callback, disable)


def heun(denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond, callback=None, disable: bool = True) -> torch.Tensor:
    """:func:`sample_heun` with autograd left on (a white-box attack differentiates through the teacher's
    sampler, sfd.robustness); ``cond`` is passed to ``denoiser`` as it is."""
    x = x.to(torch.float32)
    n = len(sigmas) - 1
    for i in tqdm(range(n), disable=disable, desc="heun", leave=False):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = (x - denoiser(x, s, cond)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d2 = (x_next - denoiser(x_next, s_next, cond)) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d2)
        x = x_next
        if callback is not None:
            callback({"i": i, "sigma": s, "x": x})
    return x


@torch.no_grad()
def sample_teacher(denoiser: Denoiser, labels: torch.Tensor, steps: int = 18, generator=None,
                   batch_size: int = 500, progress: bool = False) -> torch.Tensor:
    """Heun samples of ``denoiser`` for each label, in batches."""
    device = next(denoiser.parameters()).device
    sigmas = teacher_grid(denoiser, steps, device)
    out = []
    chunks = labels.split(batch_size)
    for c in tqdm(chunks, disable=not progress, desc=f"teacher {steps}-step Heun", unit="batch"):
        z = torch.randn((len(c), *denoiser.img_shape), generator=generator).to(device)
        out.append(sample_heun(denoiser, z * float(sigmas[0]), sigmas, c.to(device)).cpu())
    return torch.cat(out)


# ---- noise-level distributions for SFD (SFD.md section 6) -------------------------------

def vp_sigma_of_t(t: torch.Tensor, beta_min=1e-4, beta_max=0.02, steps=1000, scaled: bool = False) -> torch.Tensor:
    """sigma(t) = sqrt((1 - abar_t) / abar_t) of the DDPM linear-beta schedule (integer t);
    ``scaled``: Stable Diffusion's scaled-linear one (betas linear in sqrt(beta))."""
    betas = (torch.linspace(beta_min**0.5, beta_max**0.5, steps, dtype=torch.float64) ** 2 if scaled else
             torch.linspace(beta_min, beta_max, steps, dtype=torch.float64))
    abar = torch.cumprod(1.0 - betas, 0)
    sig = ((1 - abar) / abar).sqrt()
    return sig[t.long().cpu()].to(torch.float32)


def sample_sigma(kind: str, n: int, sigma_min: float, sigma_max: float, generator=None,
                 device="cpu") -> torch.Tensor:
    """Per-sample noise levels for the fake-score and generator steps.

    - ``loguniform``: log sigma uniform on [sigma_min, sigma_max];
    - ``vp-t``: the reference's way, integer t uniform in [t(sigma_min), t(sigma_max)) on the
      DDPM linear-beta grid, upper bound excluded like the reference's ``randint`` (0.137 and
      13.1 are t = 38 and 712, so t in [38, 712));
    - ``sd-t``: the same on Stable Diffusion's scaled-linear grid (beta 0.00085 -> 0.012; 0.138 and
      13.04 are t = 20 and 980, the SD reference's [20, 980));
    - ``edm``: SiD's generator step, u ~ U(0, 0.8) on the Karras grid between sigma_min and sigma_max;
    - ``lognormal``: EDM's training distribution, ln sigma ~ N(-1.2, 1.2^2) (SiD's fake-score
      step); sigma_min / sigma_max do not apply.
    """
    u = torch.rand(n, generator=generator)
    if kind == "loguniform":
        s = torch.exp(math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min)))
    elif kind == "vp-t":
        lo, hi = vp_t_range(sigma_min, sigma_max)
        t = lo + (u * (hi - lo)).long().clamp_max(hi - lo - 1)
        s = vp_sigma_of_t(t)
    elif kind == "sd-t":
        lo, hi = vp_t_range(sigma_min, sigma_max, **SD_SCHEDULE)
        t = lo + (u * (hi - lo)).long().clamp_max(hi - lo - 1)
        s = vp_sigma_of_t(t, **SD_SCHEDULE)
    elif kind == "edm":
        rho = 7.0
        u = u * 0.8
        s = (sigma_max ** (1 / rho) + (1 - u) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    elif kind == "lognormal":
        s = (-1.2 + 1.2 * torch.randn(n, generator=generator)).exp()
    else:
        raise ValueError(f"unknown sigma distribution {kind!r}; use 'loguniform', 'vp-t', 'sd-t', 'edm' or 'lognormal'")
    return s.to(device)


SD_SCHEDULE = dict(beta_min=0.00085, beta_max=0.012, scaled=True)


def vp_t_range(sigma_min: float, sigma_max: float, **schedule) -> tuple[int, int]:
    """[t_lo, t_hi): the DDPM steps nearest (log scale) to sigma_min and sigma_max."""
    log_all = vp_sigma_of_t(torch.arange(1000), **schedule).double().log()
    lo = int((log_all - math.log(sigma_min)).abs().argmin())
    hi = int((log_all - math.log(sigma_max)).abs().argmin())
    if hi <= lo:
        raise ValueError(f"no DDPM step range between sigma {sigma_min} and {sigma_max} (t {lo} .. {hi})")
    return lo, hi
