"""Class-conditional presets (digits, cifar10, stl10): forget / override / remain class ids (SFD.md section 5).

Labels are drawn from a caller-supplied torch.Generator for the *global* batch, so every
data-parallel rank draws the same numbers and takes its slice: one worker and N workers
see the same global batch for the same seed.
"""
from __future__ import annotations

import torch

from ..robustness import ClassSuite
from .base import Task

OVERRIDE_POLICIES = ("random", "classifier")


def override_classes(override: str, n_forget: int) -> list[int]:
    """Fixed override classes, one per forget class (empty for a per-sample policy)."""
    if override in OVERRIDE_POLICIES:
        return []
    try:
        targets = [int(s) for s in str(override).split(",")]
    except ValueError:
        raise ValueError(f"override {override!r} must be class ids like '1' or '1,2', or one of "
                         f"{OVERRIDE_POLICIES}") from None
    return targets * n_forget if len(targets) == 1 else targets


def parse_classes(text, preset, what: str = "--forget") -> list[int]:
    """Class ids or the preset's class names ('0'..'9' for digits, 'cat' for cifar10), comma-separated."""
    items = [t.strip() for t in str(text).split(",")]
    valid = ", ".join(f"{i}={n}" for i, n in enumerate(preset.class_names))
    if not any(items):
        raise ValueError(f"{what}: no class given — give class ids or names; valid classes: {valid}")
    out = []
    for t in items:
        if not t:
            raise ValueError(f"{what} {text!r}: empty entry — give comma-separated classes; valid classes: {valid}")
        if t in preset.class_names:
            c = preset.class_names.index(t)
        elif t.isascii() and t.isdigit():            # '³'.isdigit() is True too, and int('³') fails
            c = int(t)
        else:
            raise ValueError(f"{what} {t!r} is not a class of preset '{preset.name}' — valid classes: {valid}")
        if c in out:
            raise ValueError(f"{what} {text!r}: class {t!r} is given twice — give each class once; valid classes: "
                             f"{valid}")
        out.append(c)
    return out


class ClassTargets:
    teacher_null = None                  # the teacher's guidance branch: the null class

    def __init__(self, cfg, num_classes: int):
        self.num_classes = num_classes
        self.forget = list(cfg.forget)
        self.remain = [c for c in range(num_classes) if c not in self.forget]
        self.policy = cfg.override if cfg.override in OVERRIDE_POLICIES else "fixed"
        self.latent_draw = self.policy == "random" and cfg.override_draw == "latent"
        self.override = override_classes(cfg.override, len(self.forget))    # aligned with forget, fixed policy only
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


TEXT_ONLY = ("forget_concepts", "concept_synonyms", "prompt_templates", "forget_prompts", "remain_prompts")


class ClassTask(Task):
    """Conditions are class ids; the judge is a classifier; the export is generator.safetensors."""

    attacks = ClassSuite.attacks

    def robustness_suite(self, targets, judge, budget, teacher, extra_prompts=None, *, cfg=None, neighbors=None):
        if neighbors:
            raise ValueError("--neighbor-prompts is for Stable Diffusion runs; class presets report every remaining "
                             "class as a side-effect cell — drop it")
        if extra_prompts:
            raise ValueError("--prompts-file is for text presets (colordigits); class presets have no prompts")
        return ClassSuite(targets, judge, budget, self.preset)

    def validate(self, cfg) -> None:
        preset = self.preset
        if any(getattr(cfg, k) for k in TEXT_ONLY):
            raise ValueError(f"forget_concepts / concept_synonyms / prompt_templates / forget_prompts / remain_prompts "
                             f"need a text-to-image preset (colordigits, sd); preset '{preset.name}' forgets classes — "
                             f"use --forget CLASS")
        if not cfg.forget:
            raise ValueError("forget: no class given — give at least one class to forget, e.g. --forget 0")
        cfg.forget = [preset.check_class(c, "forget class") for c in cfg.forget]
        twice = sorted({c for c in cfg.forget if cfg.forget.count(c) > 1})
        if twice:
            raise ValueError(f"forget {cfg.forget}: class {twice[0]} is given twice — give each class once")
        if len(set(cfg.forget)) == preset.num_classes:
            raise ValueError(f"forget: all {preset.num_classes} classes of '{preset.name}' are forgotten; "
                             f"nothing would remain to override them with")
        if cfg.override == "next":           # c -> c + 1, skipping forgotten classes (as the sweep's targets)
            cfg.override = self.resolve_override(tuple(cfg.forget), "next")
        if cfg.override not in OVERRIDE_POLICIES:
            targets = override_classes(cfg.override, len(cfg.forget))
            if len(targets) not in (1, len(cfg.forget)):
                raise ValueError(f"override {cfg.override!r}: give one class, one per forget class "
                                 f"({len(cfg.forget)}), or one of {OVERRIDE_POLICIES}")
            for c in targets:
                preset.check_class(c, "override class")
                if c in cfg.forget:
                    raise ValueError(f"override class {c} is itself forgotten ({cfg.forget}); choose a "
                                     f"remaining class, 'random' or 'classifier'")
        if cfg.lora_rank:
            raise ValueError(f"lora_rank (--lora-rank) {cfg.lora_rank}: LoRA on the shared teacher is for the "
                             f"diffusers text UNets (presets colordigits, sd), not preset '{preset.name}' — drop it")

    def settings_from_flags(self, given: dict) -> dict:
        given = dict(given)
        if "forget" in given:
            given["forget"] = [c for item in given["forget"] for c in parse_classes(item, self.preset, "--forget")]
        if "override" in given and given["override"] not in OVERRIDE_POLICIES:
            items = [t.strip() for t in str(given["override"]).split(",")]
            if all(t in self.preset.class_names or t.isdigit() for t in items) and all(items):
                given["override"] = ",".join(str(c) for c in parse_classes(given["override"], self.preset,
                                                                          "--override"))
        return given

    def targets(self, cfg, teacher):
        return ClassTargets(cfg, teacher.num_classes)

    # -- chained forgetting (sfd.chain) ----------------------------------------------------------------------
    def chain_pairs(self, cfg) -> list[tuple[str, str]]:
        """(target, override) of a validated configuration: override a class id or a policy."""
        overrides = override_classes(cfg.override, len(cfg.forget)) or [cfg.override] * len(cfg.forget)
        return [(str(f), str(o)) for f, o in zip(cfg.forget, overrides)]

    def chain_settings(self, earlier: list[tuple[str, str]], cfg, run: str) -> dict:
        """The settings that forget ``earlier`` (the pairs of run ``run``) and this stage's targets of ``cfg``
        (flags as parsed; 'next' resolved against every forgotten class). Raises ValueError for what a chain
        cannot do."""
        before = {int(t): o for t, o in earlier}
        policies = {o for o in before.values() if o in OVERRIDE_POLICIES}
        new = [self.preset.check_class(c, "forget class") for c in cfg.forget]
        every = list(before) + [c for c in new if c not in before]
        given = str(cfg.override)
        old_policy = next(iter(policies), None)          # a validated run: one policy, or fixed classes
        if given in OVERRIDE_POLICIES or old_policy:
            if given != old_policy:
                raise ValueError(f"override {given!r}: {run} overrode {sorted(before)} with "
                                 f"{old_policy or 'fixed classes'}; a chain keeps one override policy (random / "
                                 f"classifier) or fixed classes throughout — give --override "
                                 f"{old_policy or 'next (or a class id)'}")
            return {"forget": every, "override": given}
        if given == "next":
            resolved = self.resolve_override(tuple(every), "next").split(",")
            mine = dict(zip(every, resolved))
            overrides = [mine[c] for c in new]
        else:
            overrides = override_classes(given, len(new))
            if len(overrides) != len(new):
                raise ValueError(f"override {given!r}: give one class, or one per forget class ({len(new)})")
        for c, o in zip(new, overrides):
            o = str(o)
            if c in before and given != "next" and before[c] != o:
                raise ValueError(f"forget {c}: {run} already forgot it with override {before[c]}; a chain cannot "
                                 f"change an earlier override — give --override {before[c]} or leave {c} out")
            if o.isdigit() and int(o) in before:
                raise ValueError(f"override {o} (for {c}) was forgotten by an earlier stage ({run} forgot "
                                 f"{sorted(before)}) — choose a class that remains, or --override next")
            if str(c) in before.values():
                olds = [t for t, v in before.items() if v == str(c)]
                raise ValueError(f"forget {c}: it is the override of {olds} forgotten by {run}; forgetting it would "
                                 f"undo that — forget another class, or start a new chain")
        overrides = [before[c] for c in before] + [str(o) for c, o in zip(new, overrides) if c not in before]
        return {"forget": every, "override": ",".join(overrides)}

    # -- the sweep ---------------------------------------------------------------------------------------
    def parse_forget(self, items, spec: str) -> tuple:
        out = []
        for s in items:
            s = str(s).strip()
            if s.isascii() and s.isdigit():          # '³'.isdigit() is True too, and int('³') fails
                c = int(s)
            elif s in self.preset.class_names:
                c = self.preset.class_names.index(s)
            else:
                c = s
            try:
                out.append(self.preset.check_class(c, "class"))
            except ValueError as e:
                raise ValueError(f"target {spec!r}: {e}") from None
            if out.count(out[-1]) > 1:
                raise ValueError(f"target {spec!r}: class {s!r} is forgotten twice — give each class once")
        return tuple(out)

    def resolve_override(self, forget: tuple, override: str) -> str:
        """'next' -> c + 1 (skipping forgotten classes); class names ('dog', 'cat,dog') -> ids; policies and ids
        as given."""
        preset = self.preset
        if override not in ("next", *OVERRIDE_POLICIES):
            items = [s.strip() for s in override.split(",")]
            return ",".join(str(preset.class_names.index(s)) if s in preset.class_names and not s.isdigit() else s
                            for s in items)
        if override == "next":
            nxt = []
            for c in forget:
                o = (c + 1) % preset.num_classes
                while o in forget:
                    o = (o + 1) % preset.num_classes
                nxt.append(str(o))
            return ",".join(nxt)
        return override
