"""Safe, atomic storage: safetensors for tensors, JSON for everything else.

Nothing here executes code from a file: tensors come from safetensors, metadata from JSON.
Every write goes to a temporary file in the same folder and is renamed into place, so an
interrupted run never leaves a half-written checkpoint or table behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .limits import check_arch_metadata


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600; give the file ordinary permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupted JSON file {path}: {e}") from e


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Atomically write a safetensors file; ``metadata`` values are JSON-encoded."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=meta)


def load_tensors(path, device="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) from a safetensors file, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing weight file: {path}")
    raw = read_metadata_raw(path)
    meta = _decode_meta(raw)
    check_arch_metadata(meta, path)       # before any tensor is read or any network built
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"corrupted or unreadable weight file {path}: {e}. "
                              f"Re-create it (see its manifest JSON for the command) or restore it.") from e
    return tensors, meta


def read_metadata_raw(path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"corrupted or unreadable weight file {path}: {e}. "
                              f"Re-create it (see its manifest JSON for the command) or restore it.") from e


def tensor_shapes(path) -> dict[str, tuple]:
    """Name -> shape of every tensor in a safetensors file, from its header only (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"corrupted or unreadable weight file {path}: {e}") from e


def read_metadata(path) -> dict:
    """The JSON-decoded metadata of a safetensors file, without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing weight file: {path}")
    return _decode_meta(read_metadata_raw(path))


def _decode_meta(raw: dict) -> dict:
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return meta


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """Copy ``state`` into ``module``; any missing, unexpected or mis-shaped key is an error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:4]}")
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
