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
import struct
import tempfile
import time
from pathlib import Path

import torch

from .io import CheckpointError, atomic_path, load_state_strict, load_tensors, read_json, save_tensors, write_json


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
                    info: dict, keep: int = 2, run_id: str | None = None) -> Path:
    """Write ``ckpt-<iteration>`` under a temporary name, verify it, rename it into place, point
    ``latest`` at it, and only then remove older checkpoints *of this run* (state.json's run_id;
    a checkpoint of another run or without a run id is never deleted) beyond the newest ``keep``."""
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
        write_json(tmp / "state.json", {**info, "iteration": iteration, "optimizers": opt_meta,
                                        **({"run_id": run_id} if run_id else {})})
        problem = checkpoint_problem(tmp)
        if problem:
            raise CheckpointError(f"checkpoint written to {tmp} does not verify: {problem}")
        if final.exists():          # e.g. a truncated one from a killed run: kept aside, never deleted
            os.replace(final, ckpt_root / f".broken-{final.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with atomic_path(ckpt_root / "latest") as p:
        p.write_text(final.name + "\n")
    if run_id:
        own = sorted(d for d in ckpt_root.glob("ckpt-*") if d.is_dir() and d != final and _run_id_of(d) == run_id)
        for d in own[: max(0, len(own) - (keep - 1))]:
            shutil.rmtree(d, ignore_errors=True)
    return final


def _run_id_of(ckpt: Path) -> str | None:
    try:
        return json.loads((ckpt / "state.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _iteration_of(name: str) -> int | None:
    if not name.startswith("ckpt-"):
        return None
    tail = name[len("ckpt-"):]
    return int(tail) if tail.isdigit() else None


def checkpoint_problem(path) -> str | None:
    """Why the checkpoint folder ``path`` is not intact (None if it is): state.json must parse with
    an iteration, and state.safetensors' header must parse and cover the whole file."""
    path = Path(path)
    st, js = path / "state.safetensors", path / "state.json"
    if not st.is_file():
        return f"{st.name} is missing"
    if not js.is_file():
        return f"{js.name} is missing"
    try:
        info = json.loads(js.read_text())
    except (OSError, ValueError) as e:
        return f"{js} is not valid JSON ({e})"
    if not isinstance(info, dict) or not isinstance(info.get("iteration"), int):
        return f"{js} has no iteration"
    problem = safetensors_problem(st)
    if problem:
        return problem
    return None


def safetensors_problem(path) -> str | None:
    """Check a safetensors file's header and length without reading its tensors."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path} is truncated ({size} bytes)"
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, 100 * 2**20):
                return f"{path} is truncated or not a safetensors file (header of {n} bytes, file {size})"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"{path} has an unreadable header ({e})"
    if not isinstance(header, dict):
        return f"{path} has an unreadable header"
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            end = max(end, int(v["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            return f"{path}: tensor {k!r} has no valid data offsets"
    if 8 + n + end != size:
        return f"{path} is truncated or padded: header says {8 + n + end} bytes, the file has {size}"
    return None


def resolve_checkpoint(run_dir) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from and notes on what was skipped.

    ``latest`` if it names an intact checkpoint inside ``run_dir/checkpoints``; otherwise the newest
    intact ``ckpt-*`` (by iteration). None if there is none at all; a CheckpointError naming the
    files if there are checkpoints (or a ``latest``) but none is intact."""
    ckpt_root = Path(run_dir) / "checkpoints"
    notes: list[str] = []
    if not ckpt_root.is_dir():
        return None, notes
    ptr = ckpt_root / "latest"
    if ptr.exists():
        try:
            name = ptr.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            name, why = None, f"unreadable ({e})"
        else:
            why = None
            if _iteration_of(name) is None or "/" in name or "\\" in name:
                why = f"does not name a checkpoint of this run ({name[:80]!r})"
                name = None
        if name is not None:
            problem = checkpoint_problem(ckpt_root / name)
            if problem is None:
                return ckpt_root / name, notes
            why = f"names {name}, which is not intact: {problem}"
        notes.append(f"{ptr} {why}")
    else:
        notes.append(f"{ptr} is missing")
    candidates = sorted((d for d in ckpt_root.iterdir() if d.is_dir() and _iteration_of(d.name) is not None),
                        key=lambda d: _iteration_of(d.name), reverse=True)
    bad = []
    for d in candidates:
        problem = checkpoint_problem(d)
        if problem is None:
            notes.append(f"using the newest intact checkpoint, {d.name}")
            return d, notes
        bad.append(problem)
    if candidates or ptr.exists():
        detail = "; ".join(notes + bad)
        raise CheckpointError(f"no intact checkpoint in {ckpt_root}: {detail} — restore a checkpoint folder, or "
                              f"start over with --overwrite (the run is moved aside, not deleted)")
    return None, notes


def latest_checkpoint(run_dir) -> Path | None:
    """The checkpoint ``--resume`` would use (see :func:`resolve_checkpoint`)."""
    return resolve_checkpoint(run_dir)[0]


def remove_stray_temporaries(run_dir) -> list[Path]:
    """Remove ``checkpoints/.ckpt-*`` folders left by a write that was killed (never a checkpoint)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    removed = []
    if ckpt_root.is_dir():
        for d in ckpt_root.glob(".ckpt-*"):
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
        for f in ckpt_root.glob(".latest.*.tmp"):
            if f.is_file():
                f.unlink()
                removed.append(f)
    return removed


def load_checkpoint(path, modules: dict, optimizers: dict, rng: torch.Generator, device="cpu") -> dict:
    """Restore modules, optimisers and RNG in place; return the JSON info."""
    path = Path(path)
    tensors, _ = load_tensors(path / "state.safetensors", device)
    info = read_json(path / "state.json")
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
