"""What a trial needs on a multi-node cluster, on top of the trainer `sfd.raytrain.make_trainer` builds:

- **placement** (`--placement pack|spread`): the trial's N Ray Train workers are packed onto as few
  nodes as possible (Ray's PACK, the default) or spread over different nodes (SPREAD);
- **outputs in storage**: with a remote `--storage`, each worker runs in a node-local run folder
  ($SFD_SCRATCH, else the system's temporary folder) and, when the trial ends, rank 0 uploads that
  folder (metrics, history, plots, generator, checkpoints) to ``<storage>/trials/<target>/<trial>/``;
  every rank records which node it ran on in ``<storage>/trials/<target>/<trial>/workers/rank-<r>.json``.

The wrapper runs the trainer's own per-worker function unchanged, so a trial still runs exactly
what `sfd forget --num-workers N` runs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from pathlib import Path

from orchestration.reference import SUBDIR, ensure_reference
from orchestration.storage import Storage, is_remote, scratch_root
from sfd.tasks import get_task

PLACEMENTS = {"pack": "PACK", "spread": "SPREAD"}
_KEY = "_sfd_cluster"


def worker_fn(config: dict) -> None:
    """Ray Train per-worker function: the wrapped trainer's own, in a node-local folder, then upload."""
    import ray.train

    extra = config[_KEY]
    inner = {k: v for k, v in config.items() if k != _KEY}
    run_with_outputs(extra["train_fn"], inner, rank=ray.train.get_context().get_world_rank(),
                     outputs_uri=extra.get("outputs_uri"), scratch_rel=extra["scratch_rel"])


def run_with_outputs(fn, config: dict, *, rank: int, outputs_uri: str | None, scratch_rel: str) -> None:
    """``fn(config)``; with ``outputs_uri``, in a node-local run folder whose contents rank 0 uploads
    there when ``fn`` ends (also after a failure: what there is, for a look), every rank recording its
    node in ``workers/rank-<r>.json``."""
    import ray

    store = None
    if outputs_uri:
        store = Storage.from_uri(outputs_uri)
        config = {**config, "run_dir": str(scratch_root() / scratch_rel)}
        Path(config["run_dir"]).mkdir(parents=True, exist_ok=True)
        where = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
                 "run_dir": config["run_dir"]}
        store.write_bytes(f"workers/rank-{rank}.json", json.dumps(where).encode())
    try:
        fn(config)
    finally:
        if store is not None and rank == 0 and Path(config["run_dir"]).is_dir():
            store.upload_dir(config["run_dir"], "")


def for_cluster(trainer, *, placement: str = "pack", outputs_uri: str | None = None, scratch_rel: str = ""):
    """The same TorchTrainer with ``placement`` and, when ``outputs_uri`` is given, the upload of the
    trial's outputs to it."""
    from ray.train.torch import TorchTrainer

    if placement not in PLACEMENTS:
        raise ValueError(f"--placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    scaling = dataclasses.replace(trainer.scaling_config, placement_strategy=PLACEMENTS[placement])
    if not outputs_uri:
        return TorchTrainer(trainer.train_loop_per_worker, train_loop_config=trainer.train_loop_config,
                            scaling_config=scaling, torch_config=trainer.backend_config, run_config=trainer.run_config)
    config = {**(trainer.train_loop_config or {}),
              _KEY: {"train_fn": trainer.train_loop_per_worker, "outputs_uri": outputs_uri, "scratch_rel": scratch_rel}}
    return TorchTrainer(worker_fn, train_loop_config=config, scaling_config=scaling,
                        torch_config=trainer.backend_config, run_config=trainer.run_config)


def trial_storage_rel(target_slug: str, trial_id: str) -> str:
    return f"trials/{target_slug}/{trial_id}"


def fetch_trial_outputs(storage_uri: str, out_dir, target_slug: str, trial_id: str) -> Path:
    """The trial's uploaded folder from the storage into the driver's OUT/trials/<target>/<trial>."""
    dest = Path(out_dir) / "trials" / target_slug / trial_id
    Storage.from_uri(storage_uri).download_dir(trial_storage_rel(target_slug, trial_id), dest)
    return dest


def storage_callback(base_cls, storage_uri: str):
    """A subclass of the sweep's MLflow Tune callback that first fetches a finished trial's outputs
    from the storage (they were written on another node), so its artifacts and checkpoints are logged;
    the class itself for a local storage (the run folders are where the callback looks)."""
    if not is_remote(storage_uri):
        return base_cls

    class StorageTuneCallback(base_cls):
        def _end(self, trial, *args, **kwargs):        # whatever the base's signature (status, error, ...)
            run_dir = fetch_trial_outputs(storage_uri, self.out_dir, trial.config["target_slug"], trial.trial_id)
            run_id = self.tracker.trial_runs.get(trial.trial_id)
            if run_id is not None:
                for ckpt in sorted((run_dir / "checkpoints").glob("ckpt-*")):
                    state = ckpt / "state.json"
                    step = int(json.loads(state.read_text()).get("iteration", 0)) if state.is_file() else 0
                    self.tracker.log_checkpoint(run_id, trial.trial_id, ckpt, step, {})
            super()._end(trial, *args, **kwargs)

    return StorageTuneCallback


# -- the sweep driver's hooks (orchestration/sweep.py calls each once) ---------------------------------
# Ray Train settings of the sweep's trials, unless the user set them: its controller polls the
# workers (and forwards their reports to Tune) every 2 s by default, a wait every trial pays at its
# start and end; on a machine of its own (no --address: no spot nodes to be reclaimed) the
# preemption watcher is one more actor process per trial with nothing to watch.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def runtime_env(storage_uri: str, local: bool = False) -> dict:
    """Ray runtime environment of the sweep: every node's trials read the reference samples from the
    storage ($SFD_REFERENCE_STORE); the driver (later re-evaluations) too. Ray Train's settings above
    go to every worker (a value already in the environment wins)."""

    os.environ["SFD_REFERENCE_STORE"] = Storage.from_uri(storage_uri).child_uri(SUBDIR)
    env = {k: os.environ.get(k, v) for k, v in {**TRAIN_ENV, **(LOCAL_TRAIN_ENV if local else {})}.items()}
    return {"env_vars": {"SFD_REFERENCE_STORE": os.environ["SFD_REFERENCE_STORE"], **env}}


def make_references(a, spaces, overrides, storage_uri: str, log=print) -> None:
    """Each preset's reference samples in the storage (Ray tasks, or reused); logs the driver's CPU time."""

    for name, space in spaces.items():
        if not get_task(name).shared_reference:   # each target's evaluator samples its own prompts
            continue
        base = space.baseline()
        cpu0 = time.process_time()
        ensure_reference(storage_uri, name, overrides.get("teacher"),
                         max(base.eval_remain_per_class, base.eval_forget_samples), num_cpus=a.reference_cpus,
                         num_gpus=a.gpus_per_worker if a.reference_gpus is None else a.reference_gpus, log=log)
        log(f"[sweep] reference stage for {name}: driver CPU {time.process_time() - cpu0:.2f} s")


def trial_config(a, storage_uri: str, out: Path) -> dict:
    """What run_trial needs besides the sweep's own settings: placement, where outputs go."""
    return {"placement": a.placement, "outputs_uri": storage_uri if is_remote(storage_uri) else None,
            "sweep_id": Path(out).name}


def after_fit(a, grid, targets, storage_uri: str, out: Path) -> None:
    """With a remote storage, every trial's outputs into OUT/trials (the summary reads them there)."""
    if not is_remote(storage_uri):
        return
    slugs = {t.name: t.slug for t in targets}
    for r in grid:
        target = (r.config or {}).get("target")
        if target in slugs:
            fetch_trial_outputs(storage_uri, out, slugs[target], (r.metrics or {}).get("trial_id") or Path(r.path).name)


def publish_tables(a, storage_uri: str, out: Path) -> None:
    """With --storage given, the results tables as Parquet under <storage>/results/."""
    if not a.storage:
        return
    import pandas as pd

    store = Storage.from_uri(storage_uri)
    for table in ("trials.parquet", "summary.parquet"):
        store.write_parquet(pd.read_parquet(Path(out) / table), f"results/{table}")
