"""A diffusers ``UNet2DModel`` with class embeddings as a project :class:`Denoiser`.

The UNet is a discrete-time VP model; its scheduler config (a ``DDPMScheduler`` or any
scheduler with the same ``beta_*`` fields) gives alphas_cumprod and so
sigma(t) = sqrt((1 - abar_t) / abar_t). With x = x0 + sigma n and x_t = x / sqrt(1 + sigma^2):

* epsilon prediction:  D = x - sigma * eps
* v prediction:        D = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) * v
  (from x0 = sqrt(abar) x_t - sqrt(1 - abar) v)
* sample prediction:   D = the output

Null condition (classifier-free guidance): a ``UNet2DModel`` has no standard "null" class.
We use the extra embedding row when the UNet has ``num_class_embeds == num_classes + 1`` (row
``num_classes``, the usual way of training with label dropout); with exactly
``num_classes`` rows guidance is unsupported and ``null_cond`` raises a clear error. Pass
``null_class=`` to name another row.

Folders are read with ``from_pretrained(..., local_files_only=True)``: nothing is ever
downloaded, and diffusers reads ``.safetensors`` (or ``.bin`` with ``weights_only=True``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..io import CheckpointError
from .base import as_sigma
from .ddpm import DiscreteVP

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _config_dict(config) -> dict:
    """A JSON-safe copy of a diffusers config without its private ``_`` entries."""
    out = {}
    for k, v in dict(config).items():
        if k.startswith("_"):
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    json.dumps(out)   # fail here, with the offending config, rather than at save time
    return out


class DiffusersUNetDenoiser(DiscreteVP):
    def __init__(self, unet, scheduler_config: dict, num_classes: int | None = None, null_class: int | None = None):
        super().__init__()
        from diffusers import DDPMScheduler

        self.unet = unet
        cfg = unet.config
        if cfg.class_embed_type is not None:
            raise CheckpointError(f"UNet2DModel with class_embed_type={cfg.class_embed_type!r} is not supported; "
                                  f"only the default learned class table (num_class_embeds) is")
        embeds = int(cfg.num_class_embeds or 0)
        if num_classes is None:
            num_classes = embeds
        if embeds and embeds not in (num_classes, num_classes + 1):
            raise CheckpointError(f"the UNet has {embeds} class embeddings but {num_classes} classes were "
                                  f"asked for; expected {num_classes} or {num_classes + 1} (with a null row)")
        if embeds == 0:
            num_classes = 0
        if null_class is None and embeds == num_classes + 1:
            null_class = num_classes
        if null_class is not None and not 0 <= int(null_class) < max(embeds, 1):
            raise CheckpointError(f"null_class={null_class} is not a row of the UNet's {embeds} class embeddings")
        self.num_classes = int(num_classes)
        self.null_class = None if null_class is None else int(null_class)
        self.class_embeds = embeds

        self.scheduler_config = _config_dict(scheduler_config)
        sched = DDPMScheduler.from_config(self.scheduler_config)
        self.prediction_type = sched.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise CheckpointError(f"unsupported prediction_type {self.prediction_type!r}; supported: {PREDICTION_TYPES}")
        # Zero-terminal-SNR schedules put abar_T = 0 (sigma = inf); keep sigma finite there.
        self._init_schedule(sched.alphas_cumprod.to(torch.float64).clamp_min(1e-10))

        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.img_shape = (int(cfg.in_channels), int(h), int(w))
        self.sigma_data = 0.5
        self.spec = {"arch": "diffusers-unet2d",
                     "config": {"unet": _config_dict(cfg), "scheduler": self.scheduler_config,
                                "num_classes": self.num_classes, "null_class": self.null_class},
                     "img_shape": list(self.img_shape)}

    def forward(self, x, sigma, cond):
        sigma = as_sigma(sigma, x)
        t = self.timestep(sigma.flatten())
        scale = (1.0 + sigma**2).sqrt()
        labels = cond.long().reshape(-1) if self.class_embeds else None
        out = self.unet(x / scale, t, class_labels=labels).sample.to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "v_prediction":
            return x / (1.0 + sigma**2) - sigma / scale * out
        return out

    def null_cond(self, cond):
        if self.null_class is None:
            raise CheckpointError(
                f"this UNet2DModel has {self.class_embeds} class embeddings for {self.num_classes} classes, so no "
                f"row is left for the unconditional (null) condition and classifier-free guidance is unsupported. "
                f"Use guidance scale 0, or a UNet trained with num_class_embeds = num_classes + 1 (label dropout "
                f"to the last row), or name the null row with null_class=.")
        return torch.full_like(cond, self.null_class)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable config {path}: {e}") from e


def find_unet_folders(path) -> tuple[Path, Path | None] | None:
    """(unet folder, scheduler folder or None) for a UNet2DModel folder or pipeline folder."""
    path = Path(path)
    if not path.is_dir():
        return None
    cfg = path / "config.json"
    if cfg.is_file() and _read_json(cfg).get("_class_name") == "UNet2DModel":
        for cand in (path, path / "scheduler", path.parent / "scheduler"):
            if (cand / "scheduler_config.json").is_file():
                return path, cand
        return path, None
    index = path / "model_index.json"
    if index.is_file() and (path / "unet" / "config.json").is_file():
        if _read_json(path / "unet" / "config.json").get("_class_name") == "UNet2DModel":
            sched = path / "scheduler"
            return path / "unet", sched if (sched / "scheduler_config.json").is_file() else None
    return None


def is_unet2d_folder(path) -> bool:
    try:
        return find_unet_folders(path) is not None
    except CheckpointError:
        return False


def load_diffusers_unet(path, preset=None, device="cpu", *, null_class: int | None = None,
                        **_ignored) -> DiffusersUNetDenoiser:
    """Load a local ``UNet2DModel`` folder (or a pipeline folder with ``unet/``) as a denoiser."""
    from diffusers import UNet2DModel

    found = find_unet_folders(path)
    if found is None:
        raise CheckpointError(f"{path} is not a diffusers UNet2DModel folder (no config.json with "
                              f"_class_name 'UNet2DModel', nor a pipeline with unet/)")
    unet_dir, sched_dir = found
    if sched_dir is None:
        raise CheckpointError(
            f"no scheduler_config.json beside the UNet in {unet_dir} (looked in the folder, its scheduler/ "
            f"and ../scheduler/): the noise schedule is needed to map sigma to timesteps. Save the training "
            f"scheduler there, e.g. DDPMScheduler(...).save_pretrained('{unet_dir}').")
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot load the UNet2DModel in {unet_dir}: {e}") from e
    sched_cfg = _read_json(sched_dir / "scheduler_config.json")
    num_classes = preset.num_classes if preset is not None else None
    d = DiffusersUNetDenoiser(unet, sched_cfg, num_classes=num_classes, null_class=null_class)
    if preset is not None and tuple(d.img_shape) != tuple(preset.img_shape):
        raise CheckpointError(f"{unet_dir}: a {d.img_shape} UNet does not fit preset '{preset.name}' "
                              f"{tuple(preset.img_shape)}")
    return d.to(device).eval()


def build_diffusers_from_spec(spec: dict) -> DiffusersUNetDenoiser:
    """``ARCHS['diffusers-unet2d']``: rebuild the architecture from the recorded configs."""
    from diffusers import UNet2DModel

    cfg = spec["config"]
    unet = UNet2DModel.from_config(cfg["unet"])
    return DiffusersUNetDenoiser(unet, cfg["scheduler"], num_classes=cfg.get("num_classes"),
                                 null_class=cfg.get("null_class"))
