"""`sfd fetch cifar10|stl10`: everything a real-dataset run needs, in ``$SFD_HOME``, verified.

Downloads (see :mod:`sfd.assets`) the dataset archive, the FID Inception weights, a public teacher
and the ImageNet ResNet-34 the UA judge starts from; then computes the per-class Inception
statistics of the training set once (so every trial's FID embeds only generated images).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import assets as A
from .datasets import archive_path, load_cifar10, load_stl10, to_tensor
from .evaluate.inception import load_fid_inception
from .evaluate.report import save_class_stats
from .evaluate.resnet import load_resnet34
from .io import CheckpointError
from .presets import get_preset
from .utils import pick_device

REAL_PRESETS = ("cifar10", "stl10")


def compute_reference_stats(preset, fid_weights, out, device="auto", batch_size: int = 200,
                            progress: bool = True, home=None) -> Path:
    """Per-class Inception (mean, covariance, count) of the preset's training split -> ``out`` (.npz)."""


    device = pick_device(device)
    path = archive_path(preset.name, home)
    x, y = load_cifar10(path, "train") if preset.name == "cifar10" else load_stl10(path, "train")
    net = load_fid_inception(fid_weights, device)
    feats = []
    with torch.no_grad():
        for i in tqdm(range(0, len(y), batch_size), desc=f"Inception stats {preset.name}", disable=not progress):
            feats.append(net.features(to_tensor(x[i:i + batch_size]).to(device)).double().cpu().numpy())
    save_class_stats(out, np.concatenate(feats), y, preset.num_classes, feature_net=Path(fid_weights).name)
    return Path(out)


def run_fetch(preset_name: str, teacher: str | None = None, home=None, mirror: str | None = None,
              registry=A.REGISTRY, progress: bool = True, skip_classifier: bool = False, classifier=None,
              stats: bool = True, device: str = "auto", retries: int = 3, log=print) -> dict:
    """Fetch and verify; returns {"files": {name: path}, "missing": [entries still to put in place]}."""

    if preset_name not in REAL_PRESETS:
        raise A.AssetError(f"`sfd fetch` knows {', '.join(REAL_PRESETS)}, not {preset_name!r} — the digits "
                           f"preset ships inside sfd and needs nothing")
    preset = get_preset(preset_name)
    if teacher is not None and teacher not in A.TEACHER_NAMES:
        raise A.AssetError(f"--teacher {teacher!r}: choose one of {', '.join(A.TEACHER_NAMES)}")
    rows = A.preset_assets(preset_name, None, registry)
    wanted = [a for a in rows if a.role in ("dataset", "fid_weights")]
    teachers = [a for a in rows if a.role == "teacher" and (a.teacher == teacher if teacher else a.url)]
    if teacher and not teachers:
        raise A.AssetError(f"there is no public '{teacher}' teacher for {preset_name} — pass your own with "
                           f"--teacher PATH to sfd forget / the sweep")
    manual = [a for a in teachers if not a.url and not a.path(home).is_file()]
    wanted += [a for a in teachers if a.url or a.path(home).is_file()]
    have_classifier = A.classifier_path(preset_name, home).is_file()
    if not (skip_classifier or classifier or have_classifier):
        wanted += [a for a in rows if a.role == "classifier_init"]
    log(f"sfd fetch {preset_name} -> {A.sfd_home(home)}")
    files = A.fetch(wanted, home, mirror, progress, retries, log=log)

    if classifier:                                # the user's own judge: check it, then cache it
        try:
            net = load_resnet34(classifier)
        except CheckpointError as e:
            raise A.AssetError(f"--classifier {classifier}: {e}") from None
        if net.fc.out_features != preset.num_classes:
            raise A.AssetError(f"--classifier {classifier} has {net.fc.out_features} outputs, {preset_name} has "
                               f"{preset.num_classes} classes")
        dest = A.classifier_path(preset_name, home)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if Path(classifier).suffix == ".safetensors":
            shutil.copyfile(classifier, dest)
        else:
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(dest))
        log(f"  ok (your classifier) {dest}")

    fid = next((p for n, p in files.items() if any(a.name == n and a.role == "fid_weights" for a in rows)), None)
    stats_path = A.reference_stats_path(preset_name, home)
    if stats and fid is not None and not stats_path.is_file():
        log(f"  computing per-class Inception statistics of the {preset_name} training set once "
            f"(minutes on a GPU, hours on a CPU; --no-stats skips) ...")
        compute_reference_stats(preset, fid, stats_path, device, progress=progress, home=home)
        log(f"  ok (computed) {stats_path}")
    elif stats_path.is_file():
        log(f"  ok (cached) {stats_path}")

    _, missing_roles = A.resolve(preset_name, {"teacher": teacher}, home, registry)
    missing = list(missing_roles.values())
    if missing:
        log("still to put in place:\n" + "\n".join(missing))
    else:
        log(f"ready: `sfd forget --preset {preset_name} ...` and `python orchestration/sweep.py --targets "
            f"all_{preset_name}_classes` find these files without flags")
    return {"files": files, "missing": missing, "manual": manual}


def describe(preset_name: str, home=None, registry=A.REGISTRY) -> str:
    """The files of a preset: path, checksum, URL (for `sfd fetch --list` and air-gapped sites)."""
    rows = A.preset_assets(preset_name, None, registry)
    lines = [f"files of {preset_name} (cache: {A.sfd_home(home)}; mirrors serve <mirror>/<filename>):"]
    for a in rows:
        state = "present" if a.path(home).is_file() else "missing"
        lines.append(f"  [{state}] {a.role:15s} {a.path(home)}\n      {a.name}: {a.checksum_text()}; "
                     f"{a.licence}\n      from: {a.url or a.manual}")
    for role, p, how in (("classifier", A.classifier_path(preset_name, home),
                          f"sfd train-classifier --preset {preset_name}"),
                         ("reference", A.reference_stats_path(preset_name, home), f"sfd fetch {preset_name}")):
        lines.append(f"  [{'present' if p.is_file() else 'missing'}] {role:15s} {p}\n      made here: {how}")
    return "\n".join(lines)
