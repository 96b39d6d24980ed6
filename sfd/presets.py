"""Dataset presets: what a class id means, image shape, and (where embedded) the real data.

Real images are used only to train the bundled teacher/classifier and to *evaluate*; the SFD
loop itself never loads them (it is data-free, SFD.md section 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class Preset:
    name: str
    class_names: tuple[str, ...]
    img_shape: tuple[int, int, int]
    embedded: bool = False          # real data and bundled teacher/classifier ship with sfd
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def text(self) -> bool:
        """Text-to-image preset: conditions are prompts (concept targets), not class ids."""
        return self.extra.get("conditioning") == "text"

    @property
    def weights_dir(self) -> Path:
        return WEIGHTS_DIR / self.name

    def check_class(self, c: int, what: str = "class") -> int:
        if not isinstance(c, (int, np.integer)) or not 0 <= int(c) < self.num_classes:
            valid = ", ".join(f"{i}={n}" for i, n in enumerate(self.class_names))
            raise ValueError(f"{what} {c!r} is not a class of preset '{self.name}' — give one of the valid classes: "
                             f"{valid}")
        return int(c)

    def real_data(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """(images in [-1, 1] of shape (N, C, H, W), int64 labels): embedded, or fetched (cifar10, stl10)."""
        if self.name == "digits":
            return _digits(split)
        if self.name == "colordigits":
            from .colordigits import real_data     # labels: digit * 5 + colour
            return real_data(split)
        if self.name in ("cifar10", "stl10"):
            from .datasets import load_real        # the official archive in $SFD_HOME (`sfd fetch`)
            return load_real(self.name, split)
        raise ValueError(
            f"preset '{self.name}' ships no real images; pass reference statistics or an image "
            f"folder of your own for evaluation")


def _digits(split: str):
    if split not in ("train", "test", "all"):
        raise ValueError(f"split {split!r} must be 'train', 'test' or 'all'")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.images.astype(np.float32) / 8.0 - 1.0        # 0..16 -> [-1, 1]
    y = data.target.astype(np.int64)
    if split != "all":
        # A fixed stratified split: 80 % train, 20 % held out (seed 0).
        idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
        idx = idx_train if split == "train" else idx_test
        x, y = x[idx], y[idx]
    return torch.from_numpy(x)[:, None], torch.from_numpy(y)


PRESETS: dict[str, Preset] = {
    "digits": Preset("digits", tuple(str(i) for i in range(10)), (1, 8, 8), embedded=True,
                     notes="scikit-learn's 8x8 handwritten digits (1,797 images), bundled teacher and classifier"),
    "colordigits": Preset("colordigits", (), (3, 8, 8), embedded=True,
                          notes="text-to-image: the 8x8 digits in five ink colours with captions; bundled "
                                "text-conditioned teacher (diffusers pipeline folder) and two-headed judge",
                          extra={"conditioning": "text", "teacher": "teacher"}),
    "sd": Preset("sd", (), (4, 64, 64),
                 notes="text-to-image: bring a Stable Diffusion 1.x/2.x pipeline folder (diffusers layout); SFD in its "
                       "VAE latent space, celebrity and nudity targets (sfd/sd.py)",
                 extra={"conditioning": "text", "latent": True}),
    "cifar10": Preset("cifar10", ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                  "ship", "truck"), (3, 32, 32),
                      notes="bring a teacher: official SFD DDPM checkpoint, NVIDIA EDM .pkl or diffusers UNet folder"),
    "stl10": Preset("stl10", ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"),
                    (3, 64, 64),
                    notes="bring a teacher: official SFD DDPM checkpoint, NVIDIA EDM .pkl or diffusers UNet folder"),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None
