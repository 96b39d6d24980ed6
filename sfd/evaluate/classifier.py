"""The embedded presets' judge: a small CNN whose penultimate features are the Frechet space.

A *judge* is anything with ``features_and_logits(x) -> (features, logits)`` on images in
[-1, 1] (and ``parameters()`` for its device); the
digits CNN is one, the Inception/ResNet-34 pair for real datasets is another.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class DigitsCNN(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width, feature_dim=feature_dim)
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.MaxPool2d(2),                                                   # 4x4
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),                                                   # 2x2
            nn.Flatten(),
            nn.Linear(2 * w * 4, feature_dim), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))

    def features_and_logits(self, x: torch.Tensor):
        f = self.features(x)
        return f, self.head(f)


def augment_digits(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Small random shifts (one pixel) so the classifier does not key on exact positions."""
    n = x.shape[0]
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (n,), generator=generator)
    dy = torch.randint(0, 3, (n,), generator=generator)
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    for i in range(n):
        out[i] = pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return out
