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
import warnings
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from .denoisers import build_denoiser, load_denoiser, load_teacher
from .denoisers.latent_unet import LatentTextUNet, decode_latents
from .denoisers.text_unet import ARCH as TEXT_ARCH, TextUNetDenoiser
from .io import CheckpointError, read_json, read_metadata, write_json
from .onestep import one_step
from .presets import get_preset
from .rundir import read_run_record


class PromptWarning(UserWarning):
    """A prompt the text encoder will not read in full: unknown words (the tokenizer's unknown token) or words
    past its length limit."""


def prompt_notes(tokenizer, prompts) -> list[str]:
    """One line per problem the text encoder would hide: words outside the tokenizer's vocabulary (each becomes
    its unknown token, so "a purple seven" reads as "a [UNK] seven") and words past ``model_max_length``
    (truncated). Words are quoted as the user wrote them; case is normalised by the tokenizer itself."""
    unk = tokenizer.unk_token_id
    limit = int(tokenizer.model_max_length) - tokenizer.num_special_tokens_to_add()
    notes = []
    for p in dict.fromkeys(prompts):
        if getattr(tokenizer, "is_fast", False):
            enc = tokenizer(p, add_special_tokens=False, return_offsets_mapping=True)
            ids, spans = enc.input_ids, [p[s:e] for s, e in enc.offset_mapping]
            rest = lambda i: p[enc.offset_mapping[i][0]:]                              # noqa: E731
        else:                                     # a slow tokenizer: its tokens stand in for the words
            spans = tokenizer.tokenize(p)
            ids = tokenizer.convert_tokens_to_ids(spans)
            rest = lambda i: tokenizer.convert_tokens_to_string(spans[i:])              # noqa: E731
        unknown = list(dict.fromkeys(w for i, w in zip(ids, spans) if unk is not None and i == unk))
        if unknown:
            words = ", ".join(repr(w) for w in unknown)
            notes.append(f"prompt {p!r}: {words} {'is' if len(unknown) == 1 else 'are'} not in the tokenizer's "
                         f"vocabulary (it maps to {tokenizer.unk_token}) — known words: {_known_words(tokenizer)}")
        if len(ids) > limit:
            notes.append(f"prompt {p!r} is {len(ids)} tokens but the text encoder reads {limit}: {rest(limit)!r} "
                         f"is cut off — shorten the prompt")
    return notes


def _known_words(tokenizer, at_most: int = 100) -> str:
    special = set(tokenizer.all_special_tokens)
    words = sorted(w for w in tokenizer.get_vocab() if w not in special)
    if len(words) > at_most:
        return f"a vocabulary of {len(words)} tokens"
    return " ".join(w if w.isalnum() else repr(w) for w in words)


def _images(x01: torch.Tensor, output_type: str, pipeline):
    """Images in [0, 1] (N, C, H, W) as 'pt', 'np' (N, H, W, C) or 'pil'."""
    if output_type == "pt":
        return x01
    if output_type in ("np", "pil"):
        arr = x01.permute(0, 2, 3, 1).numpy()
        return pipeline.numpy_to_pil(arr) if output_type == "pil" else arr
    raise ValueError(f"output_type {output_type!r}: give 'pil', 'np', 'pt' or 'raw'")


class SFDTextPipeline(DiffusionPipeline):
    """A one-step SFD generator for text prompts in pixel space (colordigits): ``pipe("a red seven").images``.

    The prompt is encoded by the text encoder the teacher was trained with (any text, not a lookup in the
    run's prompt table), then x0 = D(sigma_init z, sigma_init, prompt) -- one UNet evaluation, no scheduler
    loop (the scheduler config only fixes the parameterisation, sfd.denoisers.text_unet)."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, text_encoder, tokenizer, scheduler, sigma_init: float = 2.5):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(sigma_init=float(sigma_init))

    def _embed_shape(self) -> tuple[int, int]:
        return int(self.tokenizer.model_max_length), int(self.text_encoder.config.hidden_size)

    def _scheduler_config(self) -> dict:
        return dict(self.scheduler.config, _class_name=type(self.scheduler).__name__)

    def _denoiser(self) -> TextUNetDenoiser:
        return TextUNetDenoiser(self.unet, self._scheduler_config(), None, prompts=[], embed_shape=self._embed_shape())

    def check_prompts(self, prompts: list[str], strict: bool = False) -> list[str]:
        """:func:`prompt_notes` of ``prompts``: warned (:class:`PromptWarning`), or raised with ``strict``."""
        notes = prompt_notes(self.tokenizer, prompts)
        if notes and strict:
            raise ValueError("; ".join(notes))
        for n in notes:
            warnings.warn(n, PromptWarning, stacklevel=3)
        return notes

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids).last_hidden_state

    @torch.no_grad()
    def one_step(self, prompt, num_images_per_prompt: int = 1, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, strict: bool = False) -> torch.Tensor:
        """x0 = D(sigma_init z, sigma_init, encode(prompt)) in the UNet's space (pixels or latents), fp32."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else []
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt {prompt!r}: give a string or a list of strings")
        n = int(num_images_per_prompt)
        if n < 1:
            raise ValueError(f"num_images_per_prompt {num_images_per_prompt!r}: give 1 or more")
        self.check_prompts(prompts, strict)
        prompts = [p for p in prompts for _ in range(n)]
        d = self._denoiser()
        dev, dtype = self.unet.device, self.unet.dtype
        emb = self.encode_prompt(prompts).to(dev, dtype)
        shape = (len(prompts), *d.img_shape)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents of shape {tuple(latents.shape)} do not fit {shape} — give (N, C, H, W) noise, "
                             f"N = prompts x num_images_per_prompt")
        sigma = float(d.round_sigma(torch.tensor(self.config.sigma_init)))
        return d.forward_embeds(latents.to(dev, dtype) * sigma, sigma, emb).float().cpu()

    def __call__(self, prompt: str | list[str], num_images_per_prompt: int = 1,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, strict: bool = False):
        """``output_type``: 'pil', 'np', 'pt' (images in [0, 1]) or 'raw' (the generator's output in [-1, 1],
        unclipped). Unknown words and truncated prompts are warned about (:class:`PromptWarning`); ``strict``
        raises ValueError instead."""
        if output_type not in ("pil", "np", "pt", "raw"):
            raise ValueError(f"output_type {output_type!r}: give 'pil', 'np', 'pt' or 'raw'")
        x = self.one_step(prompt, num_images_per_prompt, generator, latents, strict)
        images = x if output_type == "raw" else _images(((x + 1) / 2).clamp(0, 1), output_type, self)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class SFDOneStepPipeline(SFDTextPipeline):
    """A one-step SFD generator for Stable Diffusion latents (text-to-image, no sampling loop): the text
    pipeline plus the VAE that decodes its latents."""

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, sigma_init: float = 2.5):
        DiffusionPipeline.__init__(self)
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(sigma_init=float(sigma_init))

    def _denoiser(self) -> LatentTextUNet:
        return LatentTextUNet(self.unet, self._scheduler_config(), None, None, prompts=[],
                              embed_shape=self._embed_shape())

    def __call__(self, prompt: str | list[str], num_images_per_prompt: int = 1,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, strict: bool = False):
        """``output_type``: 'pil', 'np', 'pt' (images in [0, 1]) or 'latent' (the clean latents)."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type {output_type!r}: give 'pil', 'np', 'pt' or 'latent'")
        x0 = self.one_step(prompt, num_images_per_prompt, generator, latents, strict)
        images = x0 if output_type == "latent" else _images((decode_latents(self.vae, x0) + 1) / 2, output_type, self)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def export_one_step(folder, generator, sigma_init: float, info: dict | None = None) -> Path:
    """Write ``generator`` (a LatentTextUNet, or a LoRA view of one: merged) as an SFDOneStepPipeline folder,
    atomically (a temporary folder beside it, renamed into place)."""
    base = getattr(getattr(generator, "base", None), "obj", generator)
    if not isinstance(base, LatentTextUNet):
        raise CheckpointError(f"cannot export a {type(generator).__name__} as a Stable Diffusion pipeline")
    text, vae = base.text.obj, base.vae.obj
    if text is None or vae is None:
        raise CheckpointError("the generator has no text encoder / VAE to export with (load the teacher from its "
                              "pipeline folder)")
    unet = generator.merged_unet() if hasattr(generator, "merged_unet") else generator.unet
    pipe = SFDOneStepPipeline(unet=unet, vae=vae, text_encoder=text.model, tokenizer=text.tokenizer,
                              scheduler=_scheduler(base), sigma_init=float(sigma_init))

    def write(tmp: Path) -> None:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        write_json(tmp / "sfd.json", {"sigma_init": float(sigma_init), "one_step": True, **(info or {})})
    return _write_atomically(folder, write)


def _scheduler(d: TextUNetDenoiser):
    """The diffusers scheduler a text denoiser was built from (its config is in the denoiser's description)."""
    import diffusers
    cls = getattr(diffusers, d.scheduler_class, None) or diffusers.DDPMScheduler
    return cls.from_config(d.scheduler_config)


TEXT_PIPELINES = {"SFDTextPipeline": SFDTextPipeline, "SFDOneStepPipeline": SFDOneStepPipeline}


def _pipeline_class_name(folder: Path) -> str | None:
    index = read_json(folder / "model_index.json")
    return index.get("_class_name") if isinstance(index, dict) else None


def load_one_step(folder, device="cpu") -> SFDTextPipeline:
    """An exported text-to-image folder (SFDTextPipeline, or SFDOneStepPipeline for Stable Diffusion), local
    files only, safetensors only."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file() or not (folder / "sfd.json").is_file():
        raise CheckpointError(f"{folder} is not an exported sfd pipeline (model_index.json + sfd.json) — give the "
                              f"pipeline/ folder of an `sfd forget --preset sd` run, or a folder written by "
                              f"`sfd export`")
    name = _pipeline_class_name(folder)
    if name not in TEXT_PIPELINES:
        raise CheckpointError(f"{folder} holds a {name or 'unnamed'} pipeline, not a text-to-image one "
                              f"({' or '.join(TEXT_PIPELINES)})")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    diffusers_logging.disable_progress_bar()         # no per-load progress bars inside sfd's own output
    transformers_logging.disable_progress_bar()
    pipe = TEXT_PIPELINES[name].from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    return pipe.to(device)


# -- text-conditioned runs (colordigits): generator.safetensors + the teacher's text encoder ---------------
def is_text_generator(path) -> bool:
    """Whether ``path`` is a text-conditioned generator (prompts in, images out) rather than a class-conditional
    one: an exported text pipeline folder, a Stable Diffusion run (RUN/pipeline), or a run folder /
    generator.safetensors whose UNet reads text embeddings. The one place sfd's export and sampling branch on it."""
    p = Path(path)
    if p.is_dir():
        if (p / "model_index.json").is_file():
            return _pipeline_class_name(p) in TEXT_PIPELINES
        if (p / "pipeline" / "model_index.json").is_file():
            return True
        p = p / "generator.safetensors"
    if not (p.is_file() and p.suffix == ".safetensors"):
        return False
    try:
        spec = read_metadata(p).get("denoiser")
    except CheckpointError:
        return False                      # the class path reports what is wrong with the file
    return isinstance(spec, dict) and spec.get("arch") == TEXT_ARCH


def load_text_generator(path, device="cpu") -> SFDTextPipeline:
    """The text-to-image pipeline of ``path``: an exported folder (``sfd export``), a Stable Diffusion run
    folder (its pipeline/), or a text-conditioned run folder / its generator.safetensors -- then the generator's
    UNet with the text encoder and tokenizer of the teacher its run used."""
    p = Path(path)
    if (p / "model_index.json").is_file():
        return load_one_step(p, device)
    if (p / "pipeline" / "model_index.json").is_file():
        return load_one_step(p / "pipeline", device)
    return _text_run(p / "generator.safetensors" if p.is_dir() else p)[0].to(device)


def _run_teacher(generator_file: Path, info: dict, cfg: dict):
    """(text encoder, where) of the teacher that ``generator_file``'s run used: RUN/run.json records its
    --teacher (None: the preset's bundled one)."""
    name = cfg.get("preset") or info.get("preset")
    if not name:
        raise CheckpointError(f"{generator_file} has no run.json beside it and names no preset, so the teacher whose "
                              f"text encoder and tokenizer it needs is unknown — keep generator.safetensors in its "
                              f"run folder, or give a folder written by `sfd export`")
    try:
        preset = get_preset(str(name))
    except ValueError as e:
        raise CheckpointError(f"{generator_file}: its run's preset {name!r} is unknown ({e})") from None
    path = cfg.get("teacher")
    where = str(path) if path else f"the bundled '{preset.name}' teacher"
    try:
        teacher = load_teacher(preset, path, allow_download=bool(cfg.get("allow_download")))
    except CheckpointError as e:
        raise CheckpointError(f"{generator_file} is text-conditioned: it needs the text encoder and tokenizer of the "
                              f"teacher its run used ({where}), which does not load: {e}") from None
    text = getattr(getattr(teacher, "text", None), "obj", None)
    if text is None:
        raise CheckpointError(f"the teacher of {generator_file}'s run ({where}) has no text encoder — it is not a "
                              f"text-to-image pipeline folder")
    return text, where


def _text_run(generator_file):
    """(SFDTextPipeline, generator info, run config, teacher) of a text-conditioned run's generator.safetensors.

    The run's prompt table (its embeddings are a buffer of the generator) is used only as a check: the teacher's
    text encoder must reproduce them, or the run used another teacher and free text would be encoded wrongly."""
    generator_file = Path(generator_file)
    if not generator_file.is_file():
        raise CheckpointError(f"{generator_file} does not exist — give the folder of a finished `sfd forget` run, its "
                              f"generator.safetensors, or a folder written by `sfd export`")
    info = read_metadata(generator_file).get("generator")
    if not isinstance(info, dict) or "sigma_init" not in info:
        raise CheckpointError(f"{generator_file} is not an sfd one-step generator (no 'generator' metadata with "
                              f"sigma_init) — give the run folder of `sfd forget`")
    d = load_denoiser(generator_file)
    if not isinstance(d, TextUNetDenoiser):
        raise CheckpointError(f"{generator_file} is class-conditional ({type(d).__name__}), not text-conditioned")
    rec = read_run_record(generator_file.parent) or {}
    cfg = rec.get("config") if isinstance(rec.get("config"), dict) else {}
    text, where = _run_teacher(generator_file, info, cfg)
    if d.prompts:
        emb, ref = text(d.prompts), d.prompt_embeds.detach().float().cpu()
        if emb.shape != ref.shape or not torch.allclose(emb, ref, atol=1e-3, rtol=1e-3):
            diff = (emb - ref).abs().max().item() if emb.shape == ref.shape else f"shape {tuple(emb.shape)} vs " \
                                                                                 f"{tuple(ref.shape)}"
            raise CheckpointError(f"the text encoder of {where} does not reproduce the prompt embeddings "
                                  f"{generator_file} was trained with (max difference {diff}) — its run used another "
                                  f"teacher; keep run.json beside generator.safetensors (it records --teacher)")
    pipe = SFDTextPipeline(unet=d.unet.eval(), text_encoder=text.model, tokenizer=text.tokenizer,
                           scheduler=_scheduler(d), sigma_init=float(info["sigma_init"]))
    return pipe, info, cfg, where


def export_text_run(generator_file, folder) -> Path:
    """generator.safetensors of a text-conditioned run -> an SFDTextPipeline folder (diffusers layout: unet/,
    text_encoder/, tokenizer/, scheduler/, model_index.json with sigma_init; plus sfd.json), written atomically."""
    pipe, info, cfg, where = _text_run(generator_file)

    def write(tmp: Path) -> None:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        write_json(tmp / "sfd.json", {"sigma_init": float(info["sigma_init"]), "one_step": True, "generator": info,
                                      "teacher": where, "config": cfg})
    return _write_atomically(folder, write)


# -- class-conditional generators -----------------------------------------------------------------------
from diffusers import ConfigMixin, ModelMixin  # noqa: E402
from diffusers.configuration_utils import register_to_config  # noqa: E402


class SFDOneStepGenerator(ModelMixin, ConfigMixin):
    """G(z, c) = D(sigma_init z, sigma_init, c) of any sfd backbone, rebuilt from its JSON description (``spec``:
    the ``denoiser`` metadata of generator.safetensors) -- no code comes from the folder."""

    @register_to_config
    def __init__(self, spec: dict, sigma_init: float = 2.5, class_names: list | None = None,
                 info: dict | None = None):
        super().__init__()
        self.denoiser = build_denoiser(dict(spec))

    def forward(self, z: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
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
    meta = read_metadata(generator_file)
    info = meta.get("generator") if isinstance(meta.get("generator"), dict) else None
    if info is None or "sigma_init" not in info:
        raise CheckpointError(f"{generator_file} is not an sfd one-step generator (no 'generator' metadata with "
                              f"sigma_init) — give the run folder of `sfd forget`")
    d = load_denoiser(generator_file)
    if isinstance(d, TextUNetDenoiser):
        raise CheckpointError(f"{generator_file} is text-conditioned (prompts, not class ids) — export it with "
                              f"export_text_run (`sfd export` picks it)")
    names = None
    try:
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
