"""SFDConfig: the one place where SFD's defaults live (CLI, sweep and tests all read it).

Defaults are tuned for the embedded digits preset on a CPU (SFD.md section 10: the paper's
learning rate 1e-5 is far too slow for small models; a small forget weight collapses the
overridden class onto one template). Real-model presets override them from their YAML
search space's ``defaults`` block (e.g. ``search_spaces/cifar10.yaml`` holds the paper's).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

OVERRIDE_POLICIES = ("random", "classifier")
SIGMA_DISTS = ("loguniform", "vp-t", "edm")
FAKE_SIGMA_DISTS = ("same", *SIGMA_DISTS, "lognormal")
PRECISIONS = ("fp32", "bf16", "fp16")
REDUCTIONS = ("sum", "mean")


@dataclass
class SFDConfig:
    # what to forget -------------------------------------------------------------------
    preset: str = "digits"
    forget: list[int] = field(default_factory=lambda: [0])
    # a class id per forget class ("1" or "1,2"), or "random" / "classifier" (SFD.md section 5)
    override: str = "1"
    teacher: str | None = None          # None: the preset's bundled teacher
    classifier: str | None = None       # None: the preset's bundled classifier (the judge)
    fid_weights: str | None = None      # FID Inception weights file (presets without a bundled judge)
    reference: str | None = None        # real images per class: folder of class folders, or .npz
    init_from: str | None = None        # an SFD checkpoint (generator + fake score) to start from
    # loss (SFD.md section 4) ----------------------------------------------------------------
    alpha: float = 1.2
    lambda_fake_remain: float = 1.0
    lambda_fake_forget: float = 1.0
    lambda_gen_remain: float = 1.0
    lambda_gen_forget: float = 1.0
    guidance: float = 0.0               # CFG scale of teacher and fake score inside the losses
    # noise levels ------------------------------------------------------------------------
    sigma_init: float = 2.5
    sigma_dist: str = "loguniform"      # 'loguniform', 'vp-t' (reference) or 'edm' (SiD)
    sigma_min: float = 0.137
    sigma_max: float = 13.1
    # the fake-score step's own distribution: 'same' as above, or e.g. 'lognormal' (SiD: EDM's
    # ln sigma ~ N(-1.2, 1.2^2) for the fake score, the Karras grid for the generator)
    sigma_dist_fake: str = "same"
    # reference: the fake-score loss sums over pixels; 'mean' divides it by C*H*W (a deviation:
    # with clip-by-value it changes which gradients are clipped)
    fake_score_reduction: str = "sum"
    # optimisation ------------------------------------------------------------------------
    lr_fake: float = 1e-4
    lr_gen: float = 1e-4
    adam_beta1: float = 0.0
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0              # clip gradients by value (reference); 0 disables
    batch_remain: int = 64
    batch_forget: int = 64
    ema_halflife_kimg: float = 5.0      # 0 disables the generator EMA
    ema_rampup_ratio: float = 0.5       # half-life <= this * kimg so far (SiD/EDM: 0.05); 0: no ramp
    ema_beta: float = 0.0               # > 0: a constant decay per iteration instead (DDPM reference: 0.9999)
    # schedule ----------------------------------------------------------------------------
    budget_kimg: float = 40.0           # generator images (both branches) to train for
    max_seconds: float = 0.0            # wall-clock cap; 0 means none
    stage1_kimg: float = 0.0            # two-stage: distil with lambda_*_forget = 0 first
    eval_every_kimg: float = 5.0
    checkpoint_every_kimg: float = 10.0
    eval_forget_samples: int = 1000     # UA is measured on this many forget-class samples
    eval_remain_per_class: int = 200    # FD over the remaining classes at this count per class
    # run ---------------------------------------------------------------------------------
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"             # network passes in fp32, bf16 or fp16 (fp32 master weights and losses)
    grad_checkpointing: bool = False    # recompute activations in backward (backbones that support it)

    def validate(self, preset=None) -> "SFDConfig":
        from .presets import get_preset
        preset = preset or get_preset(self.preset)
        if self.init_from in ("none", "teacher", ""):
            self.init_from = None               # start from copies of the teacher
        if not self.forget:
            raise ValueError("forget: give at least one class to forget")
        self.forget = [preset.check_class(int(c), "forget class") for c in self.forget]
        if len(set(self.forget)) == preset.num_classes:
            raise ValueError(f"forget: all {preset.num_classes} classes of '{preset.name}' are forgotten; "
                             f"nothing would remain to override them with")
        if self.override not in OVERRIDE_POLICIES:
            targets = self.override_classes()
            if len(targets) not in (1, len(self.forget)):
                raise ValueError(f"override {self.override!r}: give one class, one per forget class "
                                 f"({len(self.forget)}), or one of {OVERRIDE_POLICIES}")
            for c in targets:
                preset.check_class(c, "override class")
                if c in self.forget:
                    raise ValueError(f"override class {c} is itself forgotten ({self.forget}); choose a "
                                     f"remaining class, 'random' or 'classifier'")
        for name, allowed in (("sigma_dist", SIGMA_DISTS), ("sigma_dist_fake", FAKE_SIGMA_DISTS),
                              ("precision", PRECISIONS), ("fake_score_reduction", REDUCTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} must be one of {allowed}")
        if not 0 <= self.ema_beta < 1:
            raise ValueError(f"ema_beta must be in [0, 1) (0: use ema_halflife_kimg), got {self.ema_beta}")
        if self.ema_rampup_ratio < 0 or self.ema_halflife_kimg < 0:
            raise ValueError(f"ema_rampup_ratio and ema_halflife_kimg must be >= 0, got "
                             f"{self.ema_rampup_ratio}, {self.ema_halflife_kimg}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        for name in ("lr_fake", "lr_gen", "sigma_init", "budget_kimg"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("batch_remain", "batch_forget"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        return self

    def override_classes(self) -> list[int]:
        """Fixed override classes, one per forget class (empty for a per-sample policy)."""
        if self.override in OVERRIDE_POLICIES:
            return []
        try:
            targets = [int(s) for s in str(self.override).split(",")]
        except ValueError:
            raise ValueError(f"override {self.override!r} must be class ids like '1' or '1,2', or one of "
                             f"{OVERRIDE_POLICIES}") from None
        return targets * len(self.forget) if len(targets) == 1 else targets

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SFDConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SFD setting(s) {unknown}; known settings: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> "SFDConfig":
        return SFDConfig.from_dict({**self.to_dict(), **changes})


def spaces_dir():
    """``search_spaces/`` beside the package: one YAML per preset, the one source of preset defaults."""
    from pathlib import Path
    return Path(__file__).resolve().parent.parent / "search_spaces"


def preset_defaults(preset: str) -> dict:
    """The ``defaults`` block of ``search_spaces/<preset>.yaml``: what `sfd forget --preset X` and
    the sweep's baseline trial both start from (SFDConfig's own defaults fill the rest)."""
    import yaml
    path = spaces_dir() / f"{preset}.yaml"
    if not path.is_file():
        return {}
    doc = yaml.safe_load(path.read_text()) or {}
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ValueError(f"{path}: 'defaults' must be a mapping of SFD settings")
    return dict(defaults)


def config_for_preset(preset: str, **changes) -> SFDConfig:
    """SFDConfig defaults, then the preset's YAML defaults, then ``changes``."""
    return SFDConfig.from_dict({**preset_defaults(preset), **changes, "preset": preset})


TUNABLE = ("alpha", "lambda_fake_remain", "lambda_fake_forget", "lambda_gen_remain", "lambda_gen_forget",
           "sigma_init", "sigma_min", "sigma_max", "sigma_dist", "sigma_dist_fake", "lr_fake", "lr_gen",
           "ema_halflife_kimg", "ema_beta", "guidance", "batch_remain", "batch_forget")


# One line of help per setting, shown by `sfd forget --help` (flags are generated from the
# dataclass, so the CLI never restates a default).
HELP = {
    "preset": "dataset preset",
    "forget": "class id(s) to forget (repeat the flag or give '0,3')",
    "override": "override per forget class: a class id ('1', or '1,2' aligned with --forget), "
                "'random' (a uniform remaining class per sample) or 'classifier' (pseudo-label)",
    "teacher": "teacher checkpoint (default: the preset's bundled teacher)",
    "classifier": "classifier / feature network for UA and FD (default: the preset's bundled one)",
    "fid_weights": "FID Inception weights file (pt_inception-2015-12-05-*.pth) for presets without a bundled "
                   "judge; with --classifier (a ResNet-34 state dict) and --reference it enables UA/FD",
    "reference": "real images for FD: a folder with one sub-folder per class (name or id), or an .npz with "
                 "'images' (N,H,W,C uint8) and 'labels'",
    "init_from": "start generator and fake score from an earlier SFD run, a stage-1 folder (`sfd distil`), "
                 "'stage1' (the preset's bundled stage 1) or 'none' (copies of the teacher)",
    "alpha": "alpha of the SiD/SFD generator loss",
    "lambda_fake_remain": "weight of the remain branch in the fake-score loss",
    "lambda_fake_forget": "weight of the forget branch in the fake-score loss",
    "lambda_gen_remain": "weight of the remain branch in the generator loss",
    "lambda_gen_forget": "weight of the forget branch in the generator loss",
    "guidance": "classifier-free guidance scale of teacher and fake score inside the losses",
    "sigma_init": "noise level of the one-step generator, G(z) = D(sigma_init z, sigma_init)",
    "sigma_dist": "noise-level distribution of both steps: loguniform, vp-t (reference) or edm (SiD)",
    "sigma_min": "smallest noise level of both steps",
    "sigma_max": "largest noise level of both steps",
    "lr_fake": "Adam learning rate of the fake score",
    "lr_gen": "Adam learning rate of the generator",
    "adam_beta1": "Adam beta1", "adam_beta2": "Adam beta2", "adam_eps": "Adam epsilon",
    "grad_clip": "clip gradients by value (0 disables)",
    "batch_remain": "global batch of the remain branch",
    "batch_forget": "global batch of the forget branch",
    "ema_halflife_kimg": "generator EMA half-life in kimg (0 disables)",
    "ema_rampup_ratio": "EMA ramp-up: the half-life is at most this times the kimg trained so far (SiD: 0.05; 0: off)",
    "ema_beta": "constant EMA decay per iteration, like the DDPM reference's 0.9999 (0: use the half-life)",
    "sigma_dist_fake": "noise levels of the fake-score step: 'same' as --sigma-dist, or loguniform, vp-t, edm, "
                       "lognormal (SiD: EDM's ln sigma ~ N(-1.2, 1.2^2))",
    "fake_score_reduction": "fake-score loss over pixels: 'sum' (reference) or 'mean' (C*H*W times smaller)",
    "precision": "network passes in fp32, bf16 or fp16 autocast; weights, optimiser and losses stay fp32 "
                 "(fp16 adds a gradient scaler)",
    "grad_checkpointing": "recompute activations in the backward pass to save memory (DDPM, EDM and diffusers "
                          "backbones)",
    "budget_kimg": "training length in thousands of generator images",
    "max_seconds": "stop after this much training time (0: no limit)",
    "stage1_kimg": "two-stage: distil all classes with the forget weights at 0 for this many kimg first",
    "eval_every_kimg": "evaluate UA / FD every this many kimg",
    "checkpoint_every_kimg": "write a checkpoint every this many kimg",
    "eval_forget_samples": "forget-class samples for UA",
    "eval_remain_per_class": "samples per remaining class for FD (the teacher is measured at the same count)",
    "seed": "random seed",
    "device": "'auto' (CUDA if present), 'cpu', 'cuda:0', ...",
}
