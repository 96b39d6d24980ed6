"""Evaluation: judges (classifier + feature space), metrics, reports and plots."""
from __future__ import annotations

from pathlib import Path

from ..io import CheckpointError, load_state_strict, load_tensors, save_tensors
from .classifier import DigitsCNN
from .metrics import accuracy, frechet_distance, judge_outputs, per_class_accuracy, unlearning_accuracy

__all__ = ["DigitsCNN", "load_judge", "save_judge", "accuracy", "frechet_distance", "judge_outputs",
           "per_class_accuracy", "unlearning_accuracy"]


def save_judge(path, model: DigitsCNN, extra: dict | None = None) -> None:
    save_tensors(path, model.state_dict(), {"judge": {"arch": "digits-cnn", "config": model.config}, **(extra or {})})


def load_judge(preset, path=None, device="cpu"):
    """The preset's classifier/feature network: bundled for embedded presets, else ``path``."""
    if path is None:
        if not preset.embedded:
            raise CheckpointError(f"preset '{preset.name}' has no bundled classifier; pass --classifier PATH")
        path = preset.weights_dir / "classifier.safetensors"
    tensors, meta = load_tensors(Path(path), device)
    spec = meta.get("judge")
    if not spec or spec.get("arch") != "digits-cnn":
        raise CheckpointError(f"{path} is not an sfd classifier file (metadata 'judge' missing or unknown)")
    model = DigitsCNN(**spec["config"])
    load_state_strict(model, tensors, path)
    return model.to(device).eval().requires_grad_(False)
