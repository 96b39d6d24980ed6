"""Training of the embedded presets' teacher (EDM loss, EMA kept) and classifier/judge.

Both write safetensors plus a manifest JSON (command, seed, steps, wall time, metrics) next
to the weights, so anyone can reproduce and check the shipped models.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .denoisers import EDMPrecond, TinyUNet, save_denoiser
from .evaluate import DigitsCNN, load_judge, save_judge
from .evaluate.classifier import augment_digits
from .evaluate.metrics import accuracy, judge_outputs
from .evaluate.report import RealReference, sample_quality, save_grid
from .io import write_json
from .losses import edm_loss
from .samplers import sample_teacher
from .utils import command_line, ema_beta, ema_update, pick_device, seed_everything


def train_classifier(preset, out_dir, steps: int = 3000, batch: int = 128, lr: float = 2e-3, seed: int = 0,
                     device=None, progress: bool = True) -> dict:
    device = pick_device(device)
    gen = seed_everything(seed)
    x_tr, y_tr = preset.real_data("train")
    x_te, y_te = preset.real_data("test")
    model = DigitsCNN(in_channels=preset.img_shape[0], num_classes=preset.num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0 = time.time()
    bar = tqdm(range(steps), desc="classifier", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(y_tr), (batch,), generator=gen)
        xb = augment_digits(x_tr[idx], gen).to(device)
        loss = torch.nn.functional.cross_entropy(model(xb), y_tr[idx].to(device), label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    wall = time.time() - t0
    model.eval()
    pred, _, _ = judge_outputs(model, x_te.to(device))
    metrics = {"test_accuracy": accuracy(pred, y_te), "n_test": len(y_te)}
    out_dir = Path(out_dir)
    save_judge(out_dir / "classifier.safetensors", model)
    manifest = {"model": "classifier", "preset": preset.name, "command": command_line(), "seed": seed,
                "steps": steps, "batch": batch, "lr": lr, "wall_seconds": round(wall, 1),
                "device": str(device), "torch": torch.__version__, "metrics": metrics}
    write_json(out_dir / "classifier.json", manifest)
    return manifest


def evaluate_teacher(teacher, judge, preset, n_per_class: int = 500, steps: int = 18, seed: int = 0,
                     progress: bool = True, grid_path=None) -> dict:
    """Teacher Heun samples: per-class accuracy of the judge and FD vs real, next to the real floor."""
    labels = torch.arange(preset.num_classes).repeat_interleave(n_per_class)
    x = sample_teacher(teacher, labels, steps=steps, generator=torch.Generator().manual_seed(seed), progress=progress)
    ref = RealReference.from_preset(preset, judge)
    classes = list(range(preset.num_classes))
    q = sample_quality(judge, x, labels, ref, classes)
    if grid_path is not None:
        per = 10
        pick = torch.cat([torch.nonzero(labels == c).flatten()[:per] for c in classes])
        save_grid(grid_path, x[pick], nrow=per)
    return {
        "sampler": f"{steps}-step Heun ({2 * steps - 1} network evaluations)",
        "samples_per_class": n_per_class,
        "mean_class_accuracy": sum(v["accuracy"] for v in q["per_class"].values()) / len(classes),
        "per_class_accuracy": {preset.class_names[c]: round(v["accuracy"], 4) for c, v in q["per_class"].items()},
        "fd_all": q["fd"],
        "fd_per_class": {preset.class_names[c]: round(v["fd"], 3) for c, v in q["per_class"].items()},
        "real_images": len(ref.labels),
        "fd_real_halves_all": ref.floor(classes),
        "fd_real_halves_per_class": {preset.class_names[c]: round(ref.floor([c]), 3) for c in classes},
    }


def train_teacher(preset, out_dir, steps: int = 8000, batch: int = 128, lr: float = 1e-3, seed: int = 0,
                  channels: int = 32, label_dropout: float = 0.1, ema_halflife_kimg: float = 50.0,
                  device=None, progress: bool = True, eval_per_class: int = 500) -> dict:
    device = pick_device(device)
    gen = seed_everything(seed)
    x_tr, y_tr = preset.real_data("train")
    net = TinyUNet(in_channels=preset.img_shape[0], num_classes=preset.num_classes, channels=channels)
    teacher = EDMPrecond(net, preset.num_classes, preset.img_shape).to(device)
    ema = copy.deepcopy(teacher).eval().requires_grad_(False)
    opt = torch.optim.Adam(teacher.parameters(), lr=lr)
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    beta = ema_beta(batch, ema_halflife_kimg)
    t0 = time.time()
    bar = tqdm(range(steps), desc="teacher (EDM loss)", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(y_tr), (batch,), generator=gen)
        labels = y_tr[idx].clone()
        drop = torch.rand(batch, generator=gen) < label_dropout      # learn the null condition
        labels[drop] = preset.num_classes
        loss = edm_loss(teacher, x_tr[idx].to(device), labels.to(device), generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema_update(ema, teacher, beta if step > warmup else 0.0)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    wall = time.time() - t0
    out_dir = Path(out_dir)
    judge = load_judge(preset, out_dir / "classifier.safetensors", device)
    metrics = evaluate_teacher(ema, judge, preset, n_per_class=eval_per_class, seed=seed, progress=progress,
                               grid_path=out_dir / "teacher_samples.png")
    save_denoiser(out_dir / "teacher.safetensors", ema)
    manifest = {"model": "teacher (EMA)", "preset": preset.name, "command": command_line(), "seed": seed,
                "steps": steps, "batch": batch, "lr": lr, "channels": channels, "label_dropout": label_dropout,
                "ema_halflife_kimg": ema_halflife_kimg, "wall_seconds": round(wall, 1), "device": str(device),
                "parameters": sum(p.numel() for p in ema.parameters()), "torch": torch.__version__,
                "metrics": metrics}
    write_json(out_dir / "teacher.json", manifest)
    return manifest
