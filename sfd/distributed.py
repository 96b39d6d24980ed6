"""The data-parallel group an SFD run lives in, and the few collectives the loop needs.

Every decision that changes control flow (stop, evaluate, diverged) is taken from values that
are identical on every rank -- an all-reduced loss, rank 0's clock or rank 0's verdict
broadcast to all -- so no rank can leave a collective the others are still waiting in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Dist:
    """Rank and world size of the current process group (one process if none)."""
    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "Dist":
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return cls(torch.distributed.get_rank(), torch.distributed.get_world_size())
        return cls()

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        r = self.rank if rank is None else rank
        return r * n // self.world_size, (r + 1) * n // self.world_size

    def local(self, n: int) -> slice:
        """This rank's slice of a global batch of n (contiguous, sizes differ by at most 1)."""
        return slice(*self.bounds(n))

    def sum(self, values: list[float], device) -> list[float]:
        """Element-wise sum over ranks of a few floats (one small all-reduce)."""
        if self.world_size == 1:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64 if device.type != "mps" else torch.float32, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def decide(self, flag: bool, device) -> bool:
        """Rank 0's ``flag``, on every rank."""
        if self.world_size == 1:
            return bool(flag)
        t = torch.tensor([1.0 if (flag and self.lead) else 0.0], device=device)
        torch.distributed.broadcast(t, src=0)
        return bool(t.item() > 0)

    def all_true(self, flag: bool, device) -> bool:
        """Whether ``flag`` holds on every rank."""
        if self.world_size == 1:
            return bool(flag)
        t = torch.tensor([0.0 if flag else 1.0], device=device)
        torch.distributed.all_reduce(t)
        return bool(t.item() == 0)

    def gather_rows(self, local: torch.Tensor, sizes: list[int], device) -> torch.Tensor:
        """Concatenate every rank's ``local`` rows (rank r holds ``sizes[r]`` of them, in rank
        order); returns the whole array, on the CPU, on every rank."""
        if self.world_size == 1:
            return local.cpu()
        width = max(sizes)
        buf = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=device)
        buf[: len(local)] = local.to(device)
        parts = [torch.empty_like(buf) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, buf)
        return torch.cat([p[:s].cpu() for p, s in zip(parts, sizes)])

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()
