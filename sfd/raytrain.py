"""One SFD run on Ray Train: `sfd forget --num-workers N`, and every sweep trial.

``train_fn_per_worker`` runs :func:`sfd.loop.train_sfd` on each Ray Train worker (Ray Train
sets up the process group: gloo on CPU, NCCL on GPU); metrics and checkpoints go back through
``ray.train.report``. :func:`make_trainer` builds the ``TorchTrainer`` that a sweep trial and a
single run both fit, so the two run exactly the same thing.
"""
from __future__ import annotations

import math
from pathlib import Path

REPORT_KEYS = ("iteration", "kimg", "train_seconds", "wall_seconds", "loss_fake_score", "loss_generator", "ua",
               "override_rate", "forget_prob_mean", "forget_entropy_mean", "remaining_accuracy",
               "remaining_accuracy_teacher", "fd_remaining", "fd_remaining_teacher", "fd_forget_vs_override",
               "fd_override_teacher", "fd_ratio", "override_fd_ratio", "ua_heldout", "override_rate_heldout",
               "prompt_accuracy_remaining", "prompt_accuracy_remaining_teacher", "leakage_accuracy",
               "leakage_accuracy_teacher", "other_attribute_accuracy", "other_attribute_accuracy_heldout")


def train_fn_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from sfd.config import SFDConfig
    from sfd.loop import train_sfd

    threads = int(config.get("threads_per_worker") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    cfg = SFDConfig.from_dict({**config["sfd"], "device": str(ray.train.torch.get_device())})
    rank = ray.train.get_context().get_world_rank()

    def report(metrics: dict, checkpoint_dir) -> None:
        clean = {k: float(metrics[k]) for k in REPORT_KEYS if k in metrics and metrics[k] is not None}
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir and rank == 0 else None
        ray.train.report(clean, checkpoint=ckpt)

    # resume=True: if Ray Train restarts the workers, the run continues from its last checkpoint
    train_sfd(cfg, config["run_dir"], callback=report, resume=bool(config.get("resume", True)),
              progress=bool(config.get("progress", False)) and rank == 0,
              measure_speed=bool(config.get("measure_speed", False)))


def make_trainer(sfd_config: dict, run_dir, *, num_workers: int = 1, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0, storage: str | None = None, name: str = "sfd",
                 callbacks=(), resume: bool = True, progress: bool = False, measure_speed: bool = False):
    """A ``TorchTrainer`` running one SFD run on ``num_workers`` Ray Train workers."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"sfd": sfd_config, "run_dir": str(run_dir), "resume": resume, "progress": progress,
                           "measure_speed": measure_speed,
                           "threads_per_worker": max(1, math.floor(cpus_per_worker))},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage, callbacks=list(callbacks)),
    )


def fit_single_run(cfg, out_dir, *, num_workers: int, address: str | None = None, cpus_per_worker: float = 1.0,
                   gpus_per_worker: float = 0.0, resume: bool = False, progress: bool = True) -> dict:
    """`sfd forget --num-workers N`: the run on Ray Train; returns its metrics.json."""
    import json

    import ray

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    ray.init(address=address, include_dashboard=False, log_to_driver=True, ignore_reinit_error=True)
    try:
        trainer = make_trainer(cfg.to_dict(), out_dir, num_workers=num_workers, cpus_per_worker=cpus_per_worker,
                               gpus_per_worker=gpus_per_worker, storage=str(out_dir / "ray"), name="train",
                               resume=resume, progress=progress, measure_speed=True)
        result = trainer.fit()
        if result.error:
            raise result.error
    finally:
        ray.shutdown()
    return json.loads((out_dir / "metrics.json").read_text())
