"""Erasing Stable Diffusion (ESD, Gandikota et al. 2023), data-free, written against D.

The fine-tuned model's prediction for the forget condition is regressed onto the frozen teacher's
negatively guided prediction at points x_t the fine-tuned model itself samples for that condition
(no data). In eps form the reference's loss (train-esd.py) is
``MSE(e_n, e_0 - eta (e_p - e_0))`` with e_0 = eps*(x_t, null), e_p = eps*(x_t, c_f) of the
teacher and e_n = eps(x_t, c_f) of the fine-tuned model. Since eps = (x - D) / sigma is affine
in D, the target is D* = D*(null) - eta (D*(c_f) - D*(null)) in x0 space and the loss is
mean_pixels (D(x_t, c_f) - D*)^2 / sigma^2 -- equal to the reference in eps units (weight
1 / sigma^2; an EDM teacher uses its own weight).
"""
from __future__ import annotations

import torch

from ..denoisers.base import Guided, as_sigma
from ..samplers import sample_heun


@torch.no_grad()
def esd_target(teacher, x: torch.Tensor, sigma: torch.Tensor, c_forget: torch.Tensor, eta: float) -> torch.Tensor:
    """D*(null) - eta (D*(c_f) - D*(null)): the teacher guided away from the forget condition."""
    d_null = teacher(x, sigma, teacher.null_cond(c_forget)).to(x.dtype)
    d_forget = teacher(x, sigma, c_forget).to(x.dtype)
    return d_null - eta * (d_forget - d_null)


def esd_loss(student, teacher, x: torch.Tensor, sigma: torch.Tensor, c_forget: torch.Tensor, eta: float,
             weight: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over pixels of weight(sigma) (D(x, c_f) - D*)^2 (the reference's MSELoss of one
    sample is this mean with weight 1 / sigma^2)."""
    target = esd_target(teacher, x, sigma, c_forget, eta)
    d = student(x, sigma, c_forget).to(x.dtype)
    return (as_sigma(weight, x) * (d - target) ** 2).flatten(1).mean(1)


@torch.no_grad()
def esd_points(student, z: torch.Tensor, c_forget: torch.Tensor, sigmas: torch.Tensor, stop: int,
               guidance: float) -> torch.Tensor:
    """x at sigmas[stop]: the fine-tuned model's own guided Heun sampling of the forget condition, run from
    sigmas[0] for ``stop`` steps (the reference runs its DDIM sampler to a random step)."""
    was_training = student.training
    student.eval()
    x = sample_heun(Guided(student, guidance), z * float(sigmas[0]), sigmas[:stop + 1], c_forget)
    student.train(was_training)
    return x
