"""SFD run checkpoints: one folder per checkpoint, safetensors + a small JSON, atomic.

``ckpt-<iteration>/state.safetensors`` holds generator, EMA, fake score, both optimiser
states and the RNG state; ``state.json`` the step, kimg, resolved config and history. A
folder is written under a temporary name and renamed into place, and ``latest`` (a one-line
file, replaced atomically) names the newest complete one, so an interrupted write never
leaves a checkpoint that ``--resume`` would pick up.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .io import CheckpointError, atomic_path, load_state_strict, load_tensors, save_tensors, write_json


def _flatten_optimizer(prefix: str, opt: torch.optim.Optimizer, tensors: dict) -> dict:
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{prefix}/state/{idx}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return {"param_groups": sd["param_groups"]}


def _unflatten_optimizer(prefix: str, tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "/state/"):
            _, _, idx, name = key.split("/", 3)
            state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir, iteration: int, modules: dict, optimizers: dict, rng: torch.Generator,
                    info: dict, keep: int = 2) -> Path:
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            tensors[f"{name}/{k}"] = v
    opt_meta = {name: _flatten_optimizer(f"opt_{name}", o, tensors) for name, o in optimizers.items()}
    tensors["rng_state"] = rng.get_state()
    final = ckpt_root / f"ckpt-{iteration:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=ckpt_root))
    try:
        save_tensors(tmp / "state.safetensors", tensors)
        write_json(tmp / "state.json", {**info, "iteration": iteration, "optimizers": opt_meta})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with atomic_path(ckpt_root / "latest") as p:
        p.write_text(final.name + "\n")
    old = sorted(d for d in ckpt_root.glob("ckpt-*") if d.is_dir() and d != final)
    for d in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(d, ignore_errors=True)
    return final


def latest_checkpoint(run_dir) -> Path | None:
    ptr = Path(run_dir) / "checkpoints" / "latest"
    if not ptr.is_file():
        return None
    path = ptr.parent / ptr.read_text().strip()
    if not (path / "state.safetensors").is_file() or not (path / "state.json").is_file():
        raise CheckpointError(f"{ptr} names {path}, which is incomplete; remove it or restore the folder")
    return path


def load_checkpoint(path, modules: dict, optimizers: dict, rng: torch.Generator, device="cpu") -> dict:
    """Restore modules, optimisers and RNG in place; return the JSON info."""
    path = Path(path)
    tensors, _ = load_tensors(path / "state.safetensors", device)
    info = json.loads((path / "state.json").read_text())
    for name, m in modules.items():
        pre = f"{name}/"
        state = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
        if not state:
            raise CheckpointError(f"{path} holds no '{name}' weights")
        load_state_strict(m, state, f"{path} [{name}]")
    for name, o in optimizers.items():
        o.load_state_dict(_unflatten_optimizer(f"opt_{name}", tensors, info["optimizers"][name]))
    rng.set_state(tensors["rng_state"].cpu())
    return info
