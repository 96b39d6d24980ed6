"""SFDConfig: the one place where SFD's defaults live (CLI, sweep and tests all read it).

Defaults are tuned for the embedded digits preset on a CPU (SFD.md section 10: the paper's
learning rate 1e-5 is far too slow for small models; a small forget weight collapses the
overridden class onto one template). Real-model presets override them from their YAML
search space's ``defaults`` block (e.g. ``search_spaces/cifar10.yaml`` holds the paper's).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field, fields

from .presets import get_preset
from .tasks import get_task

SIGMA_DISTS = ("loguniform", "vp-t", "sd-t", "edm")
FAKE_SIGMA_DISTS = ("same", *SIGMA_DISTS, "lognormal")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
REDUCTIONS = ("sum", "mean")
OVERRIDE_DRAWS = ("sample", "latent")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class SFDConfig:
    # what to forget -------------------------------------------------------------------
    preset: str = "digits"
    forget: list[int] = field(default_factory=lambda: [0])
    # a class id per forget class ("1" or "1,2"), or "random" / "classifier" (SFD.md section 5)
    override: str = "1"
    # how the 'random' policy draws each forget sample's override class: 'sample' (the reference:
    # independently per sample) or 'latent' (a fixed function of the sample's latent z, so the
    # one-step generator can map regions of z onto distinct classes; see sfd/tasks/classes.py)
    override_draw: str = "sample"
    # text presets (colordigits): concepts (words / phrases) to forget from every prompt; --override
    # then names override concepts ('one', 'one,blue' aligned, or 'next'); --forget fills this there
    forget_concepts: list[str] = field(default_factory=list)
    concept_synonyms: dict = field(default_factory=dict)     # concept -> extra synonyms forgotten with it
    prompt_templates: list[str] = field(default_factory=list)  # training templates ({color} {word} {num})
    # sd preset: prompt files (one prompt per line); None: the small embedded lists of sfd/tasks/stable_diffusion.py
    forget_prompts: str | None = None
    remain_prompts: str | None = None
    teacher: str | None = None          # None: the preset's bundled teacher
    # a Hugging Face hub id as --teacher is fetched (diffusers' download, safetensors) only when allowed
    allow_download: bool = False
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
    # the three guided passes separately (SiD-LSG / the SFD SD recipe); -1: take --guidance
    guidance_teacher: float = -1.0
    guidance_fake_train: float = -1.0
    guidance_fake_eval: float = -1.0
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
    # 'constant' (the reference) or 'cosine': both rates decay to lr_final_ratio x over the budget
    lr_schedule: str = "constant"
    lr_final_ratio: float = 0.1
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
    eval_at_start: bool = True          # also evaluate the starting point (iteration 0)
    checkpoint_every_kimg: float = 10.0
    eval_forget_samples: int = 1000     # UA is measured on this many forget-class samples
    eval_remain_per_class: int = 200    # FD over the remaining classes at this count per class
    # run ---------------------------------------------------------------------------------
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"             # network passes in fp32, bf16 or fp16 (fp32 master weights and losses)
    grad_checkpointing: bool = False    # recompute activations in backward (backbones that support it)
    # > 0: generator and fake score are LoRA adapters of this rank on the one frozen teacher UNet
    # (text UNets: colordigits, sd); 0: full fine-tuning of two copies (the reference)
    lora_rank: int = 0

    def validate(self, preset=None) -> "SFDConfig":
        """Check every setting (type, finiteness, range) before any work; raise ValueError naming the
        setting, the bad value and the fix."""
        check_types(self)
        preset = preset or get_preset(self.preset)
        if self.init_from in ("none", "teacher", ""):
            self.init_from = None               # start from copies of the teacher
        get_task(preset).validate(self)         # targets and the settings that depend on the kind of preset
        for name, allowed in (("sigma_dist", SIGMA_DISTS), ("sigma_dist_fake", FAKE_SIGMA_DISTS),
                              ("precision", PRECISIONS), ("fake_score_reduction", REDUCTIONS),
                              ("override_draw", OVERRIDE_DRAWS), ("lr_schedule", LR_SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} must be one of {allowed}")
        for name, (lo, lo_open, hi, hi_open, fix) in RANGES.items():
            v = getattr(self, name)
            if not math.isfinite(v):
                raise ValueError(f"{_flag(name)} {v!r} is not a finite number — give {fix}")
            if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
                raise ValueError(f"{_flag(name)} {v!r} is out of range — give {fix}")
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max} — "
                             f"give --sigma-min below --sigma-max")
        check_device(self.device)
        return self

    def guidance_of(self, role: str) -> float:
        """CFG scale of one guided pass: 'teacher', 'fake_train' or 'fake_eval' (-1: --guidance)."""
        v = getattr(self, f"guidance_{role}")
        return self.guidance if v < 0 else v

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SFDConfig":
        """From a mapping (YAML, JSON): unknown keys are errors; an int where a float is expected
        becomes a float (YAML writes 1 for 1.0); strings are never turned into numbers."""
        if not isinstance(d, dict):
            raise ValueError(f"SFD settings must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SFD setting(s) {unknown}; known settings: {sorted(known)}")
        d = dict(d)
        for name in FLOAT_FIELDS:
            v = d.get(name)
            if isinstance(v, int) and not isinstance(v, bool):
                d[name] = float(v)
        cfg = cls(**d)
        check_types(cfg)
        return cfg

    def replace(self, **changes) -> "SFDConfig":
        return SFDConfig.from_dict({**self.to_dict(), **changes})


def _flag(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


FLOAT_FIELDS = ("alpha", "lambda_fake_remain", "lambda_fake_forget", "lambda_gen_remain", "lambda_gen_forget",
                "guidance", "sigma_init", "sigma_min", "sigma_max", "lr_fake", "lr_gen", "lr_final_ratio", "adam_beta1", "adam_beta2",
                "adam_eps", "grad_clip", "ema_halflife_kimg", "ema_rampup_ratio", "ema_beta", "budget_kimg",
                "max_seconds", "stage1_kimg", "eval_every_kimg", "checkpoint_every_kimg", "guidance_teacher",
                "guidance_fake_train", "guidance_fake_eval")
INT_FIELDS = ("batch_remain", "batch_forget", "eval_forget_samples", "eval_remain_per_class", "seed", "lora_rank")
STR_FIELDS = ("preset", "override", "override_draw", "lr_schedule", "sigma_dist", "sigma_dist_fake", "fake_score_reduction",
              "device", "precision")
PATH_FIELDS = ("teacher", "classifier", "fid_weights", "reference", "init_from", "forget_prompts", "remain_prompts")
BIG = 10**9

# name -> (low, low excluded, high, high excluded, what to give instead)
RANGES = {
    "alpha": (-1e6, False, 1e6, False, "a finite alpha, e.g. 1.2"),
    "lambda_fake_remain": (0.0, False, 1e6, False, "a weight >= 0"),
    "lambda_fake_forget": (0.0, False, 1e6, False, "a weight >= 0"),
    "lambda_gen_remain": (0.0, False, 1e6, False, "a weight >= 0"),
    "lambda_gen_forget": (0.0, False, 1e6, False, "a weight >= 0"),
    "guidance": (0.0, False, 1e3, False, "a guidance scale in [0, 1000] (0: none)"),
    "guidance_teacher": (-1.0, False, 1e3, False, "a guidance scale in [0, 1000], or -1 for --guidance"),
    "guidance_fake_train": (-1.0, False, 1e3, False, "a guidance scale in [0, 1000], or -1 for --guidance"),
    "guidance_fake_eval": (-1.0, False, 1e3, False, "a guidance scale in [0, 1000], or -1 for --guidance"),
    "sigma_init": (0.0, True, 1000.0, False, "a noise level in (0, 1000], e.g. 2.5"),
    "sigma_min": (0.0, True, 1000.0, False, "a noise level in (0, 1000], e.g. 0.137"),
    "sigma_max": (0.0, True, 1000.0, False, "a noise level in (0, 1000], e.g. 13.1"),
    "lr_fake": (0.0, True, 1.0, False, "a learning rate in (0, 1], e.g. 1e-4"),
    "lr_gen": (0.0, True, 1.0, False, "a learning rate in (0, 1], e.g. 1e-4"),
    "lr_final_ratio": (0.0, False, 1.0, False, "a ratio in [0, 1], e.g. 0.1"),
    "adam_beta1": (0.0, False, 1.0, True, "a value in [0, 1)"),
    "adam_beta2": (0.0, False, 1.0, True, "a value in [0, 1)"),
    "adam_eps": (0.0, True, 1.0, False, "a small epsilon in (0, 1], e.g. 1e-8"),
    "grad_clip": (0.0, False, 1e9, False, "a clip value >= 0 (0 disables)"),
    "ema_halflife_kimg": (0.0, False, 1e9, False, "a half-life >= 0 (0 disables the EMA)"),
    "ema_rampup_ratio": (0.0, False, 1e9, False, "a ratio >= 0 (0: no ramp-up)"),
    "ema_beta": (0.0, False, 1.0, True, "a decay in [0, 1) (0: use ema_halflife_kimg)"),
    "budget_kimg": (0.0, True, 1e9, False, "a positive budget in kimg, e.g. 40"),
    "max_seconds": (0.0, False, 1e12, False, "seconds >= 0 (0: no limit)"),
    "stage1_kimg": (0.0, False, 1e9, False, "kimg >= 0 (0: one stage)"),
    "eval_every_kimg": (0.0, True, 1e9, False, "a positive interval in kimg"),
    "checkpoint_every_kimg": (0.0, True, 1e9, False, "a positive interval in kimg"),
    "batch_remain": (1, False, 1_000_000, False, "a batch of at least 1"),
    "batch_forget": (1, False, 1_000_000, False, "a batch of at least 1"),
    "eval_forget_samples": (1, False, BIG, False, "at least 1 sample"),
    "eval_remain_per_class": (1, False, BIG, False, "at least 1 sample per class"),
    "seed": (0, False, 2**63 - 1, False, "a seed >= 0"),
    "lora_rank": (0, False, 1024, False, "a LoRA rank in 1..1024, or 0 for full fine-tuning"),
}


def check_types(cfg: "SFDConfig") -> None:
    """Every setting has its declared type: an int where an int is expected (64.5 is an error), a
    number where a float is expected (a string is an error, even '1e-4'), no bools for numbers."""
    def bad(name, v, want):
        return ValueError(f"{name} {v!r} ({type(v).__name__}) must be {want} — fix the value of {name}")
    for name in FLOAT_FIELDS:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise bad(name, v, "a number")
        setattr(cfg, name, float(v))
    for name in INT_FIELDS:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise bad(name, v, "a whole number (an int)")
        setattr(cfg, name, int(v))
    for name in STR_FIELDS:
        v = getattr(cfg, name)
        if not isinstance(v, str):
            raise bad(name, v, "a string")
    for name in PATH_FIELDS:
        v = getattr(cfg, name)
        if v is not None and not isinstance(v, str):
            raise bad(name, v, "a path (a string) or null")
        if isinstance(v, str) and not v.strip():
            raise ValueError(f"{name}: empty path — give a file or folder, or leave it out")
    for name in ("grad_checkpointing", "eval_at_start", "allow_download"):
        if not isinstance(getattr(cfg, name), bool):
            raise bad(name, getattr(cfg, name), "true or false")
    for name in ("forget_concepts", "prompt_templates"):
        v = getattr(cfg, name)
        if not isinstance(v, (list, tuple)) or not all(isinstance(t, str) for t in v):
            raise bad(name, v, "a list of strings")
        setattr(cfg, name, list(v))
    syn = cfg.concept_synonyms
    if not isinstance(syn, dict) or not all(isinstance(k, str) and isinstance(vs, (list, tuple))
                                            and all(isinstance(t, str) for t in vs) for k, vs in syn.items()):
        raise bad("concept_synonyms", syn, "a mapping of concept -> list of synonym strings")
    cfg.concept_synonyms = {k: list(vs) for k, vs in syn.items()}
    if not isinstance(cfg.forget, (list, tuple)):
        raise bad("forget", cfg.forget, "a list of class ids")
    for c in cfg.forget:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral):
            raise bad("forget", c, "a class id (an int)")
    cfg.forget = [int(c) for c in cfg.forget]


def check_device(name) -> None:
    """A valid torch device string whose device is present ('auto' always is)."""
    import torch
    if name in ("auto",):
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"device {name!r} is not a torch device ({e}) — give 'auto', 'cpu', 'cuda' or "
                         f"'cuda:0'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}) — use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) — give "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r}: MPS is not available on this machine — use --device cpu or auto")
    elif dev.type != "cpu":
        raise ValueError(f"device {name!r}: sfd runs on 'cpu' or 'cuda' — give 'auto', 'cpu' or 'cuda:0'")


def spaces_dir():
    """``search_spaces/`` beside the package: one YAML per preset, the one source of preset defaults."""
    from pathlib import Path
    return Path(__file__).resolve().parent.parent / "search_spaces"


def preset_block(preset: str, block: str = "defaults") -> dict | None:
    """A settings block of ``search_spaces/<preset>.yaml`` (None where the file or block is absent)."""
    import yaml
    path = spaces_dir() / f"{preset}.yaml"
    if not path.is_file():
        return None
    doc = yaml.safe_load(path.read_text()) or {}
    if doc.get(block) is None:
        return None
    if not isinstance(doc[block], dict):
        raise ValueError(f"{path}: '{block}' must be a mapping of SFD settings")
    return dict(doc[block])


def preset_defaults(preset: str, override: str | None = None) -> dict:
    """The ``defaults`` block of ``search_spaces/<preset>.yaml``: what `sfd forget --preset X` and
    the sweep's baseline trial both start from (SFDConfig's own defaults fill the rest); with
    ``override``, its ``override_defaults`` entry for that policy on top (e.g. 'random')."""
    base = preset_block(preset, "defaults") or {}
    if override is None:
        return base
    return {**base, **override_defaults(preset).get(str(override), {})}


def override_defaults(preset: str) -> dict:
    """``override_defaults`` of the preset's YAML: policy ('random', 'classifier') -> the settings
    that policy's runs default to on top of ``defaults`` ({} where there is none)."""
    block = preset_block(preset, "override_defaults") or {}
    if not all(isinstance(v, dict) for v in block.values()):
        raise ValueError(f"{spaces_dir() / f'{preset}.yaml'}: 'override_defaults' must map an override policy to "
                         f"a mapping of SFD settings")
    return {str(k): dict(v) for k, v in block.items()}


def preset_stage1_settings(preset: str) -> dict:
    """The settings stage 1 distils with: the YAML's ``stage1`` block on SFDConfig's own defaults
    where the preset has one (so tuning the forgetting's ``defaults`` never changes the shared
    stage 1 or its key), else the ``defaults`` block."""
    block = preset_block(preset, "stage1")
    return block if block is not None else preset_defaults(preset)


def config_for_preset(preset: str, **changes) -> SFDConfig:
    """SFDConfig defaults, then the preset's YAML defaults (with its ``override_defaults`` for the
    override policy the result has), then ``changes``."""
    base = preset_defaults(preset)
    policy = override_defaults(preset).get(str(changes.get("override", base.get("override", SFDConfig.override))), {})
    return SFDConfig.from_dict({**base, **policy, **changes, "preset": preset})


TUNABLE = ("alpha", "lambda_fake_remain", "lambda_fake_forget", "lambda_gen_remain", "lambda_gen_forget",
           "sigma_init", "sigma_min", "sigma_max", "sigma_dist", "sigma_dist_fake", "lr_fake", "lr_gen",
           "lr_schedule", "lr_final_ratio", "ema_halflife_kimg", "ema_beta", "guidance", "batch_remain", "batch_forget",
           "guidance_teacher", "guidance_fake_train", "guidance_fake_eval")


# One line of help per setting, shown by `sfd forget --help` (flags are generated from the
# dataclass, so the CLI never restates a default).
HELP = {
    "preset": "dataset preset",
    "forget": "class id(s) to forget (repeat the flag or give '0,3')",
    "override": "override per forget class: a class id ('1', or '1,2' aligned with --forget), "
                "'random' (a uniform remaining class per sample) or 'classifier' (pseudo-label) -- a policy may bring "
                "its own defaults (search_spaces/<preset>.yaml: override_defaults; digits 'random': forget batch "
                "128, learning rates 3e-4, EMA half-life 3 kimg), under the flags given; text presets: "
                "override concept(s), e.g. 'one' or 'one,blue', or 'next'",
    "override_draw": "how 'random' draws a forget sample's override class: 'sample' (the reference: "
                     "independently per sample, which pulls the one-step generator towards a blend of all "
                     "classes) or 'latent' (a fixed function of the sample's latent, so distinct regions of "
                     "the latent space become distinct classes)",
    "forget_concepts": "text presets: concept(s) to forget from every prompt (--forget fills it there)",
    "concept_synonyms": "text presets: concept -> synonyms forgotten with it (from a --targets-file)",
    "prompt_templates": "text presets: training prompt templates with {color} {word} {num} (from a --targets-file)",
    "teacher": "teacher checkpoint (default: the preset's bundled teacher); sd: a local pipeline folder, or a "
               "Hugging Face hub id with --allow-download",
    "allow_download": "let --teacher be a Hugging Face hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5): "
                      "diffusers downloads the pipeline's safetensors into its cache once; without it sfd reads "
                      "local files only and refuses a hub id",
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
    "guidance": "classifier-free guidance scale w of teacher and fake score inside the losses: (1 + w) D(c) - w D(null), "
                "so diffusers' / SiD-LSG's scale s is w = s - 1 (the SD recipe's 4.5 is 3.5 here)",
    "guidance_teacher": "guidance w of the teacher's pass in the generator loss (-1: --guidance)",
    "guidance_fake_train": "guidance w of the fake score's own denoising step (-1: --guidance)",
    "guidance_fake_eval": "guidance w of the fake score's pass in the generator loss (-1: --guidance)",
    "forget_prompts": "sd: file of forget prompts, one per line, each containing the concept (or, for nudity, an "
                      "unsafe keyword); default: the concept in sfd/tasks/stable_diffusion.py's embedded templates",
    "remain_prompts": "sd: file of remain prompts, one per line (e.g. COCO captions; prompts with a forgotten concept "
                      "are left out); default: sfd/tasks/stable_diffusion.py's small embedded list",
    "lora_rank": "> 0: generator and fake score are two LoRA adapters (peft) of this rank on the one frozen teacher "
                 "UNet, switched per pass (one copy of the UNet for all three networks); 0: full fine-tuning",
    "sigma_init": "noise level of the one-step generator, G(z) = D(sigma_init z, sigma_init)",
    "sigma_dist": "noise-level distribution of both steps: loguniform, vp-t (reference, DDPM grid), sd-t (the SD "
                  "reference: integer t on SD's scaled-linear grid) or edm (SiD)",
    "sigma_min": "smallest noise level of both steps",
    "sigma_max": "largest noise level of both steps",
    "lr_fake": "Adam learning rate of the fake score",
    "lr_gen": "Adam learning rate of the generator",
    "lr_schedule": "learning rates over the run: 'constant' (the reference) or 'cosine' (a named deviation: "
                   "both decay along a half cosine to lr_final_ratio times their value at the budget's end, so a "
                   "short stage 2 can forget fast early and settle late)",
    "lr_final_ratio": "with --lr-schedule cosine: the learning rates' final fraction (default 0.1)",
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
                 "(fp16 adds a gradient scaler); 'auto': bf16 where the device has native bf16 kernels (CUDA, "
                 "CPUs with AVX512-BF16/AMX), else fp32 -- metrics.json records it as precision_resolved",
    "grad_checkpointing": "recompute activations in the backward pass to save memory (DDPM, EDM and diffusers "
                          "backbones)",
    "budget_kimg": "training length in thousands of generator images",
    "max_seconds": "stop after this much training time (0: no limit)",
    "stage1_kimg": "two-stage: distil all classes with the forget weights at 0 for this many kimg first",
    "eval_every_kimg": "evaluate UA / FD every this many kimg",
    "eval_at_start": "evaluate the starting point too (a sweep's trials of one target all start from the same "
                     "stage 1, so their space's trial block turns it off)",
    "checkpoint_every_kimg": "write a checkpoint every this many kimg",
    "eval_forget_samples": "forget-class samples for UA",
    "eval_remain_per_class": "samples per remaining class for FD (the teacher is measured at the same count)",
    "seed": "random seed",
    "device": "'auto' (CUDA if present), 'cpu', 'cuda:0', ...",
}
