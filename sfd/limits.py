"""Limits on architecture metadata, checked before a network is built from it.

sfd rebuilds networks from the JSON in a safetensors header (``denoiser`` / ``judge``). A file
claiming, say, ``channels: 100000`` would allocate tens of gigabytes before the weights are
compared; these checks reject it first, naming the key, the value and the limit.
"""
from __future__ import annotations

from .errors import CheckpointError

MAX_WIDTH = 4096            # any width-like setting (channels, width, *_dim, ch, block_out_channels, ...)
MAX_INT = 1_000_000         # any other integer in an architecture config
MAX_IMG_SIDE = 4096
MAX_IMG_CHANNELS = 16
MAX_LIST = 1024             # entries of a list of numbers (lists of strings: no limit of their own)
WIDTH_WORDS = ("channel", "width", "dim", "ch")


def _is_width(key: str) -> bool:
    k = key.lower()
    return k == "ch" or k.startswith("ch_") or any(w in k for w in WIDTH_WORDS[:3])


def _walk(obj, key: str, where: str, path, width: bool):
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, int):
        lim = MAX_WIDTH if width else MAX_INT
        if not -1 <= obj <= lim:
            raise _err(path, f"{where}{key} = {obj}", f"the limit is {lim}" + (" for a width" if width else ""))
        return
    if isinstance(obj, float):          # e.g. EDM's sigma_max = inf is legitimate; sizes are ints
        return
    if isinstance(obj, (list, tuple)):
        # a list of sizes is short (block widths, layers per block); a list of strings (a text generator's prompt
        # table) allocates nothing when built and is bounded by the header's own size
        if len(obj) > MAX_LIST and not all(isinstance(v, str) for v in obj):
            raise _err(path, f"{where}{key} has {len(obj)} entries", f"the limit is {MAX_LIST}")
        for i, v in enumerate(obj):
            _walk(v, f"{key}[{i}]", where, path, width)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _walk(v, str(k), f"{where}{key}." if key else where, path, width or _is_width(str(k)))
        return
    raise _err(path, f"{where}{key} is a {type(obj).__name__}", "expected numbers, strings, lists or mappings")


def _err(path, what, why):
    return CheckpointError(f"{path}: architecture metadata {what} is out of bounds ({why}) — the file is corrupted "
                           f"or not an sfd file; re-create it or use the original")


def check_arch_metadata(meta: dict, path) -> None:
    """Reject oversized or malformed ``denoiser`` / ``judge`` architecture metadata before building."""
    for top in ("denoiser", "judge"):
        spec = meta.get(top)
        if spec is None:
            continue
        if not isinstance(spec, dict):
            raise _err(path, f"'{top}' is a {type(spec).__name__}", "expected a mapping")
        _walk(spec.get("config", {}), "config", f"{top}.", path, False)
        shape = spec.get("img_shape")
        if shape is not None:
            ok = (isinstance(shape, (list, tuple)) and len(shape) == 3
                  and all(isinstance(v, int) and not isinstance(v, bool) for v in shape)
                  and 1 <= shape[0] <= MAX_IMG_CHANNELS and all(1 <= v <= MAX_IMG_SIDE for v in shape[1:]))
            if not ok:
                raise _err(path, f"{top}.img_shape = {shape!r}",
                           f"expected [C<={MAX_IMG_CHANNELS}, H<={MAX_IMG_SIDE}, W<={MAX_IMG_SIDE}]")
        for k, v in spec.items():
            if k not in ("config", "img_shape"):
                _walk(v, str(k), f"{top}.", path, False)
