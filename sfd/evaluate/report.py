"""Sample-quality reports shared by teacher evaluation, SFD evaluation and the sweep."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..io import atomic_path
from .inception import load_image_folder
from .metrics import accuracy, feature_stats, frechet_distance, judge_outputs


@dataclass
class RealReference:
    """Judge features of the real images of an embedded preset (all splits)."""
    labels: torch.Tensor
    feats: np.ndarray

    @classmethod
    def from_preset(cls, preset, judge, source=None):
        """Judge features of the real images, or (for a per-class statistics .npz, see
        :func:`is_class_stats`) the precomputed statistics: then only generated images are embedded."""
        if source is not None and is_class_stats(source):
            return ClassStatsReference.load(source, preset)
        x, y = preset.real_data("all") if source is None else load_reference(source, preset)
        _, _, feats = judge_outputs(judge, x)
        return cls(y, feats)

    def of(self, classes) -> np.ndarray:
        return self.feats[torch.isin(self.labels, torch.as_tensor(list(classes))).numpy()]

    def floor(self, classes, seed: int = 0) -> float:
        """FD between two random halves of the real images of ``classes``: the noise floor."""
        f = self.of(classes)
        perm = np.random.default_rng(seed).permutation(len(f))
        half = len(f) // 2
        return frechet_distance(f[perm[:half]], f[perm[half:2 * half]])


CLASS_STATS_KIND = "sfd-class-inception-stats"


def is_class_stats(source) -> bool:
    """Whether ``source`` is a per-class statistics .npz (keys kind, classes, n, mu, sigma)."""
    source = Path(source)
    if source.suffix != ".npz" or not source.is_file():
        return False
    with np.load(source, allow_pickle=False) as f:
        return "kind" in f.files and str(f["kind"]) == CLASS_STATS_KIND


def save_class_stats(path, feats: np.ndarray, labels, num_classes: int, feature_net: str = "") -> None:
    """Per-class (n, mean, covariance) of features, float64, written atomically."""

    labels = np.asarray(labels)
    mus, sigmas, ns = [], [], []
    for c in range(num_classes):
        f = feats[labels == c]
        if len(f) < 2:
            raise ValueError(f"class {c} has {len(f)} reference image(s); statistics need at least 2")
        mu, sigma = feature_stats(f)
        mus.append(mu)
        sigmas.append(sigma)
        ns.append(len(f))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, kind=np.array(CLASS_STATS_KIND), classes=np.arange(num_classes), n=np.array(ns),
                     mu=np.stack(mus), sigma=np.stack(sigmas), feature_net=np.array(feature_net))


@dataclass
class ClassStatsReference:
    """Per-class Gaussian statistics of the real images' features, precomputed once.

    ``of(classes)`` pools the classes exactly (the mean and covariance of their union)."""
    n: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    feature_net: str = ""

    @classmethod
    def load(cls, source, preset=None) -> "ClassStatsReference":
        with np.load(source, allow_pickle=False) as f:
            missing = {"n", "mu", "sigma"} - set(f.files)
            if missing:
                raise ValueError(f"reference statistics {source} lack {sorted(missing)}")
            ref = cls(f["n"].astype(np.int64), f["mu"].astype(np.float64), f["sigma"].astype(np.float64),
                      str(f["feature_net"]) if "feature_net" in f.files else "")
        if preset is not None and len(ref.n) != preset.num_classes:
            raise ValueError(f"reference statistics {source} cover {len(ref.n)} classes, preset '{preset.name}' "
                             f"has {preset.num_classes}")
        return ref

    def of(self, classes) -> tuple[np.ndarray, np.ndarray]:
        idx = [int(c) for c in classes]
        n, mu, sig = self.n[idx].astype(np.float64), self.mu[idx], self.sigma[idx]
        total = n.sum()
        mean = (n[:, None] * mu).sum(0) / total
        d = mu - mean
        cov = (np.tensordot(n - 1, sig, axes=1) + np.einsum("c,ci,cj->ij", n, d, d)) / (total - 1)
        return mean, cov


def check_reference(source, preset) -> None:
    """Fail early on an unusable reference (images or per-class statistics)."""
    if is_class_stats(source):
        ClassStatsReference.load(source, preset)
    else:
        load_reference(source, preset)


def load_reference(source, preset) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images in [-1, 1] and labels from a folder of class folders or an .npz file.

    Pixels are converted x / 127.5 - 1 from their stored 8-bit values, never rescaled per image.
    """

    source = Path(source)
    if source.suffix == ".npz":
        with np.load(source, allow_pickle=False) as f:
            if "images" not in f or "labels" not in f:
                raise ValueError(f"reference {source} needs arrays 'images' (N,H,W,C uint8) and 'labels'")
            imgs, labels = f["images"], f["labels"]
        x = torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        y = torch.from_numpy(labels.astype(np.int64))
    elif source.is_dir():
        xs, ys = [], []
        for c, name in enumerate(preset.class_names):
            folder = next((source / n for n in (name, str(c)) if (source / n).is_dir()), None)
            if folder is None:
                raise ValueError(f"reference folder {source} has no sub-folder '{name}' or '{c}' for class {c}")
            xs.append(load_image_folder(folder))
            ys.append(torch.full((len(xs[-1]),), c, dtype=torch.int64))
        x, y = torch.cat(xs), torch.cat(ys)
    else:
        raise ValueError(f"reference {source} is neither a folder of class folders nor an .npz file")
    if tuple(x.shape[1:]) != tuple(preset.img_shape):
        raise ValueError(f"reference images are {tuple(x.shape[1:])}, preset '{preset.name}' expects "
                         f"{tuple(preset.img_shape)}")
    return x, y


def sample_quality(judge, x: torch.Tensor, labels: torch.Tensor, ref: RealReference, classes) -> dict:
    """Accuracy of the judge on samples ``x`` (meant as ``labels``) and FD to the real images,
    over the class set and per class; restricted to samples whose label is in ``classes``."""
    classes = [int(c) for c in classes]
    pred, _, feats = judge_outputs(judge, x)
    mask = torch.isin(labels, torch.as_tensor(classes))
    out = {"n_samples": int(mask.sum()),
           "accuracy": accuracy(pred[mask], labels[mask]),
           "fd": frechet_distance(feats[mask.numpy()], ref.of(classes)),
           "per_class": {}}
    for c in classes:
        m = (labels == c)
        if int(m.sum()) >= 2:
            out["per_class"][c] = {"accuracy": accuracy(pred[m], labels[m]),
                                   "fd": frechet_distance(feats[m.numpy()], ref.of([c])),
                                   "n": int(m.sum())}
    return out


def save_grid(path, x: torch.Tensor, nrow: int, scale: int = 4, labels=None) -> None:
    """A PNG grid of images in [-1, 1]; ``nrow`` images per row (one row per class by convention)."""
    import matplotlib
    matplotlib.use("Agg")


    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    pad = 1
    canvas = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = x[i]
    arr = canvas.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
