"""Unlearning methods beside SFD, on the same tasks, judges and tables (docs/baselines.md).

``esd``, ``sa`` and ``salun`` hold each baseline's loss written against D(x, sigma, c); ``finetune``
is the loop they share; ``common`` the denoising loss, noise levels, the teacher's sampler and the
data-free training pool.
"""
from .common import BASELINES, METHODS, sampler_nfe

__all__ = ["METHODS", "BASELINES", "sampler_nfe"]
