"""What a kind of preset knows, chosen once: ``get_task(preset)``.

Three kinds, one module each, one protocol (:class:`~sfd.tasks.base.Task`):

- ``classes`` (:mod:`sfd.tasks.classes`): digits, cifar10, stl10 -- class ids, a classifier judge;
- ``concepts`` (:mod:`sfd.tasks.concepts`): colordigits -- prompts over the preset's vocabulary;
- ``sd`` (:mod:`sfd.tasks.stable_diffusion`): Stable Diffusion -- free-form prompts in latent space.

This is the only place that reads a preset's kind (``Preset.task``); everything else asks the task.
"""
from __future__ import annotations

from ..presets import Preset, get_preset
from .base import Task
from .classes import ClassTask
from .concepts import ConceptTask
from .stable_diffusion import SDTask

TASKS: dict[str, type[Task]] = {"classes": ClassTask, "concepts": ConceptTask, "sd": SDTask}
_cache: dict[str, Task] = {}

__all__ = ["Task", "TASKS", "get_task"]


def get_task(preset: Preset | str) -> Task:
    """The task of ``preset`` (a Preset or its name)."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    task = _cache.get(preset.name)
    if task is None or task.preset is not preset:
        try:
            cls = TASKS[preset.task]
        except KeyError:
            raise ValueError(f"preset '{preset.name}': unknown task kind {preset.task!r} — give one of "
                             f"{', '.join(TASKS)}") from None
        task = _cache[preset.name] = cls(preset)
    return task
