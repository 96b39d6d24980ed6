"""Text-conditioned diffusers ``UNet2DConditionModel`` as a project :class:`Denoiser`, and the
pipeline-folder loader shared by the embedded ``colordigits`` teacher and Stable Diffusion.

A *condition* stays an integer: an id into the run's finite **prompt table** (every forget
prompt, its rewritten override prompt, every remain prompt, the held-out evaluation prompts
and, for classifier-free guidance, the empty prompt as the null condition). The adapter encodes
the table once with the frozen text encoder and keeps the embeddings as a buffer, so
D(x, sigma, c) keeps integer c and the SFD math (sfd/iteration.py, sfd/losses.py) is unchanged;
the forget branch's teacher condition is the id of the rewritten prompt.

The text encoder and tokenizer are *shared* between the teacher and its clones (the fake score
and generator never run them: they read the cached table), so a large encoder is held once.

Folder layout (the diffusers/transformers one, safetensors only, never a download)::

    model_index.json
    unet/          config.json + diffusion_pytorch_model.safetensors   (UNet2DConditionModel)
    text_encoder/  config.json + model.safetensors                      (transformers CLIPTextModel)
    tokenizer/     tokenizer.json + tokenizer_config.json, or CLIP's vocab.json + merges.txt
    scheduler/     scheduler_config.json

The scheduler decides the parameterisation: ``EDMEulerScheduler`` is EDM preconditioning
(c_noise = ln(sigma) / 4, epsilon or v output, as diffusers defines it); any scheduler with
``beta_*`` fields (DDPM, PNDM, DDIM: Stable Diffusion's) is a discrete VP model with
epsilon / v / sample prediction, sigma(t) = sqrt((1 - abar_t) / abar_t). A Stable Diffusion
folder reads the same way (its ``vae/`` is not used here: the latent adapter of the SD preset
adds the decoder).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from ..io import CheckpointError, load_state_strict
from .base import Denoiser, as_sigma
from .ddpm import DiscreteVP

ARCH = "text-unet2d-condition"
PREDICTIONS = ("epsilon", "v_prediction", "sample")


class Shared:
    """Holds an object that ``copy.deepcopy`` must not copy (the frozen text encoder and tokenizer)."""

    def __init__(self, obj):
        self.obj = obj

    def __deepcopy__(self, memo):
        return self


class TextEncoder:
    """Tokenizer + transformers text model: prompts -> (N, L, D) last hidden states (SD's condition)."""

    def __init__(self, tokenizer, model, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = int(max_length or tokenizer.model_max_length)

    def tokens(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt").input_ids

    @torch.no_grad()
    def __call__(self, prompts: list[str], batch: int = 256) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        out = [self.model(self.tokens(prompts[i:i + batch]).to(dev)).last_hidden_state.float().cpu()
               for i in range(0, len(prompts), batch)]
        return torch.cat(out) if out else torch.zeros(0, self.max_length, self.model.config.hidden_size)


def _config_dict(config) -> dict:
    out = {}
    for k, v in dict(config).items():
        if k.startswith("_"):
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    json.dumps(out)
    return out


class TextUNetDenoiser(DiscreteVP):
    """D(x, sigma, c) with c an id into :attr:`prompts`; the text embedding table is a buffer."""

    def __init__(self, unet, scheduler_config: dict, text: TextEncoder | None = None,
                 prompts: list[str] | None = None, embed_shape=None):
        super().__init__()
        self.unet = unet
        self.scheduler_config = _config_dict(scheduler_config)
        self.scheduler_class = str(scheduler_config.get("_class_name", ""))
        self.text = Shared(text)
        self.num_classes = 0
        size = unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.img_shape = (int(unet.config.in_channels), int(h), int(w))
        self.edm = "EDM" in self.scheduler_class
        if self.edm:
            self.sigma_data = float(self.scheduler_config.get("sigma_data", 0.5))
            self.sigma_min = float(self.scheduler_config.get("sigma_min", 0.002))
            self.sigma_max = float(self.scheduler_config.get("sigma_max", 80.0))
            self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
            if self.prediction_type not in ("epsilon", "v_prediction"):
                raise CheckpointError(f"EDM scheduler prediction_type {self.prediction_type!r} is not supported; "
                                      f"use 'epsilon' or 'v_prediction'")
        else:
            from diffusers import DDPMScheduler
            if "beta_start" not in self.scheduler_config:
                raise CheckpointError(f"scheduler {self.scheduler_class or '?'} has neither EDM settings nor a beta "
                                      f"schedule (beta_start, beta_end, beta_schedule); cannot map sigma to timesteps")
            sched = DDPMScheduler.from_config(self.scheduler_config)
            self.prediction_type = sched.config.prediction_type
            if self.prediction_type not in PREDICTIONS:
                raise CheckpointError(f"unsupported prediction_type {self.prediction_type!r}; supported: {PREDICTIONS}")
            self._init_schedule(sched.alphas_cumprod.to(torch.float64).clamp_min(1e-10))
            self.sigma_data = 0.5
        prompts = list(prompts or [])
        if embed_shape is None:
            if text is None:
                raise CheckpointError("a text-conditioned denoiser needs a text encoder or a recorded prompt table")
            embed_shape = (text.max_length, int(text.model.config.hidden_size))
        self.embed_shape = tuple(int(v) for v in embed_shape)
        self.prompts: list[str] = prompts
        self.register_buffer("prompt_embeds", torch.zeros(len(prompts), *self.embed_shape))
        self._update_spec()

    def identity_parts(self) -> dict[str, bytes]:
        """The frozen text encoder's weights and the tokenizer's vocabulary and length: they turn prompts into the
        conditions, so two teachers with one UNet and different encoders are different teachers (their cached
        reference samples, stage 1 and chains must not be shared). Without an encoder (an exported generator: a
        fixed prompt table, which the state dict holds): nothing."""
        text = self.text.obj
        if text is None:
            return {}
        parts = {f"text_encoder.{k}": v.detach().cpu().contiguous().numpy().tobytes()
                 for k, v in text.model.state_dict().items()}
        vocab = json.dumps(sorted(text.tokenizer.get_vocab().items()), ensure_ascii=False)
        parts["tokenizer"] = f"{type(text.tokenizer).__name__}|{text.max_length}|{vocab}".encode()
        return parts

    # -- the prompt table ---------------------------------------------------------------
    def set_prompts(self, prompts: list[str]) -> None:
        """Encode ``prompts`` with the frozen text encoder; condition i is then prompts[i]."""
        text = self.text.obj
        if text is None:
            if list(prompts) == self.prompts:
                return
            raise CheckpointError("this denoiser was saved without its text encoder: its prompt table is fixed "
                                  "(sample it with the prompts it was trained on)")
        prompts = [str(p) for p in prompts]
        emb = text(prompts).to(self.prompt_embeds.device)
        self.prompts = prompts
        self.prompt_embeds = emb
        self._update_spec()

    def prompt_id(self, prompt: str) -> int:
        try:
            return self.prompts.index(prompt)
        except ValueError:
            raise KeyError(f"prompt {prompt!r} is not in this run's prompt table") from None

    def _update_spec(self) -> None:
        self.spec = {"arch": ARCH, "config": {"unet": _config_dict(self.unet.config),
                                              "scheduler": {"_class_name": self.scheduler_class,
                                                            **self.scheduler_config},
                                              "embed_shape": list(self.embed_shape)},
                     "prompts": list(self.prompts), "img_shape": list(self.img_shape)}

    # -- the denoiser --------------------------------------------------------------------
    def forward(self, x, sigma, cond):
        if len(self.prompts) == 0:
            raise RuntimeError("no prompt table: call set_prompts([...]) before using the denoiser")
        ids = torch.as_tensor(cond).long().reshape(-1)
        n = len(self.prompts)
        # indexing would raise a bare IndexError past the end and wrap a negative id round to the last prompt;
        # checked where ids are on the CPU (user input arrives there; on a GPU, reading them back would stall
        # every pass of the SFD iteration, whose ids come from the run's own table)
        if ids.device.type == "cpu" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
            bad = ids[(ids < 0) | (ids >= n)][0].item()
            raise ValueError(f"prompt id {bad} is not in this generator's prompt table (ids 0..{n - 1}) — give an id "
                             f"in that range, or sample it by text (`sfd sample --prompt \"...\"`, "
                             f"SFDTextPipeline(prompt=...))")
        return self.forward_embeds(x, sigma, self.prompt_embeds[ids.to(self.prompt_embeds.device)])

    def forward_embeds(self, x, sigma, emb):
        """D(x, sigma) under text embeddings ``emb`` (B, L, D): used to train the teacher with its encoder."""
        sigma = as_sigma(sigma, x)
        emb = emb.to(x.dtype)
        if self.edm:
            s2, d2 = sigma**2, self.sigma_data**2
            c_skip = d2 / (s2 + d2)
            c_out = sigma * self.sigma_data / (s2 + d2).sqrt()
            if self.prediction_type == "v_prediction":
                c_out = -c_out
            c_in = 1.0 / (s2 + d2).sqrt()
            c_noise = 0.25 * sigma.log().flatten()
            f = self.unet(c_in * x, c_noise, encoder_hidden_states=emb).sample
            return c_skip * x + c_out * f.to(x.dtype)
        t = self.timestep(sigma.flatten())
        scale = (1.0 + sigma**2).sqrt()
        out = self.unet(x / scale, t, encoder_hidden_states=emb).sample.to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "v_prediction":
            return x / (1.0 + sigma**2) - sigma / scale * out
        return out

    def null_cond(self, cond):
        if "" not in self.prompts:
            raise CheckpointError("the prompt table has no empty prompt '' (the unconditional condition for "
                                  "classifier-free guidance); include '' in the table or use guidance 0")
        return torch.full_like(cond, self.prompts.index(""))

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma) if self.edm else super().round_sigma(sigma)

    def loss_weight(self, sigma):
        return Denoiser.loss_weight(self, sigma) if self.edm else super().loss_weight(sigma)

    def clone(self):
        twin = super().clone()
        _freeze_fixed(twin.unet)            # Gaussian Fourier frequencies are fixed, not trained
        return twin

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        (self.unet.enable_gradient_checkpointing if enabled else self.unet.disable_gradient_checkpointing)()


def _freeze_fixed(unet) -> None:
    proj = getattr(unet, "time_proj", None)
    w = getattr(proj, "weight", None)
    if isinstance(w, torch.nn.Parameter) and type(proj).__name__ == "GaussianFourierProjection":
        w.requires_grad_(False)


# -- folders ---------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable config {path}: {e}") from e


def is_text_pipeline_folder(path) -> bool:
    """A folder with model_index.json and a unet/ whose config names UNet2DConditionModel."""
    path = Path(path)
    cfg = path / "unet" / "config.json"
    if not (path.is_dir() and (path / "model_index.json").is_file() and cfg.is_file()):
        return False
    try:
        return _read_json(cfg).get("_class_name") == "UNet2DConditionModel"
    except CheckpointError:
        return False


def safe_torch_load(path) -> dict:
    """A ``.bin`` state dict through ``torch.load(weights_only=True)``: tensors and plain containers only.
    A pickle that would build any other object (a callable, a class) is refused; its code never runs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError, ValueError) as e:
        why = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused — torch.load(weights_only=True) cannot read it as tensors "
                              f"only ({why}); sfd never runs code from a checkpoint. Give the folder's weights as "
                              f"safetensors (save_pretrained(..., safe_serialization=True)) or a plain state dict")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path}: not a state dict (a mapping of names to tensors) — give the model's "
                              f"weights as saved by save_pretrained")
    return state


def load_component(cls, folder, what: str):
    """A diffusers / transformers model from a local folder: its safetensors through ``from_pretrained``
    (local files only), else a single ``.bin`` through :func:`safe_torch_load` into the model its
    config.json describes. Never a download, never code from a file."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        try:
            return cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        except Exception as e:
            raise CheckpointError(f"cannot load the {what} in {folder} (safetensors): {e}") from e
    bins = sorted(folder.glob("*.bin"))
    if not bins:
        raise CheckpointError(f"{folder}: no weights — the {what} needs *.safetensors (or one .bin state dict) "
                              f"beside its config.json")
    if len(bins) > 1:
        raise CheckpointError(f"{folder}: {len(bins)} .bin files ({', '.join(b.name for b in bins)}) — sharded "
                              f".bin weights are not read; convert the {what} to safetensors")
    state = safe_torch_load(bins[0])
    try:
        if hasattr(cls, "config_class") and hasattr(cls, "base_model_prefix"):      # transformers
            model = cls(cls.config_class.from_pretrained(str(folder), local_files_only=True))
        else:                                                                        # diffusers
            model = cls.from_config(cls.load_config(str(folder), local_files_only=True))
    except Exception as e:
        raise CheckpointError(f"cannot build the {what} from {folder / 'config.json'}: {e}") from e
    # old transformers checkpoints carry the position_ids buffer, newer models do not persist it
    state = {k: v for k, v in state.items() if not (k.endswith("position_ids") and k not in model.state_dict())}
    load_state_strict(model, state, bins[0])
    return model


def load_text_components(path, device="cpu"):
    """(unet, TextEncoder, scheduler config) from a local pipeline folder; safetensors (or a ``.bin`` read
    with ``weights_only``), no download."""
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()          # no per-load progress bars inside sfd's own output
    path = Path(path)
    if not is_text_pipeline_folder(path):
        raise CheckpointError(f"{path} is not a text-to-image pipeline folder (model_index.json + unet/ with a "
                              f"UNet2DConditionModel config)")
    missing = [p for p in ("text_encoder/config.json", "scheduler/scheduler_config.json", "tokenizer")
               if not (path / p).exists()]
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)} — a pipeline folder needs unet/, text_encoder/, "
                              f"tokenizer/ and scheduler/ (the diffusers layout)")
    unet = load_component(UNet2DConditionModel, path / "unet", "UNet2DConditionModel")
    enc = load_component(CLIPTextModel, path / "text_encoder", "text encoder (CLIPTextModel)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot load the text encoder / tokenizer in {path}: {e}") from e
    sched = _read_json(path / "scheduler" / "scheduler_config.json")
    return unet.to(device), TextEncoder(tok, enc.to(device)), sched


def load_text_pipeline(path, preset=None, device="cpu", **_ignored) -> TextUNetDenoiser:
    """``TEACHER_LOADERS['diffusers-text2image']``: the teacher from a pipeline folder (prompt table empty
    until the run's targets call :meth:`TextUNetDenoiser.set_prompts`). Stable Diffusion folders are loaded by
    their task with the latent adapter (sfd.denoisers.latent_unet)."""
    unet, text, sched = load_text_components(path, device)
    d = TextUNetDenoiser(unet, sched, text)
    if preset is not None and tuple(d.img_shape) != tuple(preset.img_shape):
        raise CheckpointError(f"{path}: a {d.img_shape} UNet does not fit preset '{preset.name}' "
                              f"{tuple(preset.img_shape)}" + (" (a latent-space UNet: use the SD preset)"
                                                              if (Path(path) / "vae").is_dir() else ""))
    return d.to(device).eval()


def save_text_pipeline(folder, unet, text_model, tokenizer, scheduler) -> Path:
    """Write the diffusers/transformers layout (safetensors) with model_index.json."""
    import diffusers
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
    text_model.save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    scheduler.save_pretrained(str(folder / "scheduler"))
    index = {"_class_name": "SFDTextToImagePipeline", "_diffusers_version": diffusers.__version__,
             "_transformers_version": transformers.__version__,
             "unet": ["diffusers", type(unet).__name__], "text_encoder": ["transformers", type(text_model).__name__],
             "tokenizer": ["transformers", type(tokenizer).__name__],
             "scheduler": ["diffusers", type(scheduler).__name__]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def build_text_unet_from_spec(spec: dict) -> TextUNetDenoiser:
    """``ARCHS[ARCH]``: an exported generator (UNet + its run's prompt table, no text encoder)."""
    from diffusers import UNet2DConditionModel
    cfg = spec["config"]
    unet = UNet2DConditionModel.from_config(cfg["unet"])
    _freeze_fixed(unet)
    prompts = spec.get("prompts") or []
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise CheckpointError("denoiser metadata 'prompts' must be a list of strings")
    return TextUNetDenoiser(unet, cfg["scheduler"], None, prompts=prompts, embed_shape=cfg["embed_shape"])
