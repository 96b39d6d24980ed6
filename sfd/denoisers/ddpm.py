"""The official class-conditional DDPM (SFD / Selective-Amnesia) as an x0-denoiser.

Two parts:

* :class:`ConditionalDDPMUNet` -- our own implementation of the ``Conditional_Model`` UNet
  of the official SFD and Selective-Amnesia code (the ermongroup/ddim lineage). Module and
  parameter names follow that layout exactly (REFERENCE-FORMATS.md section 1) so an official
  state dict is copied into it strictly, key for key: ``temb.dense.{0,1}``, ``classes_emb``,
  ``null_classes_emb``, ``cemb.dense.{0,1}``, ``conv_in``, ``down.{i}.block/attn/downsample``,
  ``mid.{block_1,attn_1,block_2}``, ``up.{i}.block/attn/upsample``, ``norm_out``, ``conv_out``.
* :class:`VPDenoiser` -- the discrete VP -> sigma-space conversion of SFD.md section 2:
  sigma(t) = sqrt((1 - abar_t) / abar_t), x_t = x / sqrt(1 + sigma^2) and
  D(x, sigma, c) = x - sigma * eps(x_t, t(sigma), c), with t(sigma) the integer step whose
  sigma is nearest.

Checkpoints are the plain ``torch.save`` lists of the reference code, read with
``torch.load(weights_only=True)`` (no code runs) and copied strictly:

* teacher training ``[model_state, optimizer_state, step, ema_state]``;
* SFD ``[fake_score_state, fake_opt_state, generator_state, gen_opt_state, step, ema_state]``
  (the EMA is the generator's; optimiser slots may be ``None`` in early snapshots);
* keys may carry DataParallel's ``module.`` prefix; the EMA is used by default.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..io import CheckpointError, load_state_strict
from .base import Denoiser, as_sigma

# The two published configurations (DDPM/configs/{cifar10,stl10}_sfd.yml of the reference).
DDPM_CONFIGS: dict[str, dict] = {
    "cifar10": dict(resolution=32, in_channels=3, out_channels=3, ch=128, ch_mult=[1, 2, 2, 2],
                    num_res_blocks=2, attn_resolutions=[16], dropout=0.1, num_classes=10,
                    resamp_with_conv=True),
    "stl10": dict(resolution=64, in_channels=3, out_channels=3, ch=128, ch_mult=[1, 2, 2, 2, 4],
                  num_res_blocks=2, attn_resolutions=[16], dropout=0.1, num_classes=10,
                  resamp_with_conv=True),
}

# The reference's linear beta schedule (SFD.md section 6, REFERENCE-FORMATS.md section 1).
DDPM_SCHEDULE = dict(beta_start=1e-4, beta_end=0.02, num_steps=1000)


# --------------------------------------------------------------------------- network

def ddpm_timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the integer DDPM step as in the original DDPM code.

    Frequencies exp(-ln(10000) * i / (dim/2 - 1)), sines first, then cosines; this exact
    order and divisor is what trained checkpoints expect.
    """
    half = dim // 2
    scale = math.log(10000.0) / (half - 1)
    freqs = torch.exp(-scale * torch.arange(half, dtype=torch.float32, device=t.device))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _norm(channels: int) -> nn.GroupNorm:
    # 32 groups and eps 1e-6 are part of the trained model, not a free choice.
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class _Embedding(nn.Module):
    """Holds ``dense = [Linear, Linear]`` so the keys read ``temb.dense.0.weight`` etc."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.dense = nn.ModuleList([nn.Linear(cin, cout), nn.Linear(cout, cout)])

    def forward(self, x):
        return self.dense[1](F.silu(self.dense[0](x)))


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice; time+class embedding projected to a per-channel bias."""

    def __init__(self, cin: int, cout: int, emb_channels: int, dropout: float):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_cemb_proj = nn.Linear(emb_channels, cout)
        self.norm2 = _norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_cemb_proj(F.silu(emb))[:, :, None, None].to(h.dtype)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 q/k/v/proj_out convolutions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.norm(x)
        # (B, HW, C) per position; softmax(q k^T / sqrt(C)) v is the original's attention.
        q, k, v = (m(h).reshape(b, c, hh * ww).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(a.transpose(1, 2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        if self.with_conv:
            # The original pads right/bottom only (TensorFlow's 'SAME' for stride 2).
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class _Level(nn.Module):
    """One resolution: ``block`` and ``attn`` lists plus an optional resampler."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class ConditionalDDPMUNet(nn.Module):
    """eps(x_t, t, labels) of the official conditional DDPM; ``labels == num_classes`` is null.

    The null condition uses the learned ``null_classes_emb`` vector, exactly what the
    reference feeds when it drops the condition for classifier-free guidance.
    """

    def __init__(self, resolution: int = 32, in_channels: int = 3, out_channels: int = 3,
                 ch: int = 128, ch_mult=(1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions=(16,), dropout: float = 0.1, num_classes: int = 10,
                 resamp_with_conv: bool = True):
        super().__init__()
        ch_mult = [int(m) for m in ch_mult]
        attn_resolutions = [int(r) for r in attn_resolutions]
        self.config = dict(resolution=int(resolution), in_channels=int(in_channels),
                           out_channels=int(out_channels), ch=int(ch), ch_mult=ch_mult,
                           num_res_blocks=int(num_res_blocks), attn_resolutions=attn_resolutions,
                           dropout=float(dropout), num_classes=int(num_classes),
                           resamp_with_conv=bool(resamp_with_conv))
        self.ch = ch
        self.num_classes = num_classes
        self.resolution = resolution
        self.num_res_blocks = num_res_blocks
        self.gradient_checkpointing = False
        emb_ch = 4 * ch
        # Each ResnetBlock sees [temb, cemb] concatenated: 4*ch + 4*ch (1024 for ch = 128,
        # the reference's "4*ch + 512").
        block_emb = 2 * emb_ch

        self.temb = _Embedding(ch, emb_ch)
        self.classes_emb = nn.Embedding(num_classes, ch)
        self.null_classes_emb = nn.Parameter(torch.randn(ch))
        self.cemb = _Embedding(ch, emb_ch)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        res = resolution
        skip_channels = [ch]
        cur = ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = _Level()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(cur, ch * mult, block_emb, dropout))
                cur = ch * mult
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(cur))
                skip_channels.append(cur)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(cur, resamp_with_conv)
                res //= 2
                skip_channels.append(cur)
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cur, cur, block_emb, dropout)
        self.mid.attn_1 = AttnBlock(cur)
        self.mid.block_2 = ResnetBlock(cur, cur, block_emb, dropout)

        # ``up[i]`` is the level at the same resolution as ``down[i]`` (built top-down, stored
        # bottom-up, like the original).
        ups: list[_Level] = []
        for i in reversed(range(len(ch_mult))):
            level = _Level()
            out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(cur + skip_channels.pop(), out, block_emb, dropout))
                cur = out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(cur))
            if i != 0:
                level.upsample = Upsample(cur, resamp_with_conv)
                res *= 2
            ups.insert(0, level)
        self.up = nn.ModuleList(ups)

        self.norm_out = _norm(cur)
        self.conv_out = nn.Conv2d(cur, out_channels, 3, padding=1)

    def class_embedding(self, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.long()
        null = labels == self.num_classes
        emb = self.classes_emb(torch.where(null, torch.zeros_like(labels), labels))
        return torch.where(null[:, None], self.null_classes_emb.to(emb.dtype).expand_as(emb), emb)

    def _block(self, block, h, emb):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            raise ValueError(f"this DDPM UNet was built for {self.resolution}x{self.resolution} "
                             f"images, got {tuple(x.shape[-2:])}")
        temb = self.temb(ddpm_timestep_embedding(t.reshape(-1).expand(x.shape[0]), self.ch).to(x.dtype))
        cemb = self.cemb(self.class_embedding(labels.reshape(-1).expand(x.shape[0])))
        emb = torch.cat([temb, cemb], dim=1)

        hs = [self.conv_in(x)]
        for level in self.down:
            for j, block in enumerate(level.block):
                h = self._block(block, hs[-1], emb)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if hasattr(level, "downsample"):
                hs.append(level.downsample(hs[-1]))

        h = hs[-1]
        h = self._block(self.mid.block_1, h, emb)
        h = self.mid.attn_1(h)
        h = self._block(self.mid.block_2, h, emb)

        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = self._block(block, torch.cat([h, hs.pop()], dim=1), emb)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------- VP adapter

def linear_beta_sigmas(beta_start: float = 1e-4, beta_end: float = 0.02, num_steps: int = 1000):
    """(betas, alphas_cumprod, sigmas) of the linear schedule, in float64."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    abar = torch.cumprod(1.0 - betas, 0)
    return betas, abar, ((1.0 - abar) / abar).sqrt()


class DiscreteVP(Denoiser):
    """Shared machinery of discrete-time VP adapters (DDPM here, diffusers UNets too).

    ``alphas_cumprod`` defines sigma(t) = sqrt((1 - abar_t) / abar_t) for t = 0 .. T-1.
    ``round_sigma`` maps a sigma to the step whose sigma is nearest on a log scale (the
    grid is close to geometric, so log distance is the natural one; on grid points this
    is exact). The sigma tables are non-persistent buffers, so state dicts hold only the
    network's own weights.
    """

    def _init_schedule(self, alphas_cumprod: torch.Tensor) -> None:
        abar = alphas_cumprod.to(torch.float64)
        sig = ((1.0 - abar) / abar).sqrt()
        if not bool((sig[1:] > sig[:-1]).all()):
            raise CheckpointError("the noise schedule's sigma(t) is not increasing in t; cannot map "
                                  "sigma to a timestep")
        # float32 like sfd.samplers.vp_sigma_of_t, so grid sigmas map back to their step exactly.
        self.register_buffer("sigmas", sig.to(torch.float32), persistent=False)
        self.register_buffer("log_sigmas", sig.to(torch.float32).log(), persistent=False)
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Integer step t whose sigma(t) is nearest to each ``sigma`` (log scale)."""
        s = torch.as_tensor(sigma, device=self.log_sigmas.device).reshape(-1).to(torch.float32)
        d = (s.clamp_min(1e-20).log()[:, None] - self.log_sigmas[None, :]).abs()
        return d.argmin(dim=1)

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        return self.sigmas[self.timestep(sigma)].reshape(sigma.shape).to(sigma.device, sigma.dtype)

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        # eps-MSE in x0 space: ||D - x0||^2 / sigma^2 (the DDPM reference's loss).
        return 1.0 / sigma**2


class VPDenoiser(DiscreteVP):
    """D(x, sigma, c) = x - sigma * eps(x / sqrt(1 + sigma^2), t(sigma), c) (SFD.md section 2).

    ``cond`` is an int64 label tensor; ``num_classes`` selects the learned null embedding.
    The network sees t(sigma), the nearest training step; the output is scaled with the
    sigma actually passed in, so D stays an x0 estimate for x = x0 + sigma * n.
    """

    def __init__(self, model: ConditionalDDPMUNet, beta_start: float = 1e-4, beta_end: float = 0.02,
                 num_steps: int = 1000):
        super().__init__()
        self.model = model
        self.num_classes = int(model.num_classes)
        c = model.config
        self.img_shape = (c["in_channels"], c["resolution"], c["resolution"])
        self.sigma_data = 0.5
        self.schedule = dict(beta_start=float(beta_start), beta_end=float(beta_end), num_steps=int(num_steps))
        _, abar, _ = linear_beta_sigmas(beta_start, beta_end, num_steps)
        self._init_schedule(abar)
        self.spec = ddpm_spec(self)   # lets save_denoiser record the architecture

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The raw network: eps(x_t, t, c) in the DDPM's own parameterisation."""
        return self.model(x_t, t, cond)

    def forward(self, x, sigma, cond):
        sigma = as_sigma(sigma, x)
        t = self.timestep(sigma.flatten())
        eps = self.model(x / (1.0 + sigma**2).sqrt(), t, cond)
        return x - sigma * eps.to(x.dtype)

    def null_cond(self, cond):
        return torch.full_like(cond, self.num_classes)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.model.gradient_checkpointing = bool(enabled)


def build_ddpm_denoiser(spec: dict) -> VPDenoiser:
    """``ARCHS['ddpm-vp']``: rebuild from ``{"config": unet kwargs, "schedule": {...}}``."""
    return VPDenoiser(ConditionalDDPMUNet(**spec["config"]), **spec.get("schedule", DDPM_SCHEDULE))


def ddpm_spec(d: VPDenoiser) -> dict:
    return {"arch": "ddpm-vp", "config": dict(d.model.config), "schedule": dict(d.schedule),
            "img_shape": list(d.img_shape)}


# --------------------------------------------------------------------------- checkpoints

def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(k, str) for k in obj) \
        and all(torch.is_tensor(v) for v in obj.values())


def strip_module_prefix(state: dict, source) -> dict:
    """Remove DataParallel's ``module.`` prefix (all keys or none; a mix is an error)."""
    prefixed = [k.startswith("module.") for k in state]
    if all(prefixed):
        return {k[len("module."):]: v for k, v in state.items()}
    if any(prefixed):
        odd = [k for k in state if k.startswith("module.")][:3]
        raise CheckpointError(f"{source}: only some keys carry the 'module.' prefix (e.g. {odd}); "
                              f"the state dict is inconsistent")
    return dict(state)


def read_ddpm_container(path) -> dict:
    """Parse a reference checkpoint into named state dicts, without running any code.

    Returns a dict with ``kind`` ('teacher', 'sfd' or 'state_dict'), ``step`` and the
    available states among ``model``, ``ema`` (teacher) or ``fake_score``, ``generator``,
    ``generator_ema`` (SFD); missing slots are absent. ``module.`` prefixes are removed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, refused globals all land here
        raise CheckpointError(
            f"cannot read {path} as a plain state-dict checkpoint with torch.load(weights_only=True): {e}. "
            f"Only tensors, numbers and containers are accepted; if the file holds a whole pickled "
            f"model, re-save its state_dict() with the code that wrote it.") from e

    def state(x, what):
        if x is None:
            return None
        if not _is_state_dict(x):
            raise CheckpointError(f"{path}: the {what} slot is a {type(x).__name__}, not a state dict "
                                  f"of tensors")
        return strip_module_prefix(x, f"{path} [{what}]")

    out: dict = {}
    if _is_state_dict(obj):
        out.update(kind="state_dict", model=state(obj, "model"))
        return out
    if isinstance(obj, dict):
        # Some exports wrap a single state dict: {"state_dict": ...} / {"model": ...}.
        for key in ("ema", "state_dict", "model"):
            if _is_state_dict(obj.get(key)):
                out.update(kind="state_dict", model=state(obj[key], key))
                return out
        raise CheckpointError(f"{path} is a dict without a recognisable state dict (keys: "
                              f"{sorted(map(str, obj))[:10]}); expected the reference's list container")
    if not isinstance(obj, (list, tuple)) or not obj:
        raise CheckpointError(f"{path} holds a {type(obj).__name__}; expected the reference's list "
                              f"[model, optimizer, step, ema] or [fake, fake_opt, gen, gen_opt, step, ema]")
    if len(obj) <= 4:
        out["kind"] = "teacher"
        out["model"] = state(obj[0], "model")
        if len(obj) >= 3 and isinstance(obj[2], int):
            out["step"] = obj[2]
        if len(obj) == 4:
            out["ema"] = state(obj[3], "ema")
    else:
        out["kind"] = "sfd"
        out["fake_score"] = state(obj[0], "fake_score")
        out["generator"] = state(obj[2], "generator")
        if len(obj) >= 5 and isinstance(obj[4], int):
            out["step"] = obj[4]
        if len(obj) >= 6:
            out["generator_ema"] = state(obj[5], "generator_ema")
    return {k: v for k, v in out.items() if v is not None}


def infer_ddpm_config(state: dict, resolution: int | None = None, source="state dict") -> dict:
    """Read the UNet hyper-parameters off a state dict (the file carries no config).

    Channel widths, depth, attention levels and class count are all visible in tensor
    shapes; only the image resolution is not (pass it, e.g. from the preset) and dropout
    (taken as the reference's 0.1; it only matters when training).
    """
    for key in ("conv_in.weight", "conv_out.weight", "classes_emb.weight", "null_classes_emb",
                "down.0.block.0.conv1.weight"):
        if key not in state:
            sample = sorted(state)[:6]
            raise CheckpointError(f"{source} is not a conditional DDPM (Conditional_Model) state dict: "
                                  f"missing '{key}' (keys begin {sample})")
    ch, cin = state["conv_in.weight"].shape[:2]
    levels = sorted({int(k.split(".")[1]) for k in state if k.startswith("down.")})
    ch_mult = [int(state[f"down.{i}.block.0.conv2.weight"].shape[0]) // ch for i in levels]
    blocks = {int(k.split(".")[3]) for k in state if k.startswith("down.0.block.")}
    if resolution is None:
        by_depth = {len(c["ch_mult"]): c["resolution"] for c in DDPM_CONFIGS.values()}
        if len(levels) not in by_depth:
            raise CheckpointError(f"{source}: cannot tell the image resolution of a {len(levels)}-level "
                                  f"DDPM; pass a preset")
        resolution = by_depth[len(levels)]
    attn = [resolution >> i for i in levels if any(k.startswith(f"down.{i}.attn.") for k in state)]
    return dict(resolution=int(resolution), in_channels=int(cin),
                out_channels=int(state["conv_out.weight"].shape[0]), ch=int(ch), ch_mult=ch_mult,
                num_res_blocks=len(blocks), attn_resolutions=attn, dropout=0.1,
                num_classes=int(state["classes_emb.weight"].shape[0]),
                resamp_with_conv=len(levels) < 2 or "down.0.downsample.conv.weight" in state)


def _pick(container: dict, role: str, ema: bool, path) -> tuple[dict, str]:
    kind = container["kind"]
    if kind == "state_dict":
        return container["model"], "model"
    if kind == "teacher":
        if role != "teacher":
            raise CheckpointError(f"{path} is a teacher checkpoint [model, opt, step, ema]; it has no "
                                  f"{role} (that needs an SFD checkpoint)")
        if ema and "ema" in container:
            return container["ema"], "ema"
        if ema:
            warnings.warn(f"{path} has no EMA weights; using the raw model weights", stacklevel=3)
        return container["model"], "model"
    # An SFD checkpoint.
    if role == "teacher":
        raise CheckpointError(
            f"{path} is an SFD checkpoint [fake_score, opt, generator, opt, step, ema], not a teacher. "
            f"The teacher must stay the ORIGINAL pretrained model (also in two-stage runs); start the "
            f"generator and fake score from this file with --init-from instead, or pass role='generator' "
            f"to load its generator as a denoiser.")
    if role == "fake_score":
        return container["fake_score"], "fake_score"
    if role != "generator":
        raise CheckpointError(f"unknown role {role!r}; use 'teacher', 'generator' or 'fake_score'")
    if ema and "generator_ema" in container:
        return container["generator_ema"], "generator_ema"
    if ema:
        warnings.warn(f"{path} has no generator EMA; using the raw generator weights", stacklevel=3)
    return container["generator"], "generator"


def load_ddpm_denoiser(path, preset=None, device="cpu", *, ema: bool = True, role: str = "teacher",
                       **_ignored) -> VPDenoiser:
    """A :class:`VPDenoiser` from an official SFD / Selective-Amnesia checkpoint.

    ``ema`` (default) takes the EMA weights where the file has them; ``ema=False`` the raw
    ones. ``role`` picks the network of an SFD checkpoint ('generator' or 'fake_score');
    loading an SFD checkpoint as the teacher is refused (the reference code's two-stage bug).
    """
    container = read_ddpm_container(path)
    state, slot = _pick(container, role, ema, path)
    resolution = preset.img_shape[-1] if preset is not None else None
    cfg = infer_ddpm_config(state, resolution, f"{path} [{slot}]")
    # Built without random initialisation: the UNet holds parameters only (no buffers), and the
    # strict copy below overwrites every one of them or fails.
    with torch.device("meta"):
        net = ConditionalDDPMUNet(**cfg)
    denoiser = VPDenoiser(net.to_empty(device="cpu"), **DDPM_SCHEDULE)
    load_state_strict(denoiser.model, state, f"{path} [{slot}]")
    if preset is not None and tuple(denoiser.img_shape) != tuple(preset.img_shape):
        raise CheckpointError(f"{path}: a {denoiser.img_shape} DDPM does not fit preset '{preset.name}' "
                              f"{tuple(preset.img_shape)}")
    return denoiser.to(device).eval()


def sfd_checkpoint_states(path, *, ema: bool = True) -> tuple[dict, dict]:
    """(generator_state, fake_score_state) of an official SFD checkpoint, for two-stage starts.

    Keys are those of :class:`VPDenoiser` (``model.``-prefixed), ready for
    ``load_state_strict(generator, gen_state, ...)``. The generator is its EMA by default.
    The teacher of the second stage must still be the original model, not this file.
    """
    container = read_ddpm_container(path)
    if container["kind"] != "sfd":
        raise CheckpointError(f"{path} is a {container['kind']} checkpoint, not an SFD checkpoint "
                              f"[fake_score, opt, generator, opt, step, ema]")
    gen, _ = _pick(container, "generator", ema, path)
    fake, _ = _pick(container, "fake_score", ema, path)
    return ({f"model.{k}": v for k, v in gen.items()}, {f"model.{k}": v for k, v in fake.items()})


def load_sfd_init(path, generator: Denoiser, fake_score: Denoiser, *, ema: bool = True) -> None:
    """Copy an official SFD checkpoint's generator and fake score into ours, strictly."""
    gen, fake = sfd_checkpoint_states(path, ema=ema)
    load_state_strict(generator, gen, f"{path} [generator]")
    load_state_strict(fake_score, fake, f"{path} [fake_score]")
