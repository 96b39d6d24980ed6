"""The teacher's reference samples as a distributed job, kept once in the sweep's storage.

Every trial compares its generator with the teacher's own 18-step Heun samples at equal sample
counts (sfd/evaluate/forgetting.py). Those samples are costly (35 teacher passes each: for the
CIFAR-10 space 50,000 of them), so the sweep makes them before any trial, as Ray tasks on the
workers (a GPU each when the cluster has GPUs), and writes them to

    <storage>/reference/teacher-<digest>-<per_class>x<classes>-heun<steps>-s<seed>-c<chunk>.safetensors

keyed by the digest of the teacher's weights and the sampler settings. A later sweep with the
same teacher and settings finds the file and computes nothing. Trials read it through
$SFD_REFERENCE_STORE (set on every node by the sweep's runtime environment): a trial's
``teacher_samples`` fetches the file into its node-local cache instead of sampling.

The driver only plans: it submits tasks and passes their results (object references) on to one
assembling task; it loads no teacher and samples nothing.
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch

from orchestration.storage import Storage
from sfd.evaluate.forgetting import CHUNK, cache_dir, reference_name, teacher_chunk, teacher_fingerprint
from sfd.io import CheckpointError, save_tensors, tensor_shapes
from sfd.presets import get_preset
from sfd.tasks import get_task

SUBDIR = "reference"


def _load(preset_name: str, teacher_path, device: str):
    return get_task(preset_name).load_teacher(teacher_path, device)


def _device(num_gpus: float) -> str:
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def _threads(num_cpus: float) -> None:

    torch.set_num_threads(max(1, math.floor(num_cpus)))


def _key(preset_name: str, teacher_path, per_class: int, steps: int, seed: int) -> str:
    """(runs as a task) the reference file name: teacher digest + sampler settings."""
    teacher = _load(preset_name, teacher_path, "cpu")
    return reference_name(teacher_fingerprint(teacher), get_preset(preset_name).num_classes, per_class, steps, seed)


def _sample(preset_name: str, teacher_path, per_class: int, steps: int, seed: int, bounds, num_cpus: float,
            num_gpus: float):
    """(runs as a task) the rows of ``bounds`` [(a, b), ...] of the reference samples."""

    _threads(num_cpus)
    device = _device(num_gpus)
    teacher = _load(preset_name, teacher_path, device)
    labels = torch.arange(get_preset(preset_name).num_classes).repeat_interleave(per_class)
    with torch.no_grad():
        return torch.cat([teacher_chunk(teacher, labels, a, b, steps, seed, device) for a, b in bounds])


def _assemble(storage_uri: str, name: str, num_classes: int, per_class: int, *parts) -> dict:
    """(runs as a task) concatenate the parts in row order and write the file once to the storage."""



    x = torch.cat(parts)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    if len(x) != len(labels):
        raise RuntimeError(f"reference samples: {len(x)} rows for {len(labels)} labels")
    with tempfile.TemporaryDirectory() as d:
        local = Path(d) / name
        # the metadata says where the file came from (a trial's own cache entry carries none)
        save_tensors(local, {"x": x, "labels": labels}, metadata={"made_by": "orchestration.reference",
                                                                  "tasks": len(parts)})
        Storage.from_uri(storage_uri).upload_file(local, f"{SUBDIR}/{name}")
    return {"rows": len(x), "shape": list(x.shape[1:])}


def local_copy(preset_name: str, name: str, rows: int):
    """An intact file named ``name`` this machine already has -- this node's cache (an earlier run
    or sweep) or the one bundled with the preset (``sfd/weights/<preset>/reference/``) -- else None.
    The name is the key (teacher digest + sampler settings), so any such file holds the same rows."""

    for path in (cache_dir() / name, get_preset(preset_name).weights_dir / SUBDIR / name):
        if not path.is_file():
            continue
        try:                                      # the header only: the driver reads no images
            shapes = tensor_shapes(path)
        except CheckpointError:
            continue                              # damaged: not used (sampled afresh instead)
        if shapes.get("x", (0,))[0] == rows and shapes.get("labels", (0,))[0] == rows:
            return path
    return None


def ensure_reference(storage_uri: str, preset_name: str, teacher_path, per_class: int, *, steps: int = 18,
                     seed: int = 1234, num_cpus: float = 1.0, num_gpus: float = 0.0, max_tasks: int | None = None,
                     log=print) -> dict:
    """Make sure ``<storage>/reference/<key>`` exists, computing it with Ray tasks if not.

    Needs ``ray.init`` done. Returns {"name", "uri", "reused", "tasks", "seconds"}."""
    import ray


    t0 = time.time()
    store = Storage.from_uri(storage_uri)
    opts = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    name = ray.get(ray.remote(**opts)(_key).remote(preset_name, teacher_path, per_class, steps, seed))
    info = {"name": name, "uri": store.child_uri(SUBDIR, name), "store": store.child_uri(SUBDIR)}
    if store.exists(SUBDIR, name):
        log(f"[sweep] teacher reference samples for {preset_name}: reusing {info['uri']}")
        return {**info, "reused": True, "tasks": 0, "seconds": time.time() - t0}
    n = get_preset(preset_name).num_classes * per_class
    have = local_copy(preset_name, name, n)
    if have is not None:                          # the same key on this machine: copied, not sampled
        store.upload_file(have, f"{SUBDIR}/{name}")
        log(f"[sweep] teacher reference samples for {preset_name}: copied {have} -> {info['uri']}")
        return {**info, "reused": True, "tasks": 0, "seconds": time.time() - t0, "copied_from": str(have)}
    chunks = [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
    if max_tasks is None:
        res = ray.cluster_resources()
        slots = res.get("GPU", 0) / num_gpus if num_gpus > 0 else res.get("CPU", 1) / max(num_cpus, 1e-9)
        max_tasks = max(1, int(slots))
    n_tasks = min(len(chunks), max_tasks)
    groups = [chunks[i * len(chunks) // n_tasks:(i + 1) * len(chunks) // n_tasks] for i in range(n_tasks)]
    log(f"[sweep] teacher reference samples for {preset_name}: {per_class} per class ({n} images) as {n_tasks} "
        f"Ray task(s) ({num_cpus:g} CPU, {num_gpus:g} GPU each) -> {info['uri']}")
    sample = ray.remote(**opts)(_sample)
    parts = [sample.remote(preset_name, teacher_path, per_class, steps, seed, g, num_cpus, num_gpus) for g in groups]
    # the parts go straight to the assembling task: the driver never holds the images
    done = ray.get(ray.remote(num_cpus=num_cpus)(_assemble).remote(
        storage_uri, name, get_preset(preset_name).num_classes, per_class, *parts))
    log(f"[sweep] teacher reference samples for {preset_name}: {done['rows']} images in {time.time() - t0:.0f} s")
    return {**info, "reused": False, "tasks": n_tasks, "seconds": time.time() - t0}
