"""A small class-conditional UNet for the embedded 8x8 presets.

Sized for 2 CPU cores: an SFD iteration evaluates three copies of it several times, so a
forward pass at batch 128 must stay in the tens of milliseconds. Two resolutions (8x8 and
4x4), residual blocks with a per-channel bias from the noise and class embeddings, no
attention (at 4x4 a 3x3 convolution already sees the whole image).

The class embedding has ``num_classes + 1`` rows: the last one is the learned null
condition for classifier-free guidance (trained by label dropout).
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


def fourier_embedding(c_noise: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of a per-sample scalar noise level."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=c_noise.device, dtype=torch.float32) / half)
    args = c_noise.float().reshape(-1, 1) * freqs.reshape(1, -1) * 100.0
    return torch.cat([args.cos(), args.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(min(8, cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.skip(x) + h) / math.sqrt(2.0)


class TinyUNet(nn.Module):
    """F(x_in, c_noise, labels) for EDM preconditioning; labels == num_classes is 'null'."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels: int = 32,
                 emb_dim: int = 128, dropout: float = 0.0):
        super().__init__()
        self.config = dict(in_channels=in_channels, num_classes=num_classes, channels=channels,
                           emb_dim=emb_dim, dropout=dropout)
        c1, c2 = channels, 2 * channels
        self.emb_dim = emb_dim
        self.noise_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, emb_dim, dropout)
        self.downsample = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.down2 = ResBlock(c1, c2, emb_dim, dropout)
        self.mid1 = ResBlock(c2, c2, emb_dim, dropout)
        self.mid2 = ResBlock(c2, c2, emb_dim, dropout)
        self.up2 = ResBlock(c2 + c2, c2, emb_dim, dropout)
        self.upsample = nn.Conv2d(c2, c1, 3, padding=1)
        self.up1 = ResBlock(c1 + c1, c1, emb_dim, dropout)
        self.norm_out = nn.GroupNorm(8, c1)
        self.conv_out = nn.Conv2d(c1, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, c_noise, labels):
        emb = self.noise_mlp(fourier_embedding(c_noise, self.emb_dim).to(x.dtype)) + self.class_emb(labels)
        emb = F.silu(emb)
        h1 = self.down1(self.conv_in(x), emb)
        h2 = self.down2(self.downsample(h1), emb)
        h = self.mid2(self.mid1(h2, emb), emb)
        h = self.up2(torch.cat([h, h2], dim=1), emb)
        h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up1(torch.cat([h, h1], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))
