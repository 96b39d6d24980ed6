"""Dropout whose masks belong to the *global* batch: seeded, checkpointed, rank-independent.

The reference keeps dropout on in two passes of an SFD iteration (the fake score's own
denoising step and the generator's forward with gradient; SFD.md section 11). Plain
``nn.Dropout`` draws its masks from each process's global RNG, which is neither saved in a
checkpoint nor the same on N ranks as on one, so resumed and data-parallel runs drift for
every backbone with dropout (DDPM 0.1, EDM CIFAR-10 0.13).

Here, inside :func:`masks_for`, every dropout layer draws the mask of the *whole global
batch* from a generator seeded by (the pass's seed, the layer's name) and keeps the rows of
this rank's samples. The pass seed comes from the loop's checkpointed RNG, so

- a resumed run draws exactly the masks the uninterrupted run would have drawn;
- N workers apply, sample for sample, the masks one worker applies to the same global batch;
- a recomputation under gradient checkpointing redraws the same mask (the seed depends on
  the layer, not on how often it ran).

Outside that context (teacher pre-training) the layer is ordinary dropout.
"""
from __future__ import annotations

import contextlib
import zlib

import torch
from torch import nn
from torch.nn import functional as F

_ACTIVE: dict | None = None


class BatchDropout(nn.Module):
    """Drop-in replacement for ``nn.Dropout`` (no parameters; state dicts are unchanged)."""

    def __init__(self, p: float, name: str = ""):
        super().__init__()
        self.p = float(p)
        self.key = zlib.crc32(name.encode())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        ctx = _ACTIVE
        if ctx is None:
            return F.dropout(x, self.p, training=True)
        pick, n_global = ctx["pick"], ctx["n_global"]
        reps, rem = divmod(x.shape[0], len(pick))
        if rem:
            raise RuntimeError(f"dropout got {x.shape[0]} rows for a local batch of {len(pick)}")
        # classifier-free guidance stacks [cond; null] copies of the batch: one global block each
        rows = torch.cat([pick + j * n_global for j in range(reps)]).to(x.device)
        g = torch.Generator(device=x.device).manual_seed((ctx["seed"] * 1_000_003 + self.key) % 2**63)
        keep = torch.rand((reps * n_global, *x.shape[1:]), generator=g, device=x.device)[rows] >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)


def install_batch_dropout(module: nn.Module) -> int:
    """Replace every ``nn.Dropout`` with p > 0 in ``module`` by :class:`BatchDropout`; return how many."""
    count = 0
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            if type(sub) is nn.Dropout and sub.p > 0:
                full = f"{name}.{attr}" if name else attr
                setattr(child, attr, BatchDropout(sub.p, full))
                count += 1
    return count


@contextlib.contextmanager
def masks_for(pick: torch.Tensor, n_global: int, seed: int):
    """Within this block, dropout layers draw global-batch masks and keep rows ``pick``."""
    global _ACTIVE
    prev, _ACTIVE = _ACTIVE, {"pick": pick.cpu(), "n_global": int(n_global), "seed": int(seed)}
    try:
        yield
    finally:
        _ACTIVE = prev
