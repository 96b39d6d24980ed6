"""Loaders for foreign teacher formats, registered into ``TEACHER_LOADERS``, and the
architectures of generators exported from them, registered into ``ARCHS``.

Recognisers look only at names and small JSON files (never unpickle anything) and do not
overlap: ``.safetensors`` is ours, ``.pt/.pth/.ckpt`` the official DDPM list containers,
``.pkl`` NVIDIA EDM snapshots, and a folder whose ``config.json`` names ``UNet2DModel`` (or a
pipeline folder with such a ``unet/``) a diffusers UNet.
"""
from __future__ import annotations

from pathlib import Path

from .registry import ARCHS, TEACHER_LOADERS
from .ddpm import build_ddpm_denoiser, load_ddpm_denoiser
from .diffusers_unet import build_diffusers_from_spec, is_unet2d_folder, load_diffusers_unet
from .edm_networks import build_edm_from_spec
from .edm_pickle import load_edm_pickle

DDPM_SUFFIXES = (".pt", ".pth", ".ckpt")

# One line per format, for error messages and --help texts.
FORMAT_HELP: dict[str, str] = {
    "sfd-safetensors": "a .safetensors file written by sfd (e.g. a generator exported by sfd forget)",
    "ddpm-pt": "official SFD / Selective-Amnesia class-conditional DDPM checkpoint (.pt/.pth/.ckpt list "
               "[model, opt, step, ema]; EMA weights by default)",
    "edm-pkl": "NVIDIA EDM network snapshot (.pkl, e.g. edm-cifar10-32x32-cond-vp.pkl; read without running "
               "its embedded code)",
    "diffusers-unet2d": "diffusers UNet2DModel folder with class embeddings (config.json + weights + "
                        "scheduler_config.json), loaded locally only",
}


def _is_file_with(suffixes):
    return lambda p: Path(p).is_file() and Path(p).suffix.lower() in suffixes


TEACHER_LOADERS["ddpm-pt"] = (_is_file_with(DDPM_SUFFIXES), load_ddpm_denoiser)
TEACHER_LOADERS["edm-pkl"] = (_is_file_with((".pkl",)), load_edm_pickle)
TEACHER_LOADERS["diffusers-unet2d"] = (is_unet2d_folder, load_diffusers_unet)

ARCHS["ddpm-vp"] = build_ddpm_denoiser
ARCHS["edm-networks"] = build_edm_from_spec
ARCHS["diffusers-unet2d"] = build_diffusers_from_spec


def describe_formats() -> str:
    """Human-readable list of the accepted teacher formats."""
    return "\n".join(f"  {name}: {FORMAT_HELP.get(name, '')}" for name in TEACHER_LOADERS)

from .text_unet import ARCH as _TEXT_ARCH, build_text_unet_from_spec, is_text_pipeline_folder, load_text_pipeline  # noqa: E402

FORMAT_HELP["diffusers-text2image"] = ("text-to-image pipeline folder in the diffusers layout (model_index.json, unet/ "
                                       "UNet2DConditionModel, text_encoder/ CLIPTextModel, tokenizer/, scheduler/; "
                                       "safetensors; a Stable Diffusion folder's vae/ is not used), loaded locally only")
TEACHER_LOADERS["diffusers-text2image"] = (is_text_pipeline_folder, load_text_pipeline)
ARCHS[_TEXT_ARCH] = build_text_unet_from_spec
