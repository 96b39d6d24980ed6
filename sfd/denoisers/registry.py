"""The two registries the backbone adapters fill: saved architectures and teacher formats."""
from __future__ import annotations

from typing import Callable

# arch name (the 'arch' of a saved denoiser's metadata) -> build(spec) -> Denoiser
ARCHS: dict[str, Callable] = {}
# format name -> (recognise(path) -> bool, load(path, preset, device, **options) -> Denoiser), tried in order
TEACHER_LOADERS: dict[str, tuple[Callable, Callable]] = {}
