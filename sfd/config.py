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
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml

from . import yamlfile
from .presets import get_preset
from .tasks import get_task

# Topic groups of the settings, in the order `sfd forget --help` and `--print-config` show them.
GROUPS = {
    "target": "target: what to forget and what replaces it",
    "models": "teacher and judge: the networks read and where training starts",
    "loss": "loss (SFD.md section 4)",
    "noise": "noise levels",
    "optim": "optimisation",
    "schedule": "schedule and evaluation",
    "run": "run and hardware",
    "method": "method: SFD or a baseline fine-tuned from the teacher (docs/baselines.md)",
    "robustness": "robustness: attacks after training (docs/robustness.md)",
}
ATTACK_CHOICES = ("off", "continuous", "discrete", "all")
BIG = 10**9


def setting(default=dataclasses.MISSING, *, help: str, group: str, range: tuple | None = None,
            choices: tuple | None = None, searchable: bool = False, flag: bool = True, factory=None):
    """One SFDConfig setting, declared once: its default (``factory`` for a list or mapping), one line of
    help, its topic ``group`` (a key of GROUPS), and either a ``range`` ``(low, high, bounds, fix)`` --
    ``bounds`` one of '[]', '(]', '[)', '()' (excluded ends round), ``fix`` what to give instead -- or
    ``choices`` (the allowed strings); ``searchable``: a search space's ``search`` block may vary it;
    ``flag``: `sfd forget` has a flag for it (else it comes from config files only). The type is the
    field's annotation. Flags, validation, --help and the search-space checks are generated from this."""
    if group not in GROUPS:
        raise TypeError(f"setting group {group!r} is not one of {tuple(GROUPS)}")
    if range is not None and (len(range) != 4 or range[2] not in ("[]", "(]", "[)", "()")):
        raise TypeError(f"setting range {range!r} must be (low, high, '[]' | '(]' | '[)' | '()', fix)")
    meta = {"help": help, "group": group, "range": range, "choices": tuple(choices) if choices else None,
            "searchable": searchable, "flag": flag}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


_SIGMA_DISTS = ("loguniform", "vp-t", "sd-t", "edm")
_GUIDANCE_PASS = (-1.0, 1e3, "[]", "a guidance scale in [0, 1000], or -1 for --guidance")
_WEIGHT = (0.0, 1e6, "[]", "a weight >= 0")
_OVERRIDE_HELP = ("override per forget class: a class id ('1', or '1,2' aligned with --forget), 'random' (a uniform "
                  "remaining class per sample) or 'classifier' (pseudo-label) -- a policy may bring its own defaults "
                  "(search_spaces/<preset>.yaml: override_defaults; digits 'random': forget batch 128, learning "
                  "rates 3e-4, EMA half-life 3 kimg), under the flags given; text presets: override concept(s), "
                  "e.g. 'one' or 'one,blue', or 'next'")


@dataclass
class SFDConfig:
    # what to forget -------------------------------------------------------------------
    preset: str = setting("digits", group="target", help="dataset preset")
    forget: list[int] = setting(factory=lambda: [0], group="target",
                                help="class id(s) to forget (repeat the flag or give '0,3')")
    # a class id per forget class ("1" or "1,2"), or "random" / "classifier" (SFD.md section 5)
    override: str = setting("1", group="target", help=_OVERRIDE_HELP)
    # see sfd/tasks/classes.py
    override_draw: str = setting(
        "sample", group="target", choices=("sample", "latent"),
        help="how 'random' draws a forget sample's override class: 'sample' (the reference: independently per "
             "sample, which pulls the one-step generator towards a blend of all classes) or 'latent' (a fixed "
             "function of the sample's latent, so distinct regions of the latent space become distinct classes)")
    # text presets (colordigits): --forget fills forget_concepts there; the other two come from a --targets-file
    forget_concepts: list[str] = setting(
        factory=list, group="target", flag=False,
        help="text presets: concept(s) to forget from every prompt (--forget fills it there)")
    concept_synonyms: dict[str, list[str]] = setting(
        factory=dict, group="target", flag=False,
        help="text presets: concept -> synonyms forgotten with it (from a --targets-file)")
    prompt_templates: list[str] = setting(
        factory=list, group="target", flag=False,
        help="text presets: training prompt templates with {color} {word} {num} (from a --targets-file)")
    # sd preset: prompt files (one prompt per line); None: the small embedded lists of sfd/tasks/stable_diffusion.py
    forget_prompts: str | None = setting(
        None, group="target",
        help="sd: file of forget prompts, one per line, each containing the concept (or, for nudity, an unsafe "
             "keyword); default: the concept in sfd/tasks/stable_diffusion.py's embedded templates")
    remain_prompts: str | None = setting(
        None, group="target",
        help="sd: file of remain prompts, one per line (e.g. COCO captions; prompts with a forgotten concept are "
             "left out); default: sfd/tasks/stable_diffusion.py's small embedded list")
    # teacher and judge ---------------------------------------------------------------
    teacher: str | None = setting(
        None, group="models",
        help="teacher checkpoint (default: the preset's bundled teacher); sd: a local pipeline folder, or a "
             "Hugging Face hub id with --allow-download")
    allow_download: bool = setting(
        False, group="models",
        help="let --teacher be a Hugging Face hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5): diffusers "
             "downloads the pipeline's safetensors into its cache once; without it sfd reads local files only and "
             "refuses a hub id")
    classifier: str | None = setting(
        None, group="models",
        help="classifier / feature network for UA and FD (default: the preset's bundled one)")
    fid_weights: str | None = setting(
        None, group="models",
        help="FID Inception weights file (pt_inception-2015-12-05-*.pth) for presets without a bundled judge; "
             "with --classifier (a ResNet-34 state dict) and --reference it enables UA/FD")
    reference: str | None = setting(
        None, group="models",
        help="real images for FD: a folder with one sub-folder per class (name or id), or an .npz with 'images' "
             "(N,H,W,C uint8) and 'labels'")
    init_from: str | None = setting(
        None, group="models",
        help="start generator and fake score from an earlier SFD run, a stage-1 folder (`sfd distil`), 'stage1' "
             "(the preset's bundled stage 1) or 'none' (copies of the teacher)")
    # loss (SFD.md section 4) ----------------------------------------------------------------
    alpha: float = setting(1.2, group="loss", searchable=True, range=(-1e6, 1e6, "[]", "a finite alpha, e.g. 1.2"),
                           help="alpha of the SiD/SFD generator loss")
    lambda_fake_remain: float = setting(1.0, group="loss", searchable=True, range=_WEIGHT,
                                        help="weight of the remain branch in the fake-score loss")
    lambda_fake_forget: float = setting(1.0, group="loss", searchable=True, range=_WEIGHT,
                                        help="weight of the forget branch in the fake-score loss")
    lambda_gen_remain: float = setting(1.0, group="loss", searchable=True, range=_WEIGHT,
                                       help="weight of the remain branch in the generator loss")
    lambda_gen_forget: float = setting(1.0, group="loss", searchable=True, range=_WEIGHT,
                                       help="weight of the forget branch in the generator loss")
    # a named addition (off by default, the reference has none): issue 22's leakage fix, docs/robustness.md
    lambda_anchor: float = setting(
        0.0, group="loss", searchable=True, range=_WEIGHT,
        help="colordigits: weight of the anchor term -- the generator regresses, at the same noise, on the teacher's "
             "18-step Heun samples of every concept named alone ('two', '2', 'red'; a forgotten one: its override's), "
             "prompts no template holds, where forgetting otherwise pulls the draws towards the override; 0: off "
             "(the reference)")
    anchor_batch: int = setting(32, group="loss", range=(1, BIG, "[]", "a batch of >= 1 anchor samples"),
                                help="anchor samples per generator step (with --lambda-anchor)")
    anchor_per_prompt: int = setting(64, group="loss", range=(1, BIG, "[]", "a count >= 1"),
                                     help="teacher samples per anchor prompt, drawn once per run (with --lambda-anchor)")
    guidance: float = setting(
        0.0, group="loss", searchable=True, range=(0.0, 1e3, "[]", "a guidance scale in [0, 1000] (0: none)"),
        help="classifier-free guidance scale w of teacher and fake score inside the losses: (1 + w) D(c) - w D(null), "
             "so diffusers' / SiD-LSG's scale s is w = s - 1 (the SD recipe's 4.5 is 3.5 here)")
    # the three guided passes separately (SiD-LSG / the SFD SD recipe); -1: take --guidance
    guidance_teacher: float = setting(-1.0, group="loss", searchable=True, range=_GUIDANCE_PASS,
                                      help="guidance w of the teacher's pass in the generator loss (-1: --guidance)")
    guidance_fake_train: float = setting(-1.0, group="loss", searchable=True, range=_GUIDANCE_PASS,
                                         help="guidance w of the fake score's own denoising step (-1: --guidance)")
    guidance_fake_eval: float = setting(-1.0, group="loss", searchable=True, range=_GUIDANCE_PASS,
                                        help="guidance w of the fake score's pass in the generator loss (-1: --guidance)")
    # reference: the fake-score loss sums over pixels; 'mean' divides it by C*H*W (a deviation:
    # with clip-by-value it changes which gradients are clipped)
    fake_score_reduction: str = setting(
        "sum", group="loss", choices=("sum", "mean"),
        help="fake-score loss over pixels: 'sum' (reference) or 'mean' (C*H*W times smaller)")
    # noise levels ------------------------------------------------------------------------
    sigma_init: float = setting(2.5, group="noise", searchable=True,
                                range=(0.0, 1000.0, "(]", "a noise level in (0, 1000], e.g. 2.5"),
                                help="noise level of the one-step generator, G(z) = D(sigma_init z, sigma_init)")
    sigma_dist: str = setting(
        "loguniform", group="noise", searchable=True, choices=_SIGMA_DISTS,
        help="noise-level distribution of both steps: loguniform, vp-t (reference, DDPM grid), sd-t (the SD "
             "reference: integer t on SD's scaled-linear grid) or edm (SiD)")
    sigma_min: float = setting(0.137, group="noise", searchable=True,
                               range=(0.0, 1000.0, "(]", "a noise level in (0, 1000], e.g. 0.137"),
                               help="smallest noise level of both steps")
    sigma_max: float = setting(13.1, group="noise", searchable=True,
                               range=(0.0, 1000.0, "(]", "a noise level in (0, 1000], e.g. 13.1"),
                               help="largest noise level of both steps")
    # the fake-score step's own distribution: 'same' as above, or e.g. 'lognormal' (SiD: EDM's
    # ln sigma ~ N(-1.2, 1.2^2) for the fake score, the Karras grid for the generator)
    sigma_dist_fake: str = setting(
        "same", group="noise", searchable=True, choices=("same", *_SIGMA_DISTS, "lognormal"),
        help="noise levels of the fake-score step: 'same' as --sigma-dist, or loguniform, vp-t, edm, lognormal "
             "(SiD: EDM's ln sigma ~ N(-1.2, 1.2^2))")
    # optimisation ------------------------------------------------------------------------
    lr_fake: float = setting(1e-4, group="optim", searchable=True,
                             range=(0.0, 1.0, "(]", "a learning rate in (0, 1], e.g. 1e-4"),
                             help="Adam learning rate of the fake score")
    lr_gen: float = setting(1e-4, group="optim", searchable=True,
                            range=(0.0, 1.0, "(]", "a learning rate in (0, 1], e.g. 1e-4"),
                            help="Adam learning rate of the generator")
    lr_schedule: str = setting(
        "constant", group="optim", searchable=True, choices=("constant", "cosine"),
        help="learning rates over the run: 'constant' (the reference) or 'cosine' (a named deviation: both decay "
             "along a half cosine to lr_final_ratio times their value at the budget's end, so a short stage 2 can "
             "forget fast early and settle late)")
    lr_final_ratio: float = setting(0.1, group="optim", searchable=True,
                                    range=(0.0, 1.0, "[]", "a ratio in [0, 1], e.g. 0.1"),
                                    help="with --lr-schedule cosine: the learning rates' final fraction")
    adam_beta1: float = setting(0.0, group="optim", range=(0.0, 1.0, "[)", "a value in [0, 1)"), help="Adam beta1")
    adam_beta2: float = setting(0.999, group="optim", range=(0.0, 1.0, "[)", "a value in [0, 1)"), help="Adam beta2")
    adam_eps: float = setting(1e-8, group="optim", range=(0.0, 1.0, "(]", "a small epsilon in (0, 1], e.g. 1e-8"),
                              help="Adam epsilon")
    grad_clip: float = setting(1.0, group="optim", range=(0.0, 1e9, "[]", "a clip value >= 0 (0 disables)"),
                               help="clip gradients by value (0 disables)")
    batch_remain: int = setting(64, group="optim", searchable=True,
                                range=(1, 1_000_000, "[]", "a batch of at least 1"),
                                help="global batch of the remain branch")
    batch_forget: int = setting(64, group="optim", searchable=True,
                                range=(1, 1_000_000, "[]", "a batch of at least 1"),
                                help="global batch of the forget branch")
    ema_halflife_kimg: float = setting(5.0, group="optim", searchable=True,
                                       range=(0.0, 1e9, "[]", "a half-life >= 0 (0 disables the EMA)"),
                                       help="generator EMA half-life in kimg (0 disables)")
    ema_rampup_ratio: float = setting(
        0.5, group="optim", range=(0.0, 1e9, "[]", "a ratio >= 0 (0: no ramp-up)"),
        help="EMA ramp-up: the half-life is at most this times the kimg trained so far (SiD: 0.05; 0: off)")
    ema_beta: float = setting(
        0.0, group="optim", searchable=True, range=(0.0, 1.0, "[)", "a decay in [0, 1) (0: use ema_halflife_kimg)"),
        help="constant EMA decay per iteration, like the DDPM reference's 0.9999 (0: use the half-life)")
    # schedule ----------------------------------------------------------------------------
    budget_kimg: float = setting(40.0, group="schedule", range=(0.0, 1e9, "(]", "a positive budget in kimg, e.g. 40"),
                                 help="training length in thousands of generator images (both branches)")
    max_seconds: float = setting(0.0, group="schedule", range=(0.0, 1e12, "[]", "seconds >= 0 (0: no limit)"),
                                 help="stop after this much training time (0: no limit)")
    stage1_kimg: float = setting(
        0.0, group="schedule", range=(0.0, 1e9, "[]", "kimg >= 0 (0: one stage)"),
        help="two-stage: distil all classes with the forget weights at 0 for this many kimg first")
    eval_every_kimg: float = setting(5.0, group="schedule", range=(0.0, 1e9, "(]", "a positive interval in kimg"),
                                     help="evaluate UA / FD every this many kimg")
    keep_best_ua: float = setting(
        0.0, group="schedule", range=(0.0, 1.0, "[]", "a UA threshold in [0, 1], e.g. 0.99 (0: off)"),
        help="class presets: keep the generator EMA of the best evaluation instead of the last one -- among "
             "evaluations at UA >= this (those within keep_best_max_override_fd first), the lowest remaining-class "
             "FD ratio (none there: the highest UA) -- and "
             "report it re-evaluated on fresh noise (seed eval_seed + 1000), since the best of several noisy "
             "figures flatters it; 0: off (the last EMA, the reference)")
    keep_best_max_override_fd: float = setting(
        3.0, group="schedule", range=(0.0, 1e9, "(]", "a positive ratio, e.g. 3.0"),
        help="with keep_best_ua: evaluations at UA >= keep_best_ua whose override FD ratio is at most this come "
             "first (early in a run the overridden class is still in transit: 5-30x), as the sweep prefers its trials")
    eval_at_start: bool = setting(
        True, group="schedule",
        help="evaluate the starting point too (a sweep's trials of one target all start from the same stage 1, "
             "so their space's trial block turns it off)")
    checkpoint_every_kimg: float = setting(10.0, group="schedule",
                                           range=(0.0, 1e9, "(]", "a positive interval in kimg"),
                                           help="write a checkpoint every this many kimg")
    eval_forget_samples: int = setting(1000, group="schedule", range=(1, BIG, "[]", "at least 1 sample"),
                                       help="forget-class samples for UA")
    eval_remain_per_class: int = setting(
        200, group="schedule", range=(1, BIG, "[]", "at least 1 sample per class"),
        help="samples per remaining class for FD (the teacher is measured at the same count)")
    eval_fd_draws: int = setting(
        1, group="schedule", range=(1, 64, "[]", "a count of draws in [1, 64], e.g. 5"),
        help="class presets: the generator's remaining-class FD is the mean over this many disjoint draws of "
             "eval_remain_per_class samples per class (the teacher's floor is averaged over its disjoint sets "
             "the same way): the same figure in expectation, a smaller spread between noise seeds")
    # robustness ---------------------------------------------------------------------------
    attack: str = setting(
        "off", group="robustness", choices=ATTACK_CHOICES,
        help="after training, measure the generator as `sfd attack` does (prompt families, side effects and the "
             "named attack: continuous, discrete, or all) and report ASR next to UA; a baseline's fine-tuned "
             "teacher is attacked through the teacher's sampler; off: no attack")
    # run ---------------------------------------------------------------------------------
    seed: int = setting(0, group="run", range=(0, 2**63 - 1, "[]", "a seed >= 0"), help="random seed")
    device: str = setting("auto", group="run", help="'auto' (CUDA if present), 'cpu', 'cuda:0', ...")
    precision: str = setting(
        "fp32", group="run", choices=("fp32", "bf16", "fp16", "auto"),
        help="network passes in fp32, bf16 or fp16 autocast; weights, optimiser and losses stay fp32 (fp16 adds a "
             "gradient scaler); 'auto': bf16 where the device has native bf16 kernels (CUDA, CPUs with "
             "AVX512-BF16/AMX), else fp32 -- metrics.json records it as precision_resolved")
    grad_checkpointing: bool = setting(
        False, group="run",
        help="recompute activations in the backward pass to save memory (DDPM, EDM and diffusers backbones)")
    # LoRA on the one frozen teacher UNet is for the text UNets (colordigits, sd); 0 is the reference
    lora_rank: int = setting(
        0, group="run", range=(0, 1024, "[]", "a LoRA rank in 1..1024, or 0 for full fine-tuning"),
        help="> 0: generator and fake score are two LoRA adapters (peft) of this rank on the one frozen teacher "
             "UNet, switched per pass (one copy of the UNet for all three networks); 0: full fine-tuning")

    # method: SFD or a baseline (sfd/methods/, docs/baselines.md) ------------------------------
    method: str = setting(
        "sfd", group="method", choices=("sfd", "esd", "sa", "salun"),
        help="'sfd' (a one-step generator) or a baseline that fine-tunes the teacher and samples with its "
             "18-step Heun sampler (35 NFE): 'esd' (Gandikota et al. 2023), 'sa' (Selective Amnesia, Heng & Soh "
             "2023), 'salun' (Fan et al. 2024, data-free: the teacher's samples); each starts from "
             "search_spaces/<preset>.yaml: methods[<method>]")
    lr_finetune: float = setting(1e-4, group="method", searchable=True,
                                 range=(0.0, 1.0, "(]", "a learning rate in (0, 1], e.g. 1e-4"),
                                 help="baselines: Adam learning rate of the fine-tuned teacher")
    esd_negative_guidance: float = setting(
        1.0, group="method", searchable=True, range=(0.0, 1e3, "[]", "a guidance >= 0, e.g. 1"),
        help="esd: eta of the target D(null) - eta (D(forget) - D(null)) (train-esd.py's --negative_guidance)")
    esd_start_guidance: float = setting(
        2.0, group="method", searchable=True, range=(0.0, 1e3, "[]", "a guidance scale w >= 0"),
        help="esd: CFG scale w ((1 + w) D(c) - w D(null)) of the model's own partial sampling that gives x_t "
             "(the reference's start_guidance 3 is w = 2)")
    sa_lambda: float = setting(10.0, group="method", searchable=True, range=(0.0, 1e12, "[]", "a weight >= 0"),
                               help="sa: weight of the EWC term sum F (theta - theta*)^2")
    sa_gamma: float = setting(1.0, group="method", searchable=True, range=(0.0, 1e6, "[]", "a weight >= 0"),
                              help="sa: weight of the generative-replay term (the reference: 1)")
    sa_fisher_samples: int = setting(200, group="method", range=(1, BIG, "[]", "at least 1 sample"),
                                     help="sa: teacher samples (all classes) the Fisher diagonal is averaged over")
    salun_mask_ratio: float = setting(
        0.5, group="method", searchable=True, range=(0.0, 1.0, "(]", "a fraction in (0, 1]"),
        help="salun: fraction of weights with the largest forget-loss gradient that are trained (the reference: 0.5)")
    salun_alpha: float = setting(0.05, group="method", searchable=True, range=(0.0, 1e6, "[]", "a weight >= 0"),
                                 help="salun: weight of the retain term (reference 1e-3 at 3072 pixels; scaled to the "
                                      "preset by the pixel count)")
    pool_per_condition: int = setting(
        100, group="method", range=(1, BIG, "[]", "at least 1 sample"),
        help="sa, salun: teacher samples per condition in the data-free training pool (forget and retain images)")

    def validate(self, preset=None) -> "SFDConfig":
        """Check every setting (type, finiteness, range) before any work; raise ValueError naming the
        setting, the bad value and the fix."""
        check_types(self)
        preset = preset or get_preset(self.preset)
        if self.init_from in ("none", "teacher", ""):
            self.init_from = None               # start from copies of the teacher
        task = get_task(preset)
        task.validate(self)                     # targets and the settings that depend on the kind of preset
        if self.lambda_anchor > 0 and not task.anchors:
            raise ValueError(f"lambda_anchor (--lambda-anchor) {self.lambda_anchor}: the anchor term regresses on "
                             f"prompts that name one concept alone, which preset '{preset.name}' ({task.kind}) has "
                             f"no vocabulary for (colordigits has) — drop it")
        for s in SETTINGS.values():          # choices and ranges, as each setting declares them
            if s.choices is not None or s.range is not None:
                s.check(getattr(self, s.name))
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
        for name, s in SETTINGS.items():
            v = d.get(name)
            if s.value_type == "float" and isinstance(v, int) and not isinstance(v, bool):
                d[name] = float(v)
        cfg = cls(**d)
        check_types(cfg)
        return cfg

    def replace(self, **changes) -> "SFDConfig":
        return SFDConfig.from_dict({**self.to_dict(), **changes})


def _flag(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


@dataclass(frozen=True)
class Setting:
    """What SFDConfig declares about one setting (see :func:`setting`), with its type as ``value_type``:
    'float', 'int', 'bool', 'str', 'path' (str or None), 'ints' (list[int]), 'strs' (list[str]) or
    'mapping' (dict[str, list[str]])."""
    name: str
    value_type: str
    default: object
    help: str
    group: str
    range: tuple | None
    choices: tuple | None
    searchable: bool
    flag: bool

    @property
    def flag_name(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, v) -> None:
        """The declared choices or range (the type is check_types'): ValueError naming the setting,
        the value and what to give."""
        if self.choices is not None and v not in self.choices:
            raise ValueError(f"{self.name} {v!r} must be one of {self.choices}")
        if self.range is not None:
            lo, hi, bounds, fix = self.range
            if not math.isfinite(v):
                raise ValueError(f"{_flag(self.name)} {v!r} is not a finite number — give {fix}")
            if (v <= lo if bounds[0] == "(" else v < lo) or (v >= hi if bounds[1] == ")" else v > hi):
                raise ValueError(f"{_flag(self.name)} {v!r} is out of range — give {fix}")


_VALUE_TYPES = {float: "float", int: "int", bool: "bool", str: "str", str | None: "path", list[int]: "ints",
                list[str]: "strs", dict[str, list[str]]: "mapping"}


def _declared_settings() -> dict[str, Setting]:
    hints = typing.get_type_hints(SFDConfig)
    out = {}
    for f in fields(SFDConfig):
        if "group" not in f.metadata:
            raise TypeError(f"SFDConfig.{f.name} is not declared with setting(...)")
        value_type = _VALUE_TYPES.get(hints[f.name])
        if value_type is None:
            raise TypeError(f"SFDConfig.{f.name}: type {hints[f.name]} is not one of {list(_VALUE_TYPES)}")
        m = f.metadata
        if m["range"] is not None and value_type not in ("float", "int"):
            raise TypeError(f"SFDConfig.{f.name}: a range needs a number, not {value_type}")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[f.name] = Setting(f.name, value_type, default, m["help"], m["group"], m["range"], m["choices"],
                              m["searchable"], m["flag"])
    return out


SETTINGS = _declared_settings()


def check_types(cfg: "SFDConfig") -> None:
    """Every setting has its declared type: an int where an int is expected (64.5 is an error), a
    number where a float is expected (a string is an error, even '1e-4'), no bools for numbers."""
    def bad(name, v, want):
        return ValueError(f"{name} {v!r} ({type(v).__name__}) must be {want} — fix the value of {name}")
    for name, s in SETTINGS.items():
        v = getattr(cfg, name)
        if s.value_type == "float":
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise bad(name, v, "a number")
            setattr(cfg, name, float(v))
        elif s.value_type == "int":
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise bad(name, v, "a whole number (an int)")
            setattr(cfg, name, int(v))
        elif s.value_type == "str":
            if not isinstance(v, str):
                raise bad(name, v, "a string")
        elif s.value_type == "path":
            if v is not None and not isinstance(v, str):
                raise bad(name, v, "a path (a string) or null")
            if isinstance(v, str) and not v.strip():
                raise ValueError(f"{name}: empty path — give a file or folder, or leave it out")
        elif s.value_type == "bool":
            if not isinstance(v, bool):
                raise bad(name, v, "true or false")
        elif s.value_type == "strs":
            if not isinstance(v, (list, tuple)) or not all(isinstance(t, str) for t in v):
                raise bad(name, v, "a list of strings")
            setattr(cfg, name, list(v))
        elif s.value_type == "mapping":
            if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(vs, (list, tuple))
                                                  and all(isinstance(t, str) for t in vs) for k, vs in v.items()):
                raise bad(name, v, "a mapping of concept -> list of synonym strings")
            setattr(cfg, name, {k: list(vs) for k, vs in v.items()})
        elif s.value_type == "ints":
            if not isinstance(v, (list, tuple)):
                raise bad(name, v, "a list of class ids")
            for c in v:
                if isinstance(c, bool) or not isinstance(c, numbers.Integral):
                    raise bad(name, c, "a class id (an int)")
            setattr(cfg, name, [int(c) for c in v])


def check_device(name) -> None:
    """A valid torch device string whose device is present ('auto' always is)."""
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
    return Path(__file__).resolve().parent.parent / "search_spaces"


def preset_block(preset: str, block: str = "defaults") -> dict | None:
    """A settings block of ``search_spaces/<preset>.yaml`` (None where the file or block is absent)."""
    path = spaces_dir() / f"{preset}.yaml"
    if not path.is_file():
        return None
    doc = yamlfile.load_file(path, "search space") or {}
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


def method_block(preset: str, method: str) -> dict:
    """``methods[<method>]`` of the preset's YAML: ``defaults`` (that method's recipe, scaled to the preset) and
    ``search`` ({} where the file or the entry is absent; 'sfd' is the top-level blocks themselves)."""
    block = preset_block(preset, "methods") or {}
    entry = block.get(method) or {}
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k) or {}, dict) for k in ("defaults", "search")):
        raise ValueError(f"{spaces_dir() / f'{preset}.yaml'}: methods.{method} must be a mapping with 'defaults' and "
                         f"'search' mappings")
    return entry


def method_defaults(preset: str, method: str) -> dict:
    """The settings a run of ``method`` starts from on top of the preset's ``defaults`` (``method`` included)."""
    if method == "sfd":
        return {}
    return {**(method_block(preset, method).get("defaults") or {}), "method": method}


def preset_stage1_settings(preset: str) -> dict:
    """The settings stage 1 distils with: the YAML's ``stage1`` block on SFDConfig's own defaults
    where the preset has one (so tuning the forgetting's ``defaults`` never changes the shared
    stage 1 or its key), else the ``defaults`` block."""
    block = preset_block(preset, "stage1")
    return block if block is not None else preset_defaults(preset)


# ---------------------------------------------------------------------------------------
# layers: where each value of a run's configuration comes from

DEFAULT_LAYER = "SFDConfig default"


def space_label(preset: str) -> str:
    return f"search_spaces/{preset}.yaml"


def preset_layers(preset: str, changes: dict, label="config_for_preset") -> list:
    """The layers of a preset's configuration, in the order they apply (a later one wins), after
    SFDConfig's own defaults: the preset's YAML ``defaults``, its ``override_defaults`` for the
    override policy the result has, then ``changes`` (named ``label``, or ``label(setting)``, e.g. its
    flag). The one place `sfd forget` and config_for_preset layer settings."""
    base = preset_block(preset, "defaults") or {}
    policy = str(changes.get("override", base.get("override", SETTINGS["override"].default)))
    method = str(changes.get("method", base.get("method", SETTINGS["method"].default)))
    return [(f"{space_label(preset)} defaults", base),
            (f"{space_label(preset)} override_defaults[{policy}]", override_defaults(preset).get(policy, {})),
            (f"{space_label(preset)} methods[{method}]", method_defaults(preset, method)),
            (label, changes),
            (label, {"preset": preset})]


def layer_sources(layers) -> dict:
    """Setting -> the label of the last of ``layers`` ((label, settings) pairs) that sets it, else
    DEFAULT_LAYER."""
    out = dict.fromkeys(SETTINGS, DEFAULT_LAYER)
    for label, values in layers:
        for k in values:
            out[k] = label(k) if callable(label) else label
    return out


def layered_config(layers) -> tuple[SFDConfig, dict]:
    """SFDConfig's defaults with ``layers`` applied in order: the configuration and layer_sources."""
    merged = {}
    for _, values in layers:
        merged.update(values)
    return SFDConfig.from_dict(merged), layer_sources(layers)


def config_for_preset(preset: str, **changes) -> SFDConfig:
    """SFDConfig defaults, then the preset's YAML defaults (with its ``override_defaults`` for the
    override policy the result has), then ``changes`` (:func:`preset_layers`)."""
    return layered_config(preset_layers(preset, changes))[0]


def format_config(cfg: SFDConfig, sources: dict, *, skip_default: bool = False, skip=(), indent: str = "") -> list[str]:
    """YAML lines ``setting: value  # layer``, one section per topic group (a file of them, comments
    and all, is valid YAML). ``skip_default``: leave out the settings still at SFDConfig's default;
    ``skip``: these settings."""
    values, lines = cfg.to_dict(), []
    for key, title in GROUPS.items():
        rows = [(n, f"{n}: " + yaml.safe_dump(values[n], default_flow_style=True, width=10**9).removesuffix(
                    "\n...\n").strip()) for n, s in SETTINGS.items() if s.group == key and n not in skip
                and not (skip_default and sources[n] == DEFAULT_LAYER)]
        if rows:
            lines.append(f"{indent}# {title}")
            lines += [f"{indent}{text:<40s} # {sources[n]}" for n, text in rows]
    return lines
