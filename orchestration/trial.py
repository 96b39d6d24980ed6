"""A sweep trial: Ray Train's TorchTrainer running `sfd.loop.train_sfd` on N workers.

`run_trial` is the Tune trainable (the trial's driver); `train_fn_per_worker` runs on each
Ray Train worker. Ray Train sets up the process group (gloo on CPU, NCCL on GPU) and the loop
sums gradients over it; metrics and checkpoints go back through `ray.train.report`, and
`TuneReportCallback` forwards them to the Tune trial.
"""
from __future__ import annotations

import math
from pathlib import Path

REPORT_KEYS = ("iteration", "kimg", "train_seconds", "wall_seconds", "loss_fake_score", "loss_generator", "ua",
               "override_rate", "forget_prob_mean", "forget_entropy_mean", "remaining_accuracy",
               "remaining_accuracy_teacher", "fd_remaining", "fd_remaining_teacher", "fd_forget_vs_override",
               "fd_override_teacher", "fd_ratio", "override_fd_ratio")


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
    train_sfd(cfg, config["run_dir"], callback=report, resume=True, progress=False, measure_speed=False)


def run_trial(config: dict) -> None:
    """Tune trainable: one SFD run of one target with one parameter set, on Ray Train."""
    import ray.tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    sweep = config["sweep"]
    run_dir = Path(sweep["out"]) / "trials" / config["target_slug"] / trial_id
    use_gpu = sweep["gpus_per_worker"] > 0
    resources = {"CPU": sweep["cpus_per_worker"]}
    if use_gpu:
        resources["GPU"] = sweep["gpus_per_worker"]
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"sfd": config["sfd"], "run_dir": str(run_dir),
                           "threads_per_worker": max(1, math.floor(sweep["cpus_per_worker"]))},
        scaling_config=ScalingConfig(num_workers=sweep["workers_per_trial"], use_gpu=use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=f"train-{trial_id}", storage_path=sweep["storage"],
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()
