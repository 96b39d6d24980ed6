"""The real datasets read straight from their official archives, safely.

CIFAR-10 (``cifar-10-python.tar.gz``): pickled batches ``cifar-10-batches-py/data_batch_1..5`` and
``test_batch``, each a dict with ``data`` (N x 3072 uint8, channel-major R, G, B planes of 32x32)
and ``labels``. They are read with a restricted unpickler that allows only the globals numpy needs
to rebuild an array (``_reconstruct``, ``ndarray``, ``dtype``, ``_frombuffer``) and refuses any
other, so a crafted batch cannot run code.

STL-10 (``stl10_binary.tar.gz``): raw ``stl10_binary/{train,test}_X.bin`` (N x 3 x 96 x 96 uint8,
column-major per image) and ``{train,test}_y.bin`` (labels 1..10). The preset is 64x64: images are
downsampled with an antialiased bilinear filter (PIL), as the reference trains at 64x64.
Images come back as uint8 (N, H, W, 3) plus int64 labels; ``to_tensor`` gives x / 127.5 - 1.
"""
from __future__ import annotations

import importlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .assets import REGISTRY, find

SAFE_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
}


class UnsafePickleError(ValueError):
    pass


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists/strings/numbers and numpy arrays; every other global is refused."""

    def find_class(self, module, name):
        target = SAFE_NUMPY_GLOBALS.get((module, name))
        if target is None:
            raise UnsafePickleError(f"refusing global {module}.{name}: a dataset batch holds only numpy arrays")
        try:
            mod = importlib.import_module(target[0])
        except ImportError:                      # numpy < 2 names it numpy.core
            mod = importlib.import_module(target[0].replace("numpy._core", "numpy.core"))
        return getattr(mod, target[1])


def safe_load_batch(data: bytes, source: str = "batch") -> dict:
    try:
        obj = NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafePickleError as e:
        raise ValueError(f"{source}: {e} — this is not an official CIFAR batch; re-download it "
                         f"(`sfd fetch cifar10`)") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{source} is not a CIFAR batch (a dict), got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


CIFAR_MEMBERS = {"train": [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)],
                 "test": ["cifar-10-batches-py/test_batch"]}


def load_cifar10(archive, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, 32, 32, 3), int64 labels) of the official python archive."""
    names = _split_members(CIFAR_MEMBERS, split)
    xs, ys = [], []
    with tarfile.open(archive, "r:gz") as tar:
        for name in names:
            try:
                f = tar.extractfile(name)
            except KeyError:
                f = None
            if f is None:
                raise ValueError(f"{archive} has no member {name}; it is not the official cifar-10-python.tar.gz")
            d = safe_load_batch(f.read(), f"{archive}:{name}")
            data = np.asarray(d.get("data"))
            labels = np.asarray(d.get("labels"), dtype=np.int64)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
                raise ValueError(f"{archive}:{name}: expected 'data' (N, 3072) uint8 and N 'labels', got "
                                 f"{data.dtype} {data.shape} and {labels.shape}")
            xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(labels)
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


STL_MEMBERS = {"train": [("stl10_binary/train_X.bin", "stl10_binary/train_y.bin")],
               "test": [("stl10_binary/test_X.bin", "stl10_binary/test_y.bin")]}


def load_stl10(archive, split: str = "train", size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, size, size, 3), int64 labels 0..9) of the official binary archive."""

    pairs = _split_members(STL_MEMBERS, split)
    xs, ys = [], []
    with tarfile.open(archive, "r:gz") as tar:
        for xname, yname in pairs:
            try:
                raw_x, raw_y = tar.extractfile(xname).read(), tar.extractfile(yname).read()
            except (KeyError, AttributeError):
                raise ValueError(f"{archive} has no {xname}/{yname}; it is not the official stl10_binary.tar.gz") \
                    from None
            y = np.frombuffer(raw_y, dtype=np.uint8).astype(np.int64) - 1
            x = np.frombuffer(raw_x, dtype=np.uint8)
            if x.size != len(y) * 3 * 96 * 96 or y.min(initial=0) < 0 or y.max(initial=0) > 9:
                raise ValueError(f"{archive}: {xname} / {yname} do not match (N x 3 x 96 x 96 images, labels 1..10)")
            x = x.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)         # column-major per image -> HWC
            if size != 96:
                x = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in x])
            xs.append(x)
            ys.append(y)
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


def _split_members(table, split):
    if split == "all":
        return table["train"] + table["test"]
    if split not in table:
        raise ValueError(f"split {split!r} must be 'train', 'test' or 'all'")
    return table[split]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1] via x / 127.5 - 1 (never rescaled per image)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def archive_path(preset: str, home=None) -> Path:
    a = find(REGISTRY, preset, "dataset")
    if a is None:
        raise ValueError(f"preset '{preset}' has no downloadable dataset")
    return a.path(home)


def load_real(preset: str, split: str = "train", home=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [-1, 1], labels) of a real-dataset preset from the archive in $SFD_HOME."""
    path = archive_path(preset, home)
    if not path.is_file():
        a = find(REGISTRY, preset, "dataset")
        raise ValueError(f"the {preset} training data is not in the cache — run `sfd fetch {preset}`, or put "
                         f"{a.filename} ({a.checksum_text()}, from {a.url}) at {path}")
    x, y = load_cifar10(path, split) if preset == "cifar10" else load_stl10(path, split)
    return to_tensor(x), torch.from_numpy(y)


def digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits in [-1, 1], (N, 1, 8, 8), with labels: a fixed stratified split, 80 % train and
    20 % held out (seed 0), or 'all'."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split {split!r} must be 'train', 'test' or 'all'")
    from sklearn.datasets import load_digits  # heavy, and only the digits presets need it
    from sklearn.model_selection import train_test_split
    data = load_digits()
    x = data.images.astype(np.float32) / 8.0 - 1.0        # 0..16 -> [-1, 1]
    y = data.target.astype(np.int64)
    if split != "all":
        idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
        idx = idx_train if split == "train" else idx_test
        x, y = x[idx], y[idx]
    return torch.from_numpy(x)[:, None], torch.from_numpy(y)
