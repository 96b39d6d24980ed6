"""The UA judge the paper uses, trained here: ResNet-34 (torchvision layout, our own code) on the
fetched training set, evaluated on the official test split, written with a manifest.

Inputs are the preset's images in [-1, 1] (x / 127.5 - 1), augmented with a 4-pixel reflect-padded
random crop and a horizontal flip at native resolution, then resized to 224x224 inside the network
(as the reference judge: an ImageNet ResNet-34 fine-tuned at 224). The starting point is
torchvision's ImageNet ResNet-34 (``resnet34-b627a593.pth``, fetched by ``sfd fetch``) when present,
else random initialisation. SGD with Nesterov momentum, cosine learning rate, bf16 autocast on CUDA.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .datasets import archive_path, load_cifar10, load_stl10
from .evaluate.inception import complete_batchnorm_counters, read_state_dict
from .evaluate.resnet import ResNet34
from .io import atomic_path, load_state_strict, write_json
from .utils import command_line, pick_device, seed_everything

DEFAULTS = {"steps": 4000, "batch": 128, "lr": 0.01}    # ~10 epochs of CIFAR-10's 50,000 images


def _uint8_split(preset, split, home=None):
    path = archive_path(preset.name, home)
    if not path.is_file():
        preset.real_data(split)              # raises the "run sfd fetch" error
    return load_cifar10(path, split) if preset.name == "cifar10" else load_stl10(path, split)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    pad = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx = torch.randint(0, 9, (n,), generator=gen)
    dy = torch.randint(0, 9, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    out[flip] = out[flip].flip(-1)
    return out


def _to_float(x_uint8: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(x_uint8).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def build_model(num_classes: int, init=None) -> tuple[ResNet34, str]:
    """ResNet-34 with a fresh ``fc``; body from an ImageNet torchvision state dict when ``init`` is given."""
    if init is None:
        return ResNet34(num_classes=num_classes), "random"
    state = read_state_dict(init)
    width = int(state["fc.weight"].shape[0]) if "fc.weight" in state else 1000
    net = ResNet34(num_classes=width)
    load_state_strict(net, complete_batchnorm_counters(net, state), Path(init))
    net.fc = torch.nn.Linear(512, num_classes)
    net.config["num_classes"] = num_classes
    return net, str(init)


@torch.no_grad()
def evaluate(model, x: np.ndarray, y: np.ndarray, device, batch: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(_to_float(x[i:i + batch], device))
        correct += int((logits.argmax(1).cpu() == torch.from_numpy(y[i:i + batch])).sum())
    return correct / len(y)


def train_resnet_judge(preset, out_path, steps: int = 4000, batch: int = 128, lr: float = 0.01, seed: int = 0,
                       device=None, init=None, progress: bool = True, home=None) -> dict:
    device = pick_device(device)
    gen = seed_everything(seed)
    x_tr, y_tr = _uint8_split(preset, "train", home)
    x_te, y_te = _uint8_split(preset, "test", home)
    model, init_desc = build_model(preset.num_classes, init)
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    y_tr_t = torch.from_numpy(y_tr)
    t0 = time.time()
    bar = tqdm(range(steps), desc=f"resnet34 {preset.name}", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(y_tr), (batch,), generator=gen)
        xb = _augment(_to_float(x_tr[idx.numpy()], "cpu"), gen).to(device)
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(xb), y_tr_t[idx].to(device), label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    wall = time.time() - t0
    acc = evaluate(model, x_te, y_te, device)
    model = model.cpu().eval()
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"arch": "resnet34-torchvision-layout", "num_classes": str(preset.num_classes),
                            "input": "[-1, 1], resized to 224x224"})
    manifest = {"model": "ResNet-34 UA judge (torchvision layout)", "preset": preset.name,
                "command": command_line(), "seed": seed, "steps": steps, "batch": batch, "lr": lr,
                "optimizer": "SGD nesterov 0.9, wd 5e-4, one-cycle", "init": init_desc,
                "input_size": 224, "wall_seconds": round(wall, 1), "device": str(device),
                "torch": torch.__version__,
                "metrics": {"test_accuracy": acc, "n_test": int(len(y_te)), "n_train": int(len(y_tr))}}
    write_json(out_path.with_suffix(".json"), manifest)
    return manifest
