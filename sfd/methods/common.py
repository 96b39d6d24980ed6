"""What the baselines share: the denoising loss written against D, noise levels, the teacher's
sampler, and the data-free training pool.

Every baseline fine-tunes a copy of the teacher and is sampled like the teacher (EDM's 18-step
Heun, 35 network evaluations per image), so it is judged by the same evaluator as SFD. The
losses are written once against the denoiser interface D(x, sigma, c) -> x0 (SFD.md section 2):
with x = x0 + sigma * n and eps = (x - D) / sigma, the DDPM references' eps-MSE
sum_pixels (n - eps)^2 is sum_pixels (D - x0)^2 / sigma^2, i.e. ``loss_weight`` 1 / sigma^2 of a
discrete VP denoiser; an EDM teacher keeps its own weight.
"""
from __future__ import annotations

import hashlib

import torch

from ..denoisers.base import Denoiser, as_sigma
from ..denoisers.ddpm import DiscreteVP
from ..evaluate.forgetting import cache_dir, teacher_fingerprint
from ..io import CheckpointError, load_tensors, save_tensors
from ..samplers import sample_heun, teacher_grid

METHODS = ("sfd", "esd", "sa", "salun")
BASELINES = ("esd", "sa", "salun")
SAMPLER_STEPS = 18                     # the teacher's sampler, as the evaluator's reference samples use


def sampler_nfe(steps: int = SAMPLER_STEPS) -> int:
    """Network evaluations per image of the Heun sampler: 2 * steps - 1."""
    return 2 * steps - 1


def heun_sampler(net: Denoiser, steps: int = SAMPLER_STEPS):
    """``fn(z, c) -> images``: the teacher's sampler around ``net`` (what the evaluator calls)."""
    def fn(z, c):
        sigmas = teacher_grid(net, steps, z.device)
        return sample_heun(net, z * float(sigmas[0]), sigmas, c)
    return fn


def denoise_loss(net, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor,
                 weight: torch.Tensor) -> torch.Tensor:
    """Per-sample sum over pixels of weight(sigma) (D(x0 + sigma n, sigma, c) - x0)^2.

    With ``weight`` 1 / sigma^2 this is the DDPM references' ``noise_estimation_loss`` with
    ``keepdim=True`` (sum over pixels of (n - eps)^2)."""
    s = as_sigma(sigma, x0)
    d = net(x0 + s * noise, s.flatten(), cond)
    return (as_sigma(weight, x0) * (d.to(x0.dtype) - x0) ** 2).flatten(1).sum(1)


def discrete_sigmas(net: Denoiser) -> torch.Tensor | None:
    """The teacher's discrete training grid sigma(t), or None where it trains on continuous noise levels (EDM;
    a text UNet with an EDM scheduler is a DiscreteVP adapter without a grid)."""
    return getattr(net, "sigmas", None) if isinstance(net, DiscreteVP) else None


def draw_sigma(net: Denoiser, n: int, gen: torch.Generator) -> torch.Tensor:
    """Training noise levels of ``n`` samples, antithetic as the SA / SalUn references draw t.

    A discrete VP teacher: t uniform on its grid, paired with T - 1 - t (the references' antithetic
    sampling); an EDM teacher: its own log-normal (P_mean -1.2, P_std 1.2), paired with the mirror
    quantile."""
    half = n // 2 + 1
    grid = discrete_sigmas(net)
    if grid is not None:
        T = len(grid)
        t = torch.randint(0, T, (half,), generator=gen)
        t = torch.cat([t, T - t - 1])[:n]
        return grid.cpu()[t]
    u = torch.randn(half, generator=gen)
    return (torch.cat([u, -u])[:n] * 1.2 - 1.2).exp()


def pool_name(fingerprint: str, conds: torch.Tensor, seed: int, steps: int) -> str:
    h = hashlib.sha256(conds.to(torch.int64).numpy().tobytes()).hexdigest()[:12]
    return f"pool-{fingerprint}-{h}-n{len(conds)}-heun{steps}-s{seed}.safetensors"


@torch.no_grad()
def teacher_pool(teacher: Denoiser, conds: torch.Tensor, seed: int, steps: int = SAMPLER_STEPS, device="cpu",
                 chunk: int = 500) -> torch.Tensor:
    """The teacher's Heun samples for ``conds`` (the data-free stand-in for real forget / retain images),
    cached on disk by teacher digest, conditions, seed and steps."""
    path = cache_dir() / pool_name(teacher_fingerprint(teacher), conds, seed, steps)
    if path.is_file():
        try:
            t, _ = load_tensors(path)
            if torch.equal(t["conds"], conds.to(torch.int64)):
                return t["x"]
        except (CheckpointError, KeyError) as e:
            print(f"note: training pool {path} is damaged ({type(e).__name__}: {e}); resampled", flush=True)
    g = torch.Generator().manual_seed(seed)
    sample = heun_sampler(teacher, steps)
    out = []
    for c in conds.split(chunk):
        z = torch.randn((len(c), *teacher.img_shape), generator=g)
        out.append(sample(z.to(device), c.to(device)).float().cpu())
    x = torch.cat(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, {"x": x, "conds": conds.to(torch.int64)})
    return x
