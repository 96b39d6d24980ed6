"""Read NVIDIA EDM ``.pkl`` network snapshots without executing anything they contain.

NVIDIA's pickles store every network object as a call
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` whose ``meta["module_src"]``
is Python source that the official loader ``exec``s -- so opening such a file the official
way runs whatever code it carries. Here:

* :class:`RestrictedUnpickler` resolves globals from an explicit allow-list only (the ones
  NVIDIA's writer produces, REFERENCE-FORMATS.md section 2); any other global -- ``os.system``,
  ``builtins.open``, ``builtins.eval``, a class from the file's own code -- is refused with a
  :class:`CheckpointError` naming it, before it could be called.
* ``_reconstruct_persistent_obj`` is mapped to a function that returns ``meta`` as plain
  data; ``module_src`` is kept as a string and never compiled.
* ``torch.storage._load_from_bytes`` (which in torch itself calls ``torch.load`` with
  ``weights_only=False``) is replaced by a ``weights_only=True`` load of the same bytes.
* ``torch.nn.ModuleDict`` objects are rebuilt as inert records of their state.

The network is then rebuilt from the recorded constructor arguments (``init_kwargs``) with
this project's own classes (``edm_networks.py``) and every parameter and buffer is copied by
module path, strictly: a missing or unexpected tensor is an error naming it.
"""
from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path

import numpy as np
import torch

from ..io import CheckpointError, load_state_strict
from .base import Denoiser
from .edm_networks import build_edm_denoiser

PERSISTENT_KEYS = frozenset({"type", "version", "module_src", "class_name", "state"})


class ModuleRecord:
    """Inert stand-in for a pickled plain torch module (``ModuleDict``): just its state."""

    def __init__(self):
        self.state: dict = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise CheckpointError(f"a pickled ModuleDict carries a {type(state).__name__} state, not a dict")
        self.state = state


def _persistent_meta(meta):
    """Replacement for ``torch_utils.persistence._reconstruct_persistent_obj``: data only."""
    if not isinstance(meta, dict) or not PERSISTENT_KEYS <= set(meta):
        raise CheckpointError("a persistent object in the pickle has malformed metadata "
                              f"(keys {sorted(meta) if isinstance(meta, dict) else type(meta).__name__})")
    if meta["type"] != "class":
        raise CheckpointError(f"unsupported persistent object type {meta['type']!r} (only 'class')")
    return meta


def _storage_from_bytes(data: bytes):
    """``torch.storage._load_from_bytes`` made safe: the nested torch file may hold storages only."""
    if not isinstance(data, (bytes, bytearray)):
        raise CheckpointError(f"tensor storage record is a {type(data).__name__}, not bytes")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"a tensor storage inside the pickle could not be read safely: {e}") from e


def _numpy_scalar(dtype, data=None):
    """``numpy.core.multiarray.scalar`` limited to plain numeric types (no object payloads)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, bytearray)):
        raise CheckpointError(f"refused numpy scalar of dtype {dtype!r} (only numeric scalars are allowed)")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


def _numpy_dtype(spec, align=False, copy=False):
    if not isinstance(spec, str):
        raise CheckpointError(f"refused numpy dtype spec {spec!r}")
    dt = np.dtype(spec, align, copy)
    if dt.hasobject:
        raise CheckpointError(f"refused numpy object dtype {spec!r}")
    return dt


# (module, name) -> the object actually handed to the unpickler. Nothing else resolves.
ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.nn.modules.container", "ModuleDict"): ModuleRecord,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_meta,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` only hands out :data:`ALLOWED_GLOBALS`."""

    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"refused to load global '{module}.{name}' from the pickle: it is not on the allow-list of "
                f"an NVIDIA EDM network snapshot, and resolving it could run code. The file is either not "
                f"an EDM snapshot or has been tampered with; if you trust it, convert it once with NVIDIA's "
                f"own code in a sandbox to a state dict and load that instead.") from None

    def persistent_load(self, pid):
        raise CheckpointError(f"refused persistent id {pid!r}: EDM pickles do not use persistent ids")


def read_edm_pickle(path) -> dict:
    """The top-level dict of an EDM snapshot, networks as metadata dicts (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing EDM pickle: {path}")
    with open(path, "rb") as f:
        try:
            data = RestrictedUnpickler(f).load()
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        except Exception as e:  # truncated file, bad opcode, ...
            raise CheckpointError(f"{path} is not a readable pickle: {type(e).__name__}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}; an EDM snapshot is a dict with key 'ema'")
    return data


def is_persistent_meta(obj) -> bool:
    return isinstance(obj, dict) and PERSISTENT_KEYS <= set(obj)


def collect_tensors(node, prefix: str = "", out: dict | None = None, source="pickle") -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of a reconstructed module tree, keyed by module path."""
    out = {} if out is None else out
    if is_persistent_meta(node):
        state = node["state"]
    elif isinstance(node, ModuleRecord):
        state = node.state
    else:
        raise CheckpointError(f"{source}: module '{prefix.rstrip('.') or '<root>'}' is a {type(node).__name__}, "
                              f"not a network object")
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: module '{prefix.rstrip('.')}' has no state dict")
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for kind in ("_parameters", "_buffers"):
        for name, t in (state.get(kind) or {}).items():
            if t is None or (kind == "_buffers" and name in skip):
                continue
            if not torch.is_tensor(t):
                raise CheckpointError(f"{source}: {prefix}{name} is a {type(t).__name__}, not a tensor")
            out[prefix + name] = t.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            collect_tensors(child, f"{prefix}{name}.", out, source)
    return out


def load_edm_pickle(path, preset=None, device="cpu", *, key: str = "ema", **_ignored) -> Denoiser:
    """A project denoiser from an NVIDIA EDM snapshot (``key`` 'ema' by default)."""
    data = read_edm_pickle(path)
    if key not in data:
        raise CheckpointError(f"{path} has no {key!r} entry (keys: {sorted(map(str, data))}); pass key=...")
    meta = data[key]
    if not is_persistent_meta(meta):
        raise CheckpointError(f"{path} [{key}] is a {type(meta).__name__}, not an EDM network object")
    state = meta["state"]
    class_name = meta["class_name"]
    args = state.get("_init_args") or ()
    kwargs = state.get("_init_kwargs")
    if args:
        raise CheckpointError(f"{path} [{key}]: {class_name} was built with positional arguments {args!r}; "
                              f"only keyword construction (as in NVIDIA's training code) is supported")
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{path} [{key}]: {class_name} records no constructor arguments (init_kwargs)")
    denoiser = build_edm_denoiser(class_name, kwargs, uninitialised=True)   # every tensor is copied below

    # The backbone the pickle holds must be the one the arguments name.
    model_meta = (state.get("_modules") or {}).get("model")
    expected = type(denoiser.model).__name__
    if is_persistent_meta(model_meta) and model_meta["class_name"] != expected:
        raise CheckpointError(f"{path} [{key}]: its backbone is {model_meta['class_name']!r} but the recorded "
                              f"arguments build {expected!r}")
    tensors = collect_tensors(meta, source=f"{path} [{key}]")
    load_state_strict(denoiser, tensors, f"{path} [{key}]")
    if preset is not None and tuple(denoiser.img_shape) != tuple(preset.img_shape):
        raise CheckpointError(f"{path}: a {denoiser.img_shape} network does not fit preset '{preset.name}' "
                              f"{tuple(preset.img_shape)}")
    return denoiser.to(device).eval()
