"""Stage 1 of two-stage SFD (SFD.md section 7), distilled once and reused by every target.

Stage 1 distils the teacher into a one-step generator and its fake score with every forget
weight at 0 (plain SiD over all classes). It is the same for every forget target -- only
stage 2, the forgetting, differs -- so a sweep distils it once, keys it by the teacher's
weights and the stage-1 settings, and starts every trial's stage 2 from it; later sweeps
and `sfd forget` reuse it. The teacher of stage 2 is always the original model.

A stage-1 folder holds ``state.safetensors`` (``generator_ema/*`` and ``fake_score/*`` only,
what :func:`sfd.loop.load_generator_init` reads) and ``stage1.json`` (key, settings,
metrics, the command that made it).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from .checkpoint import latest_checkpoint
from .config import SFDConfig, preset_stage1_settings
from .evaluate.forgetting import cache_dir, teacher_fingerprint
from .io import load_tensors, read_json, save_tensors, write_json
from .tasks import get_task

# settings that change what stage 1 produces (evaluation, checkpoints and device do not)
KEY_FIELDS = ("alpha", "lambda_fake_remain", "lambda_gen_remain", "guidance", "sigma_init", "sigma_dist",
              "sigma_min", "sigma_max", "sigma_dist_fake", "fake_score_reduction", "lr_fake", "lr_gen",
              "adam_beta1", "adam_beta2", "adam_eps", "grad_clip", "batch_remain", "batch_forget",
              "ema_halflife_kimg", "ema_rampup_ratio", "ema_beta", "budget_kimg", "seed", "precision")


def stage1_config(preset: str, kimg: float, seed: int = 0, **changes) -> SFDConfig:
    """Stage 1 of ``preset``: its stage-1 settings (the YAML's ``stage1`` block, else its defaults), every forget weight 0 for the whole run, the
    whole batch on the remaining (= all) classes but one forget sample the losses weigh 0."""
    base = SFDConfig.from_dict({**preset_stage1_settings(preset), **changes, "preset": preset})
    # the one forget sample names a target the preset understands (class 0 -> 1, a text preset's first concept):
    # its losses weigh 0, it only gives the forget branch a valid condition
    target = get_task(preset).stand_in_target() or {"forget": [0], "override": "1"}
    return base.replace(**target, init_from=None, stage1_kimg=kimg, budget_kimg=kimg,
                        lambda_fake_forget=0.0, lambda_gen_forget=0.0,
                        batch_remain=base.batch_remain + base.batch_forget - 1, batch_forget=1,
                        eval_every_kimg=max(kimg / 4, 1e-3), checkpoint_every_kimg=max(kimg / 4, 1e-3), seed=seed)


def stage1_key(cfg: SFDConfig, teacher) -> str:
    """Digest of the teacher's weights and the stage-1 settings."""
    d = cfg.to_dict()
    blob = json.dumps({"teacher": teacher_fingerprint(teacher), **{k: d[k] for k in KEY_FIELDS}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_root() -> Path:
    return cache_dir() / "stage1"


def bundled_stage1(preset) -> Path:
    return preset.weights_dir / "stage1"


def is_stage1(path) -> bool:
    path = Path(path)
    return (path / "state.safetensors").is_file() and (path / "stage1.json").is_file()


def find_stage1(key: str, preset) -> Path | None:
    """A stage-1 folder with this key: the one bundled with the preset, else the cache."""
    for path in (bundled_stage1(preset), cache_root() / key):
        if is_stage1(path) and read_json(path / "stage1.json").get("key") == key:
            return path
    return None


def export_stage1(run_dir, dest, key: str, cfg: SFDConfig, extra: dict | None = None,
                  teacher_fingerprint: str | None = None) -> Path:
    """Keep what stage 2 needs from a finished stage-1 run (EMA generator + fake score), atomically."""
    run_dir, dest = Path(run_dir), Path(dest)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"stage 1 in {run_dir} wrote no checkpoint")
    tensors, _ = load_tensors(ckpt / "state.safetensors")
    keep = {k: v for k, v in tensors.items() if k.startswith(("generator_ema/", "fake_score/"))}
    metrics = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    dest.mkdir(parents=True, exist_ok=True)
    # each file is written atomically; the manifest last, so a folder with one is complete
    (dest / "stage1.json").unlink(missing_ok=True)
    save_tensors(dest / "state.safetensors", keep)
    write_json(dest / "stage1.json", {
        "key": key, "teacher_fingerprint": teacher_fingerprint, "config": cfg.to_dict(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "metrics": {k: v for k, v in metrics.items() if k != "config"}, **(extra or {})})
    return dest


def resolve_init(init_from, preset, teacher):
    """``init_from`` as a path: 'stage1' is the preset's bundled stage 1. A stage-1 folder must
    come from this very teacher (its fingerprint is checked)."""
    if init_from is None:
        return None
    path = bundled_stage1(preset) if init_from == "stage1" else Path(init_from)
    if init_from == "stage1" and not is_stage1(path):
        raise ValueError(f"init_from 'stage1': preset '{preset.name}' ships no stage-1 generator; run "
                         f"`sfd distil --preset {preset.name}` and pass its folder, or --init-from none")
    if is_stage1(path):
        made_from = read_json(path / "stage1.json").get("teacher_fingerprint")
        if made_from and made_from != teacher_fingerprint(teacher):
            raise ValueError(f"init_from {path}: this stage-1 generator was distilled from another teacher "
                             f"({made_from}); distil one for this teacher (`sfd distil`) or pass --init-from none")
    return path
