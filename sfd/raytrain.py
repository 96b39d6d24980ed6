"""One SFD run on Ray: `sfd forget --num-workers N`, and every sweep trial.

``train_fn_per_worker`` runs :func:`sfd.loop.train_sfd` on each Ray Train worker (Ray Train
sets up the process group: gloo on CPU, NCCL on GPU); metrics and checkpoints go back through
``ray.train.report``. :func:`make_trainer` builds the ``TorchTrainer`` that a sweep trial and a
single run both fit, so the two run exactly the same thing. A one-worker sweep trial may run the
same body (:func:`run_reporting`) inside its Tune trial instead (:func:`train_fn_in_tune`,
``sweep.py --trial-runner tune``), reporting to Tune.

Fault tolerance: with ``max_failures`` Ray Train restarts a failed worker group (a lost node, a
killed process) and the run continues from ``ray.train.get_checkpoint()`` -- the copy in Ray's
storage, not the local run folder, so it continues on another node too: the storage copy is
put back into the run folder (:func:`restore_into_run_dir`) and the loop resumes from it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sfd.config import SFDConfig
from sfd.loop import train_sfd
from sfd.robustness import ATTACK_KEYS
from sfd.runs import attack_after_run

from .checkpoint import checkpoint_problem, resolve_checkpoint
from .io import CheckpointError, atomic_path

REPORT_KEYS = ("iteration", "kimg", "train_seconds", "wall_seconds", "loss_fake_score", "loss_generator", "ua",
               "override_rate", "forget_prob_mean", "forget_entropy_mean", "remaining_accuracy",
               "remaining_accuracy_teacher", "fd_remaining", "fd_remaining_teacher", "fd_forget_vs_override",
               "fd_override_teacher", "fd_ratio", "override_fd_ratio", "ua_heldout", "override_rate_heldout",
               "prompt_accuracy_remaining", "prompt_accuracy_remaining_teacher", "leakage_accuracy",
               "leakage_accuracy_teacher", "other_attribute_accuracy", "other_attribute_accuracy_heldout",
               # a baseline's one report (sfd/methods): its loss, sampler cost, setup time and sampling speed
               "loss", "nfe", "setup_seconds", "images_per_second_generator",
               # keep_best_ua: the kept evaluation (its kimg) whose EMA is the run's generator
               "selected_kimg",
               *ATTACK_KEYS)


def run_reporting(config: dict, *, device: str, rank: int, stored, send) -> None:
    """The body of every runner of one SFD run: threads, a restart from ``stored`` (the runner's copy
    of the last checkpoint, or None), :func:`sfd.loop.train_sfd`, and each report through
    ``send(metrics, checkpoint_dir_or_None)``. Ray Train's workers and the in-trial runner
    (:func:`train_fn_in_tune`) differ only in what they pass here."""


    threads = int(config.get("threads_per_worker") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    cfg = SFDConfig.from_dict({**config["sfd"], "device": device})
    resume = bool(config.get("resume", True))
    if stored is not None:               # a restart: continue from the runner's copy of the last checkpoint
        with stored.as_directory() as d:
            restore_into_run_dir(d, config["run_dir"], record=rank == 0)
        resume = True

    reports = []

    def report(metrics: dict, checkpoint_dir) -> None:
        clean = {k: float(metrics[k]) for k in REPORT_KEYS if k in metrics and metrics[k] is not None}
        send(clean, checkpoint_dir if rank == 0 else None)
        reports.append(clean)

    final = train_sfd(cfg, config["run_dir"], callback=report, resume=resume,
                      progress=bool(config.get("progress", False)) and rank == 0,
                      measure_speed=bool(config.get("measure_speed", False)))
    if "selected_iteration" in final and reports:
        # keep_best_ua: the run's generator is the kept evaluation's EMA, measured on fresh noise -- the
        # trial's result is that figure, not the last evaluation's
        report(final, None)
    if not reports:
        # restarted from the run's final checkpoint (it was killed after saving it): nothing was left
        # to train, so the loop reported nothing; the final metrics still reach Tune and the tracker
        report(final, None)
    if cfg.attack != "off":
        # one more report with the attack's figures beside the final ones (sfd.robustness); every rank sends it
        # (Ray Train's reports are collective), rank 0 measures while the others wait in theirs
        figures = attack_after_run(config["run_dir"], cfg) if rank == 0 else {}
        send({**reports[-1], **figures} if rank == 0 else {}, None)


def train_fn_per_worker(config: dict) -> None:
    """Ray Train's per-worker function (gloo on CPU, NCCL on GPU, set up by Ray Train)."""
    import ray.train
    import ray.train.torch

    def send(metrics, checkpoint_dir):
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    run_reporting(config, device=str(ray.train.torch.get_device()), rank=ray.train.get_context().get_world_rank(),
                  stored=ray.train.get_checkpoint(), send=send)


def train_fn_in_tune(config: dict) -> None:
    """The same run inside a Ray Tune trial's own process (``--trial-runner tune``): one worker, no
    Ray Train controller or worker actors; reports and checkpoints go to Tune itself, and a trial
    that Tune restarts (``FailureConfig``, ``--resume``) continues from ``ray.tune.get_checkpoint()``."""
    import ray.tune

    def send(metrics, checkpoint_dir):
        ckpt = ray.tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=ckpt)

    device = "cuda" if float(config.get("gpus", 0) or 0) > 0 and torch.cuda.is_available() else "cpu"
    run_reporting(config, device=device, rank=0, stored=ray.tune.get_checkpoint(), send=send)


def train_loop_config(sfd_config: dict, run_dir, *, cpus_per_worker: float = 1.0, resume: bool = True,
                      progress: bool = False, measure_speed: bool = False) -> dict:
    """What either runner's function takes."""
    return {"sfd": sfd_config, "run_dir": str(run_dir), "resume": resume, "progress": progress,
            "measure_speed": measure_speed, "threads_per_worker": max(1, math.floor(cpus_per_worker))}


def restore_into_run_dir(ckpt_dir, run_dir, record: bool = True) -> int:
    """Put a checkpoint from Ray's storage back into ``run_dir/checkpoints`` (unless an intact copy
    is there) and point ``latest`` at it when it is at least as new as the local one; returns its
    iteration. Several ranks on one node may do this at once: each writes a private temporary
    folder and renames it into place, and a rank that finds the folder already there keeps it."""

    ckpt_dir, run_dir = Path(ckpt_dir), Path(run_dir)
    problem = checkpoint_problem(ckpt_dir)
    if problem:
        raise CheckpointError(f"the checkpoint Ray Train restored ({ckpt_dir}) is not intact: {problem}")
    iteration = json.loads((ckpt_dir / "state.json").read_text())["iteration"]
    try:                                 # what the run folder holds itself (on another node: nothing)
        local = resolve_checkpoint(run_dir)[0]
    except CheckpointError:
        local = None
    local_it = json.loads((local / "state.json").read_text())["iteration"] if local is not None else -1
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt-{iteration:08d}"
    if checkpoint_problem(final) is not None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            for f in ("state.safetensors", "state.json"):
                shutil.copy2(ckpt_dir / f, tmp / f)
            if final.exists() and checkpoint_problem(final) is not None:
                os.replace(final, root / f".broken-{final.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            try:
                os.replace(tmp, final)
            except OSError:              # another rank of this node put it there first
                if checkpoint_problem(final) is not None:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if iteration >= local_it:
        with atomic_path(root / "latest") as p:
            p.write_text(final.name + "\n")
    if record:
        # the run folder tells that (and from where) it was restarted
        with open(run_dir / "restarts.jsonl", "a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "iteration": iteration,
                                "from": str(ckpt_dir), "local_iteration": local_it}) + "\n")
    return iteration


def make_trainer(sfd_config: dict, run_dir, *, num_workers: int = 1, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0, storage: str | None = None, name: str = "sfd",
                 callbacks=(), resume: bool = True, progress: bool = False, measure_speed: bool = False,
                 max_failures: int = 0):
    """A ``TorchTrainer`` running one SFD run on ``num_workers`` Ray Train workers; a failed worker
    group is restarted up to ``max_failures`` times (-1: always), continuing from the last
    checkpoint in storage."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=train_loop_config(sfd_config, run_dir, cpus_per_worker=cpus_per_worker, resume=resume,
                                            progress=progress, measure_speed=measure_speed),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage, callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=max_failures),
                             # the newest two, like the run folder (sfd.checkpoint keep=2)
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )


def fit_single_run(cfg, out_dir, *, num_workers: int, address: str | None = None, cpus_per_worker: float = 1.0,
                   gpus_per_worker: float = 0.0, resume: bool = False, progress: bool = True) -> dict:
    """`sfd forget --num-workers N`: the run on Ray Train; returns its metrics.json."""

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
