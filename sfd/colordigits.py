"""The embedded text-to-image preset ``colordigits``: data, captions and concept vocabulary.

Images are scikit-learn's 8x8 handwritten digits rendered in RGB: the stroke intensity times
an ink colour, on a dark (-1) background, in [-1, 1]. Every base image is rendered in every
ink colour, so each (digit, colour) pair has ~180 real images; the train/test split is the
digits preset's (by base image, stratified, seed 0), so no stroke pattern is in both.

Captions come from templates with ``{color}``, ``{word}`` (digit word) and ``{num}`` (numeral)
slots. ``TRAIN_TEMPLATES`` are used to train the teacher and for the SFD forget/remain prompts;
``HELDOUT_TEMPLATES`` are never trained on (not by the teacher, not by SFD) and measure whether
forgetting generalises beyond the prompts it saw (``ua_heldout``). Held-out templates use
only words the training captions contain, in new orders and combinations. The training templates put
the digit first, in the middle and last: a first teacher trained on the first five templates only (the
digit never first) reached prompt accuracy 0.95 on them but 0.77 on the held-out templates; with the
two digit-first templates added, 0.95 on both (sfd/weights/colordigits/teacher.json).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from .datasets import digits

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.12, 0.12),
    "green": (0.12, 1.0, 0.12),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (1.0, 1.0, 0.1),
    "white": (1.0, 1.0, 1.0),
}
COLOR_NAMES = tuple(COLORS)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TRAIN_TEMPLATES = (
    "a {color} {word}",
    "the digit {num} in {color} ink",
    "a handwritten {word}, {color}",
    "{color} number {num}",
    "a {color} digit {word}",
    "{word} in {color}",
    "number {num}, {color} ink",
)
HELDOUT_TEMPLATES = (
    "the number {word} in {color} ink",
    "a handwritten {color} {num}",
    "{word}, {color}",
)

# The preset's concepts: every digit word (its numeral a built-in synonym) and every colour.
BUILTIN_SYNONYMS: dict[str, tuple[str, ...]] = {w: (str(i),) for i, w in enumerate(DIGIT_WORDS)}


def concept_attribute(concept: str) -> tuple[str, int] | None:
    """('digit', d) or ('color', k) for a concept or synonym of this preset, else None."""
    c = concept.strip().lower()
    if c in DIGIT_WORDS:
        return "digit", DIGIT_WORDS.index(c)
    if c.isdigit() and len(c) == 1:
        return "digit", int(c)
    if c in COLOR_NAMES:
        return "color", COLOR_NAMES.index(c)
    return None


def concept_names() -> list[str]:
    return [*DIGIT_WORDS, *COLOR_NAMES]


@dataclass(frozen=True)
class Caption:
    text: str
    digit: int
    color: int
    template: str


def fill(template: str, digit: int, color: int) -> str:
    return template.format(color=COLOR_NAMES[color], word=DIGIT_WORDS[digit], num=str(digit))


def captions(templates, digits=range(10), colors=range(len(COLOR_NAMES))) -> list[Caption]:
    """One caption per template, digit and colour, in that order."""
    return [Caption(fill(t, d, k), d, k, t) for t in templates for d in digits for k in colors]


def render(gray: torch.Tensor, color_idx: torch.Tensor) -> torch.Tensor:
    """(N, 1, 8, 8) gray in [-1, 1] and colour ids -> (N, 3, 8, 8) RGB in [-1, 1], dark background."""
    ink = (gray + 1.0) / 2.0                                          # 0 background .. 1 full stroke
    rgb = torch.tensor([COLORS[COLOR_NAMES[int(k)]] for k in color_idx], dtype=gray.dtype)
    return ink * rgb[:, :, None, None] * 2.0 - 1.0


def real_data(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(RGB images (N, 3, 8, 8) in [-1, 1], labels digit * 5 + colour): every base image of the digits
    split in every ink colour."""
    gray, digit = digits(split)
    n, k = len(digit), len(COLOR_NAMES)
    colors = torch.arange(k).repeat(n)
    x = render(gray.repeat_interleave(k, dim=0), colors)
    return x, digit.repeat_interleave(k) * k + colors


def split_label(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combined labels -> (digit, colour)."""
    k = len(COLOR_NAMES)
    return labels // k, labels % k


def vocabulary(extra_templates=()) -> list[str]:
    """Every word of every caption (train and held-out templates), for the word-level tokenizer."""
    words = set()
    for c in captions([*TRAIN_TEMPLATES, *HELDOUT_TEMPLATES, *extra_templates]):
        words.update(re.findall(r"\w+|[^\w\s]", c.text.lower()))
    return sorted(words)


def caption_batch(digit: torch.Tensor, color: torch.Tensor, gen: torch.Generator, templates=TRAIN_TEMPLATES,
                  dropout: float = 0.0) -> list[str]:
    """A random training caption per (digit, colour); '' (the unconditional prompt) with prob. ``dropout``."""
    t = torch.randint(0, len(templates), (len(digit),), generator=gen)
    drop = torch.rand(len(digit), generator=gen) < dropout
    return ["" if bool(drop[i]) else fill(templates[int(t[i])], int(digit[i]), int(color[i]))
            for i in range(len(digit))]


def np_images_to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
