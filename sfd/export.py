"""The one-step generator as a diffusers pipeline folder: load and sample it in two lines.

Class-conditional runs (``sfd export --run RUN --out DIR``: digits, cifar10, stl10, any sfd backbone)::

    from sfd.export import SFDClassPipeline
    images = SFDClassPipeline.from_pretrained("exported/forget0")(class_labels=[3, 4]).images

(``model_index.json`` + ``denoiser/`` = :class:`SFDOneStepGenerator`, a diffusers ``ModelMixin`` whose config
is the sfd architecture description and sigma_init, weights in safetensors.) Stable Diffusion runs:

    from sfd.export import SFDOneStepPipeline
    image = SFDOneStepPipeline.from_pretrained("runs/brad-pitt/pipeline")("a photo of brad pitt").images[0]

The folder is diffusers' own layout (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``; safetensors) plus ``sfd.json`` (what was forgotten, sigma_init, the
run's settings). One call: the prompt is encoded by the text encoder, z ~ N(0, I) in latent space,
x0 = D(sigma_init z, sigma_init, prompt) through the same epsilon / v conversion the training used
(sfd.denoisers.text_unet), decoded by the VAE. No scheduler loop: the scheduler only maps
sigma_init to its timestep.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from .denoisers.latent_unet import LatentTextUNet, decode_latents
from .io import CheckpointError, write_json


class SFDOneStepPipeline(DiffusionPipeline):
    """A one-step SFD generator for Stable Diffusion latents (text-to-image, no sampling loop)."""

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, sigma_init: float = 2.5):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(sigma_init=float(sigma_init))

    def _denoiser(self) -> LatentTextUNet:
        emb = (int(self.tokenizer.model_max_length), int(self.text_encoder.config.hidden_size))
        return LatentTextUNet(self.unet, dict(self.scheduler.config, _class_name=type(self.scheduler).__name__), None,
                              None, prompts=[], embed_shape=emb)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids).last_hidden_state

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_images_per_prompt: int = 1,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """``output_type``: 'pil', 'np', 'pt' (images in [0, 1]) or 'latent' (the clean latents)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt {prompt!r}: give a string or a list of strings")
        prompts = [p for p in prompts for _ in range(int(num_images_per_prompt))]
        d = self._denoiser()
        dev, dtype = self.unet.device, self.unet.dtype
        emb = self.encode_prompt(prompts).to(dev, dtype)
        shape = (len(prompts), *d.img_shape)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(dev)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents of shape {tuple(latents.shape)} do not fit {shape} — give (N, C, H, W) noise")
        sigma = float(d.round_sigma(torch.tensor(self.config.sigma_init)))
        x0 = d.forward_embeds(latents.to(dev, dtype) * sigma, sigma, emb).float()
        if output_type == "latent":
            images = x0
        else:
            images = (decode_latents(self.vae, x0) + 1) / 2
            if output_type == "np":
                images = images.permute(0, 2, 3, 1).numpy()
            elif output_type == "pil":
                images = self.numpy_to_pil(images.permute(0, 2, 3, 1).numpy())
            elif output_type != "pt":
                raise ValueError(f"output_type {output_type!r}: give 'pil', 'np', 'pt' or 'latent'")
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def export_one_step(folder, generator, sigma_init: float, info: dict | None = None) -> Path:
    """Write ``generator`` (a LatentTextUNet, or a LoRA view of one: merged) as an SFDOneStepPipeline folder,
    atomically (a temporary folder beside it, renamed into place)."""
    import diffusers

    base = getattr(getattr(generator, "base", None), "obj", generator)
    if not isinstance(base, LatentTextUNet):
        raise CheckpointError(f"cannot export a {type(generator).__name__} as a Stable Diffusion pipeline")
    text, vae = base.text.obj, base.vae.obj
    if text is None or vae is None:
        raise CheckpointError("the generator has no text encoder / VAE to export with (load the teacher from its "
                              "pipeline folder)")
    unet = generator.merged_unet() if hasattr(generator, "merged_unet") else generator.unet
    sched_cls = getattr(diffusers, base.scheduler_class, None) or diffusers.DDPMScheduler
    scheduler = sched_cls.from_config(base.scheduler_config)
    pipe = SFDOneStepPipeline(unet=unet, vae=vae, text_encoder=text.model, tokenizer=text.tokenizer,
                              scheduler=scheduler, sigma_init=float(sigma_init))

    def write(tmp: Path) -> None:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        write_json(tmp / "sfd.json", {"sigma_init": float(sigma_init), "one_step": True, **(info or {})})
    return _write_atomically(folder, write)


def load_one_step(folder, device="cpu") -> SFDOneStepPipeline:
    """An exported pipeline folder, local files only."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file() or not (folder / "sfd.json").is_file():
        raise CheckpointError(f"{folder} is not an exported sfd pipeline (model_index.json + sfd.json) — give the "
                              f"pipeline/ folder of an `sfd forget --preset sd` run")
    pipe = SFDOneStepPipeline.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    return pipe.to(device)


# -- class-conditional generators -----------------------------------------------------------------------
from diffusers import ConfigMixin, ModelMixin                     # noqa: E402
from diffusers.configuration_utils import register_to_config    # noqa: E402


class SFDOneStepGenerator(ModelMixin, ConfigMixin):
    """G(z, c) = D(sigma_init z, sigma_init, c) of any sfd backbone, rebuilt from its JSON description (``spec``:
    the ``denoiser`` metadata of generator.safetensors) -- no code comes from the folder."""

    @register_to_config
    def __init__(self, spec: dict, sigma_init: float = 2.5, class_names: list | None = None,
                 info: dict | None = None):
        super().__init__()
        from .denoisers import build_denoiser
        self.denoiser = build_denoiser(dict(spec))

    def forward(self, z: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        from .onestep import one_step
        return one_step(self.denoiser, z, class_labels, float(self.config.sigma_init))


class SFDClassPipeline(DiffusionPipeline):
    """A one-step SFD generator for class labels: ``pipe(class_labels=[3, 4]).images`` (no sampling loop)."""

    def __init__(self, denoiser: SFDOneStepGenerator):
        super().__init__()
        self.register_modules(denoiser=denoiser)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        # buffers an sfd backbone computes in __init__ (noise schedules) must be real tensors, not meta ones
        kwargs.setdefault("low_cpu_mem_usage", False)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def num_classes(self) -> int:
        return int(self.denoiser.denoiser.num_classes)

    @torch.no_grad()
    def __call__(self, class_labels, num_images_per_label: int = 1, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True):
        """``class_labels``: ints (or a 1-D tensor) in [0, num_classes); ``output_type`` 'pil', 'np' or 'pt'
        (images in [0, 1]), or 'raw' (the generator's output in [-1, 1], unclipped)."""
        labels = torch.as_tensor(class_labels if not isinstance(class_labels, int) else [class_labels])
        n = self.num_classes
        if labels.ndim != 1 or len(labels) == 0 or labels.is_floating_point() or \
                (n and not bool(((labels >= 0) & (labels < n)).all())):
            raise ValueError(f"class_labels {class_labels!r}: give class ids in 0..{n - 1} (a list of ints)")
        labels = labels.long().repeat_interleave(int(num_images_per_label))
        d = self.denoiser
        shape = (len(labels), *d.denoiser.img_shape)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents of shape {tuple(latents.shape)} do not fit {shape} — give (N, C, H, W) noise")
        x = d(latents.to(d.device, d.dtype), labels.to(d.device)).float().cpu()
        if output_type == "raw":
            images = x
        else:
            images = ((x + 1) / 2).clamp(0, 1)
            if output_type in ("np", "pil"):
                images = images.permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
            elif output_type != "pt":
                raise ValueError(f"output_type {output_type!r}: give 'pil', 'np', 'pt' or 'raw'")
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def export_class_run(generator_file, folder) -> Path:
    """generator.safetensors of a class-conditional run -> an SFDClassPipeline folder, written atomically."""
    from .denoisers import load_denoiser
    from .io import read_metadata
    meta = read_metadata(generator_file)
    info = meta.get("generator") if isinstance(meta.get("generator"), dict) else None
    if info is None or "sigma_init" not in info:
        raise CheckpointError(f"{generator_file} is not an sfd one-step generator (no 'generator' metadata with "
                              f"sigma_init) — give the run folder of `sfd forget`")
    d = load_denoiser(generator_file)
    names = None
    try:
        from .presets import get_preset
        names = list(get_preset(str(info.get("preset"))).class_names) or None
    except ValueError:
        pass
    model = SFDOneStepGenerator(spec=dict(d.spec), sigma_init=float(info["sigma_init"]), class_names=names,
                                info={k: info[k] for k in ("forget", "override", "preset") if k in info})
    model.denoiser.load_state_dict(d.state_dict(), strict=True)
    pipe = SFDClassPipeline(denoiser=model.eval())
    return _write_atomically(folder, lambda tmp: pipe.save_pretrained(str(tmp), safe_serialization=True))


def _write_atomically(folder, write) -> Path:
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_class_pipeline(folder, device="cpu") -> SFDClassPipeline:
    """An exported class-conditional folder, local files only, safetensors only."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file() or not (folder / "denoiser" / "config.json").is_file():
        raise CheckpointError(f"{folder} is not an exported sfd class pipeline (model_index.json + denoiser/) — "
                              f"write one with `sfd export --run RUN --out {folder}`")
    return SFDClassPipeline.from_pretrained(str(folder), local_files_only=True, use_safetensors=True).to(device)
