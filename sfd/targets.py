"""Forget / override / remain conditions for class-conditional models (SFD.md section 5).

Labels are drawn from a caller-supplied torch.Generator for the *global* batch, so every
data-parallel rank draws the same numbers and takes its slice: one worker and N workers
see the same global batch for the same seed.
"""
from __future__ import annotations

import torch

from .config import SFDConfig


class ClassTargets:
    def __init__(self, cfg: SFDConfig, num_classes: int):
        self.num_classes = num_classes
        self.forget = list(cfg.forget)
        self.remain = [c for c in range(num_classes) if c not in self.forget]
        self.policy = cfg.override if cfg.override in ("random", "classifier") else "fixed"
        self.latent_draw = self.policy == "random" and cfg.override_draw == "latent"
        self.override = cfg.override_classes()            # aligned with forget, fixed policy only
        self._remain_t = torch.tensor(self.remain)
        self._forget_t = torch.tensor(self.forget)
        self._override_t = torch.tensor(self.override) if self.override else None

    def describe(self) -> str:
        if self.policy == "fixed":
            return ", ".join(f"{f}->{o}" for f, o in zip(self.forget, self.override))
        return f"{','.join(map(str, self.forget))}->{self.policy}"

    def sample_remain(self, n: int, gen: torch.Generator, all_classes: bool = False) -> torch.Tensor:
        """Remaining-class labels (every class when ``all_classes``: stage 1 of two-stage SFD)."""
        if all_classes:
            return torch.randint(0, self.num_classes, (n,), generator=gen)
        return self._remain_t[torch.randint(0, len(self.remain), (n,), generator=gen)]

    def sample_forget(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(forget labels, teacher override labels); override is None for the classifier policy,
        which is decided per sample from the fake score's output during the generator step."""
        pair = torch.randint(0, len(self.forget), (n,), generator=gen)
        c_forget = self._forget_t[pair]
        if self.policy == "fixed":
            return c_forget, self._override_t[pair]
        if self.policy == "random":
            return c_forget, self._remain_t[torch.randint(0, len(self.remain), (n,), generator=gen)]
        return c_forget, None

    def latent_override(self, z: torch.Tensor) -> torch.Tensor:
        """'random' tied to the latent (``override_draw: latent``): the override class of a forget
        sample is the argmax of K fixed orthonormal projections of its z (K remaining classes).

        Why: G(z, c_f) sees only z, so with a class drawn independently per sample (the
        reference) the generator step's expected pull on each z is towards *every* remaining
        class at once -- the divergences' sum is minimised by their geometric mean, a blend of
        all classes. A deterministic class per z makes the target a proper uniform mixture that
        a one-step generator can represent. The projections of z ~ N(0, I) onto orthonormal
        directions are i.i.d. N(0, 1), so each class gets probability 1/K.
        """
        flat = z.reshape(len(z), -1).float()
        if getattr(self, "_latent_proj", None) is None or self._latent_proj.shape[1] != flat.shape[1]:
            g = torch.Generator().manual_seed(20250101)
            q, _ = torch.linalg.qr(torch.randn(flat.shape[1], len(self.remain), generator=g))
            self._latent_proj = q.T.contiguous()                  # K x dim, orthonormal rows
        pick = (flat @ self._latent_proj.to(flat.device).T).argmax(dim=1)
        return self._remain_t.to(z.device)[pick]

    @torch.no_grad()
    def classifier_override(self, judge, y_fake: torch.Tensor) -> torch.Tensor:
        """Pseudo-label of each forget-branch fake-score output, forgotten classes masked out."""
        _, logits = judge.features_and_logits(y_fake.clamp(-1, 1))
        logits = logits.float().clone()
        logits[:, self.forget] = float("-inf")
        return logits.argmax(dim=1)

    def intended_override(self) -> list[int]:
        """Classes a forget-class output counts as correctly overridden to, per forget class."""
        if self.policy == "fixed":
            return [[o] for o in self.override]
        return [list(self.remain) for _ in self.forget]
