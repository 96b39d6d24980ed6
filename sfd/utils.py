"""Small shared helpers: device choice, seeding, EMA, command line capture."""
from __future__ import annotations

import os
import random
import shlex
import sys

import numpy as np
import torch


def pick_device(name: str | None = None) -> torch.device:
    """``auto`` (or None) takes CUDA when present, else the CPU."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, beta: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1.0 - beta)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def ema_beta(batch: int, halflife_kimg: float) -> float:
    """Per-step EMA decay for a half-life measured in thousands of images (EDM's convention)."""
    if halflife_kimg <= 0:
        return 0.0
    return 0.5 ** (batch / (halflife_kimg * 1000.0))


def command_line() -> str:
    prog = os.path.basename(sys.argv[0]) if sys.argv else "sfd"
    if prog == "__main__.py":      # python -m sfd
        prog = "sfd"
    return " ".join(shlex.quote(a) for a in [prog, *sys.argv[1:]])
