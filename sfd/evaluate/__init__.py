"""Evaluation: judges (classifier + feature space), metrics, reports and plots."""
from __future__ import annotations

from pathlib import Path

from ..io import CheckpointError, load_state_strict, load_tensors, save_tensors
from .classifier import DigitsCNN
from .resnet import load_real_judge
from .text_concepts import load_colordigits_judge
from .metrics import accuracy, frechet_distance, judge_outputs, per_class_accuracy, unlearning_accuracy

__all__ = ["DigitsCNN", "load_judge", "save_judge", "accuracy", "frechet_distance", "judge_outputs",
           "per_class_accuracy", "unlearning_accuracy"]


def save_judge(path, model: DigitsCNN, extra: dict | None = None) -> None:
    save_tensors(path, model.state_dict(), {"judge": {"arch": "digits-cnn", "config": model.config}, **(extra or {})})


def load_judge(preset, path=None, device="cpu", fid_weights=None):
    """The preset's judge: the bundled CNN for embedded presets; for real datasets a ResNet-34
    classifier file (UA) plus the FID Inception weights (features)."""
    if path is None:
        if not preset.embedded:
            raise CheckpointError(f"preset '{preset.name}' has no bundled classifier; pass --classifier PATH "
                                  f"(a ResNet-34 state dict in torchvision's layout) and --fid-weights PATH")
        path = preset.weights_dir / "classifier.safetensors"
    if Path(path).suffix != ".safetensors" or fid_weights is not None:
        if fid_weights is None:
            raise CheckpointError(f"classifier {path} is not an sfd judge file; for a ResNet-34 classifier also "
                                  f"pass --fid-weights (the FID Inception weights) for the feature space")
        return load_real_judge(path, fid_weights, device=device)
    tensors, meta = load_tensors(Path(path), device)
    spec = meta.get("judge")
    if isinstance(spec, dict) and spec.get("arch") == "colordigits-cnn":
        return load_colordigits_judge(path, device)
    if not spec or spec.get("arch") != "digits-cnn":
        raise CheckpointError(f"{path} is not an sfd classifier file (metadata 'judge' missing or unknown)")
    model = DigitsCNN(**spec["config"])
    load_state_strict(model, tensors, path)
    return model.to(device).eval().requires_grad_(False)
