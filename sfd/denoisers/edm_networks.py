"""NVIDIA EDM backbones (DDPM++/NCSN++ ``SongUNet``, ADM ``DhariwalUNet``) and their VP/VE/EDM
preconditioning, as project :class:`Denoiser` s.

Our own implementation of the architectures described in Karras et al. 2022 (EDM) and
NVlabs/edm ``training/networks.py``. Module paths and parameter/buffer names are NVIDIA's
(``map_noise``, ``map_label``, ``map_augment``, ``map_layer0/1``, ``enc``/``dec`` ModuleDicts
keyed ``'32x32_conv'``, ``'16x16_block3'``, ... with ``norm0/conv0/affine/norm1/conv1/skip/
norm2/qkv/proj`` inside each block, ``resample_filter`` buffers on resampling convolutions),
so the tensors of an EDM pickle are copied in strictly by path (see ``edm_pickle.py``).

Class conditions are int64 labels in this project; the networks turn them into the one-hot
vectors EDM was trained on. ``labels == num_classes`` is the null condition and becomes the
all-zero vector, which is what EDM's label dropout feeds during training -- so guidance is
meaningful only for networks trained with ``label_dropout > 0`` (the public CIFAR-10
checkpoint was not). Augmentation labels (``augment_dim``) are zero at sampling time, which
equals leaving ``map_augment`` out (it has no bias).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..io import CheckpointError
from .base import Denoiser, as_sigma
from .edm import EDMPrecond


# --------------------------------------------------------------------------- layers

def _init_tensor(shape, mode: str, fan_in: int, fan_out: int, gain: float = 1.0) -> torch.Tensor:
    """EDM's initialisers, scaled by ``gain``; drawn in place (no temporaries: ADM has 296 M weights)."""
    t = torch.empty(*shape)
    if mode == "xavier_uniform":
        bound = gain * math.sqrt(6 / (fan_in + fan_out))
    elif mode == "kaiming_uniform":
        bound = gain * math.sqrt(3 / fan_in)
    elif mode == "xavier_normal":
        return t.normal_(0.0, abs(gain) * math.sqrt(2 / (fan_in + fan_out)))
    elif mode == "kaiming_normal":
        return t.normal_(0.0, abs(gain) * math.sqrt(1 / fan_in))
    else:
        raise ValueError(f"unknown init mode {mode!r}")
    return t.uniform_(-abs(bound), abs(bound)) if bound else t.zero_()


class Linear(nn.Module):
    """y = x W^T + b with EDM's initialisation options; parameters ``weight``, ``bias``."""

    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_weight=1.0,
                 init_bias=0.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(_init_tensor([out_features, in_features], **fans, gain=init_weight))
        self.bias = nn.Parameter(_init_tensor([out_features], **fans, gain=init_bias)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """Convolution with optional 2x up/down-sampling by a separable FIR ``resample_filter``.

    ``kernel = 0`` means resampling only (no weights). With ``fused_resample`` the
    resampling and the convolution run as one padded pair of ops, which changes the border
    handling -- both variants exist in trained networks, so both are reproduced.
    """

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=(1, 1), fused_resample=False, init_mode="kaiming_normal", init_weight=1.0,
                 init_bias=0.0):
        if up and down:
            raise ValueError("a Conv2d cannot both upsample and downsample")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = nn.Parameter(_init_tensor([out_channels, in_channels, kernel, kernel], **fans,
                                                gain=init_weight)) if kernel else None
        self.bias = nn.Parameter(_init_tensor([out_channels], **fans, gain=init_bias)) if kernel and bias else None
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum() ** 2
        self.register_buffer("resample_filter", f if (up or down) else None)

    def forward(self, x):
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, (4 * f).tile(self.in_channels, 1, 1, 1), groups=self.in_channels,
                                   stride=2, padding=w_pad + f_pad)
            x = F.conv2d(x, w)
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, (4 * f).tile(self.in_channels, 1, 1, 1), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2,
                             padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """GroupNorm with at most 32 groups and at least ``min_channels_per_group`` per group."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """Residual block (optionally resampling) with optional multi-head self-attention.

    The union of the DDPM++, NCSN++ and ADM blocks: the embedding either adds a bias
    (``adaptive_scale=False``) or a scale and shift (ADM) after ``norm1``.
    """

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0.0, skip_scale=1.0, eps=1e-5,
                 resample_filter=(1, 1), resample_proj=False, adaptive_scale=True,
                 init=None, init_zero=None, init_attn=None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero if init_zero is not None else {"init_weight": 0})
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = 0 if not attention else (num_heads if num_heads is not None
                                                  else out_channels // channels_per_head)
        self.dropout = dropout
        self.drop = nn.Dropout(dropout)      # a module, so SFD can make its masks global-batch seeded
        self.skip_scale = float(skip_scale)
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(self.drop(x))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            b, c, h, w = x.shape
            # qkv channels are laid out [head][channel][q|k|v]; this reshape is part of the
            # trained weights' meaning, not a free choice.
            q, k, v = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            x = (self.proj(a.transpose(1, 2).reshape(b, c, h, w)) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """[cos(x f_i), sin(x f_i)] with f_i = (1/max_positions)^(i / (n/2 - endpoint))."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1.0 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features (NCSN++); the frequencies are a saved buffer ``freqs``."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def _class_vectors(labels, label_dim: int, dtype, device):
    """int labels -> one-hot (``label_dim`` = null -> zeros); float one-hot passes through."""
    if labels is None:
        return torch.zeros(1, label_dim, dtype=dtype, device=device)
    if labels.dtype.is_floating_point:
        return labels.to(dtype).reshape(-1, label_dim)
    return F.one_hot(labels.long().reshape(-1), label_dim + 1)[:, :label_dim].to(dtype)


class _Backbone(nn.Module):
    gradient_checkpointing = False

    def _run(self, block, x, emb):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, emb, use_reentrant=False)
        return block(x, emb)


# --------------------------------------------------------------------------- backbones

class SongUNet(_Backbone):
    """DDPM++ / NCSN++ UNet (Song et al. 2021) in EDM's formulation."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=(16,), dropout=0.10, label_dropout=0.0, embedding_type="positional",
                 channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
                 resample_filter=(1, 1)):
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"embedding_type {embedding_type!r} must be 'fourier' or 'positional'")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type {encoder_type!r} must be 'standard', 'skip' or 'residual'")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type {decoder_type!r} must be 'standard' or 'skip'")
        super().__init__()
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        bk = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                  resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                  init=init, init_zero=init_zero, init_attn=init_attn)

        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **bk)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **bk)
        skips = [blk.out_channels for name, blk in self.enc.items() if "aux" not in name]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **bk)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **bk)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **bk)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **bk)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels.reshape(-1).to(x.dtype))
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # DDPM++ wants [sin, cos]
        if self.map_label is not None:
            lab = _class_vectors(class_labels, self.label_dim, emb.dtype, x.device)
            if self.training and self.label_dropout:
                lab = lab * (torch.rand(lab.shape[0], 1, device=x.device) >= self.label_dropout).to(lab.dtype)
            emb = emb + self.map_label(lab * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = self._run(block, x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux = tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = self._run(block, x, emb)
        return aux


class DhariwalUNet(_Backbone):
    """ADM UNet (Dhariwal & Nichol 2021) in EDM's formulation."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                 attn_resolutions=(32, 16, 8), dropout=0.10, label_dropout=0.0):
        super().__init__()
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        bk = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **bk)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **bk)
        skips = [blk.out_channels for blk in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **bk)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **bk)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **bk)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **bk)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels.reshape(-1).to(x.dtype))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            lab = _class_vectors(class_labels, self.label_dim, emb.dtype, x.device)
            if self.training and self.label_dropout:
                lab = lab * (torch.rand(lab.shape[0], 1, device=x.device) >= self.label_dropout).to(lab.dtype)
            emb = emb + self.map_label(lab)
        emb = F.silu(emb)

        skips = []
        for block in self.enc.values():
            x = self._run(block, x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = self._run(block, x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


BACKBONES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


# --------------------------------------------------------------------------- preconditioning

class _LabelledPrecond(Denoiser):
    """Common parts of the VP and VE wrappers (EDM's own uses the project's EDMPrecond)."""

    def __init__(self, model: nn.Module, num_classes: int, img_shape):
        super().__init__()
        self.model = model
        self.num_classes = int(num_classes)
        self.img_shape = tuple(img_shape)

    def null_cond(self, cond):
        return torch.full_like(cond, self.num_classes)

    def loss_weight(self, sigma):
        return 1.0 / sigma**2      # EDM's VPLoss / VELoss weighting

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.model.gradient_checkpointing = bool(enabled)


class VPPrecond(_LabelledPrecond):
    """Continuous VP SDE: c_skip 1, c_out -sigma, c_in 1/sqrt(1+sigma^2), c_noise (M-1) t(sigma)."""

    def __init__(self, model, num_classes, img_shape, beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5):
        super().__init__(model, num_classes, img_shape)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)
        self.sigma_min = self.sigma(epsilon_t)
        self.sigma_max = self.sigma(1.0)

    def sigma(self, t: float) -> float:
        return math.sqrt(math.exp(0.5 * self.beta_d * t**2 + self.beta_min * t) - 1)

    def sigma_inv(self, sigma):
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    def forward(self, x, sigma, cond):
        sigma = as_sigma(sigma, x)
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        f = self.model(c_in * x, c_noise.flatten(), cond)
        return x - sigma * f.to(x.dtype)


class VEPrecond(_LabelledPrecond):
    """Continuous VE SDE: c_skip 1, c_out sigma, c_in 1, c_noise ln(sigma / 2)."""

    def __init__(self, model, num_classes, img_shape, sigma_min=0.02, sigma_max=100.0):
        super().__init__(model, num_classes, img_shape)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def forward(self, x, sigma, cond):
        sigma = as_sigma(sigma, x)
        f = self.model(x, (0.5 * sigma).log().flatten(), cond)
        return x + sigma * f.to(x.dtype)


PRECOND_KEYS = {"img_resolution", "img_channels", "label_dim", "use_fp16", "model_type"}
_PRECOND_EXTRA = {
    "EDMPrecond": {"sigma_min", "sigma_max", "sigma_data"},
    "VPPrecond": {"beta_d", "beta_min", "M", "epsilon_t"},
    "VEPrecond": {"sigma_min", "sigma_max"},
}
_DEFAULT_MODEL = {"EDMPrecond": "DhariwalUNet", "VPPrecond": "SongUNet", "VEPrecond": "SongUNet"}


def build_edm_denoiser(class_name: str, init_kwargs: dict, *, uninitialised: bool = False) -> Denoiser:
    """The project denoiser for an EDM ``<class_name>(**init_kwargs)`` preconditioner.

    ``init_kwargs`` are the constructor arguments NVIDIA's pickles record; the backbone
    (``model_type``) receives the rest, exactly as in NVIDIA's code. ``uninitialised`` skips
    the random initialisation (the backbone is built on the meta device and given empty
    storage) for callers that overwrite every tensor right after, e.g. a strict load.
    """
    if class_name not in _PRECOND_EXTRA:
        raise CheckpointError(f"unsupported EDM network class {class_name!r}; supported: "
                              f"{sorted(_PRECOND_EXTRA)} (iDDPMPrecond is not supported)")
    kw = dict(init_kwargs)
    try:
        res, channels = int(kw.pop("img_resolution")), int(kw.pop("img_channels"))
    except KeyError as e:
        raise CheckpointError(f"{class_name} constructor arguments lack {e.args[0]!r}: {sorted(init_kwargs)}") from None
    label_dim = int(kw.pop("label_dim", 0))
    kw.pop("use_fp16", None)   # precision is chosen at run time here (autocast), not baked in
    model_type = kw.pop("model_type", _DEFAULT_MODEL[class_name])
    if model_type not in BACKBONES:
        raise CheckpointError(f"unsupported EDM backbone {model_type!r}; supported: {sorted(BACKBONES)}")
    pre = {k: kw.pop(k) for k in list(kw) if k in _PRECOND_EXTRA[class_name]}
    try:
        if uninitialised:
            # Every tensor of the backbone is a parameter or persistent buffer, so a strict
            # copy afterwards overwrites all of it; initialising 56-296 M random numbers first
            # would only cost time.
            with torch.device("meta"):
                net = BACKBONES[model_type](img_resolution=res, in_channels=channels, out_channels=channels,
                                            label_dim=label_dim, **kw)
            net = net.to_empty(device="cpu")
        else:
            net = BACKBONES[model_type](img_resolution=res, in_channels=channels, out_channels=channels,
                                        label_dim=label_dim, **kw)
    except TypeError as e:
        raise CheckpointError(f"cannot build {model_type} from the pickle's arguments {sorted(kw)}: {e}") from e
    img_shape = (channels, res, res)
    if class_name == "EDMPrecond":
        # EDM's defaults are sigma_min 0 and sigma_max inf ("any"); samplers need finite
        # bounds, so use the EDM sampler's 0.002 .. 80 where the network sets none.
        lo = float(pre.get("sigma_min", 0) or 0)
        hi = float(pre.get("sigma_max", math.inf))
        d = EDMPrecond(net, num_classes=label_dim, img_shape=img_shape,
                       sigma_data=float(pre.get("sigma_data", 0.5)),
                       sigma_min=lo if lo > 0 else 0.002, sigma_max=hi if math.isfinite(hi) else 80.0)
    elif class_name == "VPPrecond":
        d = VPPrecond(net, label_dim, img_shape, **pre)
    else:
        d = VEPrecond(net, label_dim, img_shape, **pre)
    d.spec = {"arch": "edm-networks", "config": {"class_name": class_name, "init_kwargs": plain(init_kwargs)},
              "img_shape": list(img_shape)}
    return d


def build_edm_from_spec(spec: dict) -> Denoiser:
    """``ARCHS['edm-networks']``."""
    cfg = spec["config"]
    return build_edm_denoiser(cfg["class_name"], cfg["init_kwargs"])


def plain(obj):
    """JSON-ready copy: numpy scalars -> Python numbers, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    raise CheckpointError(f"constructor argument of type {type(obj).__name__} ({obj!r}) cannot be recorded")


# Published configurations (NVlabs/edm train.py presets), full size.
EDM_CONFIGS: dict[str, tuple[str, dict]] = {
    # edm-cifar10-32x32-cond-vp.pkl: DDPM++ backbone, EDM preconditioning.
    "cifar10-cond-ddpmpp-edm": ("EDMPrecond", dict(
        img_resolution=32, img_channels=3, label_dim=10, use_fp16=False, sigma_min=0, sigma_max=float("inf"),
        sigma_data=0.5, model_type="SongUNet", augment_dim=9, dropout=0.13, embedding_type="positional",
        encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
        model_channels=128, channel_mult=[2, 2, 2])),
    # the paper's VP baseline: same backbone, VP preconditioning.
    "cifar10-cond-ddpmpp-vp": ("VPPrecond", dict(
        img_resolution=32, img_channels=3, label_dim=10, use_fp16=False, beta_d=19.9, beta_min=0.1, M=1000,
        epsilon_t=1e-5, model_type="SongUNet", augment_dim=9, dropout=0.13, embedding_type="positional",
        encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
        model_channels=128, channel_mult=[2, 2, 2])),
    # edm-cifar10-32x32-cond-ve.pkl: NCSN++ backbone.
    "cifar10-cond-ncsnpp-ve": ("VEPrecond", dict(
        img_resolution=32, img_channels=3, label_dim=10, use_fp16=False, sigma_min=0.02, sigma_max=100,
        model_type="SongUNet", augment_dim=9, dropout=0.13, embedding_type="fourier", encoder_type="residual",
        decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128,
        channel_mult=[2, 2, 2])),
    # edm-imagenet-64x64-cond-adm.pkl: ADM backbone.
    "imagenet64-cond-adm-edm": ("EDMPrecond", dict(
        img_resolution=64, img_channels=3, label_dim=1000, use_fp16=False, sigma_min=0, sigma_max=float("inf"),
        sigma_data=0.5, model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.10)),
}
