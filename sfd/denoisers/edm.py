"""EDM preconditioning (Karras et al. 2022) around any raw class-conditional backbone.

D(x, sigma, c) = c_skip x + c_out F(c_in x, c_noise, c) with
c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4 (SFD.md section 2).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Denoiser, as_sigma


def edm_coefficients(sigma: torch.Tensor, sigma_data: float):
    """(c_skip, c_out, c_in, c_noise) for per-sample sigma."""
    s2, d2 = sigma**2, sigma_data**2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1.0 / (s2 + d2).sqrt()
    c_noise = sigma.log() / 4.0
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(Denoiser):
    """Class-conditional EDM denoiser; ``labels == num_classes`` selects the null condition."""

    def __init__(self, model: nn.Module, num_classes: int, img_shape, sigma_data: float = 0.5,
                 sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        self.model = model
        self.num_classes = int(num_classes)
        self.img_shape = tuple(img_shape)
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def forward(self, x, sigma, cond):
        sigma = as_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        f = self.model(c_in * x, c_noise.flatten(), cond)
        return c_skip * x + c_out * f.to(x.dtype)

    def null_cond(self, cond):
        return torch.full_like(cond, self.num_classes)
