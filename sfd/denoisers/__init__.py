"""Denoisers: one interface D(x, sigma, cond) -> x0 and an adapter per backbone.

Our own files are safetensors with a JSON ``arch``/``config`` in the metadata, so a model
is rebuilt from data and its weights copied strictly; no code is ever loaded from a file.
Foreign formats (official DDPM state dicts, NVIDIA EDM pickles, diffusers folders) register
a loader in ``TEACHER_LOADERS``.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..io import CheckpointError, load_state_strict, load_tensors, read_metadata, save_tensors
from ..limits import check_arch_metadata
from .base import Denoiser, Guided, as_sigma
from .edm import EDMPrecond, edm_coefficients
from .formats import describe_formats
from .registry import ARCHS, TEACHER_LOADERS
from .tiny_unet import TinyUNet

__all__ = ["Denoiser", "Guided", "as_sigma", "EDMPrecond", "edm_coefficients", "TinyUNet",
           "build_denoiser", "save_denoiser", "load_denoiser", "load_teacher", "TEACHER_LOADERS"]


def _build_edm_tiny_unet(spec: dict) -> Denoiser:
    cfg = spec["config"]
    net = TinyUNet(**cfg)
    return EDMPrecond(net, num_classes=cfg["num_classes"], img_shape=spec["img_shape"],
                      sigma_data=spec.get("sigma_data", 0.5))


ARCHS["edm-tiny-unet"] = _build_edm_tiny_unet


def denoiser_spec(denoiser: Denoiser) -> dict:
    """The JSON description that rebuilds ``denoiser``'s architecture (weights aside)."""
    spec = getattr(denoiser, "spec", None)
    if spec is not None:
        return dict(spec)
    if isinstance(denoiser, EDMPrecond) and isinstance(denoiser.model, TinyUNet):
        return {"arch": "edm-tiny-unet", "config": dict(denoiser.model.config),
                "img_shape": list(denoiser.img_shape), "sigma_data": denoiser.sigma_data}
    raise CheckpointError(f"no saved-architecture description for {type(denoiser).__name__}")


def build_denoiser(spec: dict) -> Denoiser:
    if not isinstance(spec, dict):
        raise CheckpointError(f"denoiser metadata must be a mapping, got {type(spec).__name__}")
    check_arch_metadata({"denoiser": spec}, "denoiser metadata")
    arch = spec.get("arch")
    if arch not in ARCHS:
        raise CheckpointError(f"unknown denoiser architecture {arch!r}; known: {sorted(ARCHS)}")
    try:
        d = ARCHS[arch](spec)
    except (TypeError, KeyError) as e:
        raise CheckpointError(f"denoiser metadata for {arch!r} is malformed ({e!r}) — the file is corrupted or "
                              f"was written by another version") from None
    d.spec = dict(spec)
    return d


def save_denoiser(path, denoiser: Denoiser, extra: dict | None = None) -> None:
    meta = {"denoiser": denoiser_spec(denoiser), **(extra or {})}
    save_tensors(path, denoiser.state_dict(), meta)


def load_denoiser(path, device="cpu") -> Denoiser:
    tensors, meta = load_tensors(path, device)
    if "denoiser" not in meta:
        raise CheckpointError(f"{path} has no 'denoiser' metadata; it was not written by sfd")
    d = build_denoiser(meta["denoiser"])
    load_state_strict(d, tensors, path)
    return d.to(device)


def _load_sfd_safetensors(path, preset, device, **_):
    meta = read_metadata(path)
    if "generator" in meta:
        g = meta["generator"] if isinstance(meta["generator"], dict) else {}
        raise CheckpointError(f"teacher {path} is an sfd one-step generator (forget {g.get('forget')} -> "
                              f"{g.get('override')}), not a diffusion teacher — pass the original teacher "
                              f"(omit --teacher for the preset's bundled one); to start from an earlier run "
                              f"use --init-from")
    return load_denoiser(path, device)


TEACHER_LOADERS["sfd-safetensors"] = (lambda p: Path(p).suffix == ".safetensors", _load_sfd_safetensors)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_hub_id(path, allow_download: bool = False) -> Path:
    """``path`` itself, or -- for a Hugging Face hub id, only with ``allow_download`` -- the local folder
    diffusers downloads it to (its cache; safetensors only; no pipeline code is fetched or run)."""
    p = Path(path)
    if p.exists() or not HUB_ID.fullmatch(str(path)) or p.suffix in (".safetensors", ".pt", ".pth", ".pkl", ".ckpt",
                                                                      ".bin", ".npz"):
        return p
    if not allow_download:
        raise CheckpointError(f"--teacher {path}: no such local file or folder, and sfd downloads nothing unless "
                              f"you allow it — give the local pipeline folder, or pass --allow-download to let "
                              f"diffusers fetch the hub id {str(path)!r} (safetensors) into its cache")
    from diffusers import DiffusionPipeline
    try:
        return Path(DiffusionPipeline.download(str(path), use_safetensors=True))
    except Exception as e:                  # offline, unknown id, gated repository, ...
        raise CheckpointError(f"--teacher {path}: diffusers could not download it ({type(e).__name__}: {e}) — "
                              f"check the id and the network, or download the folder yourself and pass its "
                              f"path") from None


def load_teacher(preset, path=None, device="cpu", allow_download: bool = False, **options) -> Denoiser:
    """The frozen teacher for ``preset``: the bundled one, or the file/folder at ``path`` (a hub id only
    with ``allow_download``)."""

    if path is None:
        if not preset.embedded:
            raise CheckpointError(f"preset '{preset.name}' has no bundled teacher; pass --teacher PATH in one "
                                  f"of these formats:\n{describe_formats()}")
        path = preset.weights_dir / preset.teacher_file
    path = resolve_hub_id(path, allow_download)
    if not path.exists():
        raise CheckpointError(f"missing teacher file: {path}")
    for name, (recognise, loader) in TEACHER_LOADERS.items():
        if recognise(path):
            teacher = loader(path, preset, device, **options)
            break
    else:
        raise CheckpointError(f"cannot tell the format of teacher {path}; accepted formats:\n{describe_formats()}")
    if teacher.num_classes and teacher.num_classes != preset.num_classes:
        raise CheckpointError(f"teacher {path} has {teacher.num_classes} classes but preset "
                              f"'{preset.name}' has {preset.num_classes}")
    teacher.eval().requires_grad_(False)
    return teacher


from . import formats  # noqa: E402,F401  (registers the foreign teacher formats)
