"""Dataset presets: what a class id means, image shape, and (where embedded) the real data.

Real images are used only to train the bundled teacher/classifier and to *evaluate*; the SFD
loop itself never loads them (it is data-free, SFD.md section 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import colordigits, datasets

WEIGHTS_DIR = Path(__file__).parent / "weights"
TASK_KINDS = ("classes", "concepts", "sd")


@dataclass(frozen=True)
class Preset:
    name: str
    class_names: tuple[str, ...]
    img_shape: tuple[int, int, int]
    # the kind of conditioning, read only by sfd.tasks.get_task: 'classes' (class ids), 'concepts' (prompts over
    # the preset's own vocabulary), 'sd' (Stable Diffusion latents and free-form prompts)
    task: str = "classes"
    embedded: bool = False          # real data and bundled teacher/classifier ship with sfd
    notes: str = ""
    data: Callable[[str], tuple[torch.Tensor, torch.Tensor]] | None = None   # real images: split -> (x, y)
    teacher_file: str = "teacher.safetensors"      # the bundled teacher, under weights_dir

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

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
        if self.data is None:
            raise ValueError(
                f"preset '{self.name}' ships no real images; pass reference statistics or an image "
                f"folder of your own for evaluation")
        return self.data(split)


PRESETS: dict[str, Preset] = {
    "digits": Preset("digits", tuple(str(i) for i in range(10)), (1, 8, 8), embedded=True, data=datasets.digits,
                     notes="scikit-learn's 8x8 handwritten digits (1,797 images), bundled teacher and classifier"),
    "colordigits": Preset("colordigits", (), (3, 8, 8), task="concepts", embedded=True, data=colordigits.real_data,
                          teacher_file="teacher",
                          notes="text-to-image: the 8x8 digits in five ink colours with captions; bundled "
                                "text-conditioned teacher (diffusers pipeline folder) and two-headed judge"),
    "sd": Preset("sd", (), (4, 64, 64), task="sd",
                 notes="text-to-image: bring a Stable Diffusion 1.x/2.x pipeline folder (diffusers layout); SFD in its "
                       "VAE latent space, celebrity and nudity targets (sfd/tasks/stable_diffusion.py)"),
    "cifar10": Preset("cifar10", ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                  "ship", "truck"), (3, 32, 32), data=partial(datasets.load_real, "cifar10"),
                      notes="bring a teacher: official SFD DDPM checkpoint, NVIDIA EDM .pkl or diffusers UNet folder"),
    "stl10": Preset("stl10", ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"),
                    (3, 64, 64), data=partial(datasets.load_real, "stl10"),
                    notes="bring a teacher: official SFD DDPM checkpoint, NVIDIA EDM .pkl or diffusers UNet folder"),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None
