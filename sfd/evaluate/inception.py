"""Inception-v3 pool features for FID (and logits for IS), without torchvision.

Our own definition of the FID variant of Inception-v3 (the network behind the standard
``pt_inception-2015-12-05-6726825d.pth`` weights of pytorch-fid, a port of the TensorFlow
FID graph). Module names follow torchvision's ``Inception3`` layout that file uses
(``Conv2d_1a_3x3.conv/bn``, ``Mixed_5b.branch1x1`` ... ``Mixed_7c.branch_pool``, ``fc`` with
1008 outputs, no auxiliary head), so the file loads strictly. The FID graph differs from
ImageNet Inception in its pooling: average pools exclude padding in the A/C/E blocks and the
last block's pool branch uses max pooling.

Inputs are images in [-1, 1] at any size; they are resized to 299x299 bilinearly (as
pytorch-fid does). Reference images are converted with x / 127.5 - 1 and never rescaled per
image (the reference code's min-max rescaling biases FID).

Weights are read from a LOCAL file (``torch.load(weights_only=True)`` or safetensors);
nothing downloads at run time. ``download_fid_weights`` fetches the standard file only when
called explicitly.
"""
from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from ..io import CheckpointError, load_state_strict
from .metrics import feature_stats, frechet_distance

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_SHA256_PREFIX = "6726825d"   # torch.hub convention: sha256 prefix in the file name
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; keys ``conv.weight``, ``bn.*``."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    # The TF graph's 3x3 average pool ignores padded zeros at the border.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg3(x)),
        ], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
            d = m(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool`` selects the FID graph's last block (max instead of average pooling)."""

    def __init__(self, cin, max_pool=False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the FID protocol: ``features_and_logits(x in [-1, 1])`` -> (2048 pool, 1008 logits)."""

    def __init__(self, num_classes: int = 1008):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)          # grey images: replicate to RGB
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x):
        return self.features(x)

    def features_and_logits(self, x):
        f = self.features(x)
        return f, self.fc(f)


def read_state_dict(path) -> dict:
    """A state dict from .safetensors or a torch file (weights_only); wrappers and ``module.`` removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing weight file: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {e}. Save the network's "
                              f"state_dict() (not the whole module) and load that.") from e
    for key in ("state_dict", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def complete_batchnorm_counters(module: nn.Module, state: dict) -> dict:
    """Add BatchNorm ``num_batches_tracked`` counters missing from older files (torch < 0.4.1).

    They are bookkeeping only (unused in eval mode); every other key is still checked strictly.
    """
    state = dict(state)
    for k, v in module.state_dict().items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(v)
    return state


def load_fid_inception(path, device="cpu") -> FIDInceptionV3:
    """The FID Inception from a LOCAL weight file (pt_inception-2015-12-05-6726825d.pth)."""
    net = FIDInceptionV3()
    state = read_state_dict(path)
    load_state_strict(net, complete_batchnorm_counters(net, state), path)
    return net.to(device).eval().requires_grad_(False)


def download_fid_weights(dest, url: str = FID_WEIGHTS_URL) -> Path:
    """Fetch the standard FID weights to ``dest`` (explicit, opt-in; never called implicitly)."""

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    with urllib.request.urlopen(url) as r, open(tmp, "wb") as f:
        while chunk := r.read(1 << 20):
            f.write(chunk)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    if url == FID_WEIGHTS_URL and not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
        tmp.unlink()
        raise CheckpointError(f"downloaded FID weights have sha256 {digest[:16]}..., expected prefix "
                              f"{FID_WEIGHTS_SHA256_PREFIX}; refusing the file")
    tmp.replace(dest)
    return dest


# --------------------------------------------------------------------------- statistics

def load_image_folder(folder, limit: int | None = None) -> torch.Tensor:
    """Images of a folder (recursively, sorted) as float in [-1, 1], (N, 3, H, W).

    Conversion is x / 127.5 - 1 on the stored 8-bit values: no per-image rescaling.
    """

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if limit is not None:
        files = files[:limit]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    out, shape = [], None
    for p in files:
        with Image.open(p) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.uint8)
        if shape is None:
            shape = a.shape
        elif a.shape != shape:
            raise ValueError(f"{p} is {a.shape[1]}x{a.shape[0]} but earlier images are {shape[1]}x{shape[0]}; "
                             f"reference images must share one size")
        out.append(torch.from_numpy(a.copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 127.5 - 1.0


@torch.no_grad()
def inception_features(net: FIDInceptionV3, images: torch.Tensor, batch_size: int = 100) -> np.ndarray:
    device = next(net.parameters()).device
    feats = [net.features(chunk.to(device)).cpu() for chunk in images.split(batch_size)]
    return torch.cat(feats).double().numpy()


def save_stats(path, mu: np.ndarray, sigma: np.ndarray) -> None:
    np.savez(path, mu=mu, sigma=sigma)


def load_stats(path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f or "sigma" not in f:
            raise CheckpointError(f"{path} has keys {sorted(f.files)}; FID statistics need 'mu' and 'sigma'")
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)


def reference_stats(source, net: FIDInceptionV3 | None = None, batch_size: int = 100,
                    limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of real images: from an ``.npz`` (keys mu, sigma) or an image folder."""
    source = Path(source)
    if source.suffix == ".npz":
        return load_stats(source)
    if not source.is_dir():
        raise FileNotFoundError(f"reference {source} is neither an .npz of statistics nor an image folder")
    if net is None:
        raise ValueError("computing statistics from an image folder needs the Inception network")
    return feature_stats(inception_features(net, load_image_folder(source, limit), batch_size))


def fid_from_features(features: np.ndarray, ref: tuple[np.ndarray, np.ndarray]) -> float:
    return frechet_distance(feature_stats(features), ref)


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score (mean, std over splits) from the 1008-way logits.

    IS = exp(E_x KL(p(y|x) || p(y))) with p(y) the mean over the split; the N samples are cut
    into ``splits`` contiguous parts [i N // splits, (i + 1) N // splits) as in the original
    implementation, so every split is used even when N is not a multiple of it."""
    p = torch.as_tensor(logits).double().softmax(dim=1)
    n = p.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"need 1 <= splits <= number of samples ({n}), got splits={splits}")
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        py = part.mean(0, keepdim=True)
        kl = (part * (part.clamp_min(1e-12).log() - py.clamp_min(1e-12).log())).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))
