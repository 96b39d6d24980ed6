"""The one shape every backbone takes: D(x, sigma, cond) -> estimate of the clean x0.

x = x0 + sigma * n with n ~ N(0, I) (SFD.md section 2). Losses, samplers and the SFD loop
only ever see this interface; adapters in this package turn each backbone into it.

Conditions are backbone-specific tensors (class labels for class-conditional models, text
embeddings for Stable Diffusion); ``null_cond`` gives the unconditional condition used by
classifier-free guidance.
"""
from __future__ import annotations

import abc
import copy

import torch
from torch import nn


class Denoiser(nn.Module, abc.ABC):
    """Base class of all adapters.

    Subclasses implement :meth:`forward` and :meth:`null_cond`, and set ``sigma_min``,
    ``sigma_max``, ``sigma_data``, ``img_shape`` and ``num_classes`` (0 for text models).
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    img_shape: tuple[int, int, int] = (1, 8, 8)
    num_classes: int = 0

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Estimate of x0 from x = x0 + sigma * n under condition ``cond``."""

    @abc.abstractmethod
    def null_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional condition, shaped like ``cond`` (for classifier-free guidance)."""

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Weight of ||D(x, sigma) - x0||^2 native to the backbone (EDM's by default)."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Nearest noise level the backbone supports (identity for continuous models)."""
        return sigma

    def identity_parts(self) -> dict[str, bytes]:
        """What makes this model what it is beyond its state dict (the teacher's fingerprint reads both): none
        here; a text denoiser adds its frozen text encoder, which it holds outside the state dict."""
        return {}

    def clone(self) -> "Denoiser":
        """A trainable deep copy (used to initialise the fake score and the generator)."""
        twin = copy.deepcopy(self)
        twin.requires_grad_(True)
        return twin


def as_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """Broadcastable per-sample sigma of shape (B, 1, 1, 1) on x's device and dtype."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


class Guided(nn.Module):
    """Classifier-free guidance around any denoiser: (1 + w) D(x, c) - w D(x, null).

    Linear in the output, so the same formula holds for x0, epsilon or v predictions
    (SFD.md and the DDPM reference use (1 + w) eps(c) - w eps(null)). With w = 0 this is
    exactly the conditional denoiser and costs a single call.
    """

    def __init__(self, denoiser: Denoiser, scale: float, call=None, null=None):
        super().__init__()
        self.denoiser = denoiser
        self.scale = float(scale)
        # ``call`` runs the network (e.g. its DistributedDataParallel wrapper); default: the denoiser
        self._call = call
        # ``null(cond)``: the condition of the negative branch (a negative prompt); default: null_cond
        self._null = null

    def forward(self, x, sigma, cond):
        d = self.denoiser
        run = self._call if self._call is not None else d
        if self.scale == 0.0:
            return run(x, sigma, cond)
        sigma = as_sigma(sigma, x)
        null = (self._null or d.null_cond)(cond)
        both = run(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, null]))
        cond_out, null_out = both.chunk(2)
        return (1.0 + self.scale) * cond_out - self.scale * null_out
