"""A sweep trial: one SFD run (`sfd.loop.train_sfd`) of one target with one parameter set.

`run_trial` is the Tune trainable. It runs the trial one of two ways (`sweep.py --trial-runner`):

- ``train``: Ray Train's TorchTrainer on ``--workers-per-trial`` workers (DDP; gloo on CPU, NCCL on
  GPU). The trainer is `sfd.raytrain.make_trainer`, the one `sfd forget --num-workers N` fits, so a
  trial runs exactly what a single run runs; `TuneReportCallback` forwards its reports to Tune, and
  `--max-failures` restarts its worker group from the last checkpoint in Ray Train's storage.
- ``tune``: a one-worker trial runs the same per-worker body (`sfd.raytrain.run_reporting`) in the
  Tune trial's own process, which holds the worker's CPU/GPU. No Ray Train controller and worker
  actors start (each a fresh process importing torch: ~20 s per trial on 2 cores), and with
  ``reuse_actors`` the next trial runs in the same process, its imports done. Reports and
  checkpoints go to Tune; `--max-failures` is Tune's trial retry, from the trial's last checkpoint.

``auto`` (the default) is ``tune`` for one worker per trial and ``train`` for more.
"""
from __future__ import annotations

from pathlib import Path

from orchestration.cluster import for_cluster, run_with_outputs, trial_storage_rel
from sfd.raytrain import REPORT_KEYS, make_trainer, train_fn_in_tune, train_loop_config

__all__ = ["run_trial", "REPORT_KEYS", "RUNNERS", "resolve_runner", "reuse_actors", "trial_resources"]

RUNNERS = ("auto", "train", "tune")


def resolve_runner(runner: str, workers_per_trial: int) -> str:
    """``auto`` -> ``tune`` for one worker per trial, ``train`` for more; ``tune`` with more than one
    worker is refused (DDP needs Ray Train's worker group)."""
    if runner not in RUNNERS:
        raise ValueError(f"--trial-runner {runner!r} is unknown — give one of {', '.join(RUNNERS)}")
    if runner == "auto":
        return "tune" if workers_per_trial == 1 else "train"
    if runner == "tune" and workers_per_trial != 1:
        raise ValueError(f"--trial-runner tune runs one worker per trial, got --workers-per-trial "
                         f"{workers_per_trial} — use --trial-runner train (or auto) for data-parallel trials")
    return runner


def reuse_actors(runner: str, max_failures: int) -> bool:
    """Whether a finished trial's process runs the next trial (Tune's ``reuse_actors``): yes, unless
    Tune itself retries failed trials (``--trial-runner tune`` with ``--max-failures``). Ray Tune 2.60
    hands a cached process the next trial with a ``reset`` task while that trial is still PENDING; if the
    process dies then (killed as the trial starts), the one death is handled twice -- once as the
    actor's failure (counted, trial re-queued PENDING) and once as the task's (counted again, and a
    PENDING trial's failure is final) -- so the trial ends ERROR after a single kill, whatever
    ``max_failures`` says, with no run started. A fresh process per trial has no such task: a death
    while it starts counts once and is retried (tests/test_sweep_faults.py shows both)."""
    return not (runner == "tune" and max_failures != 0)


def trial_resources(runner: str, cpus_per_worker: float, gpus_per_worker: float) -> dict:
    """What the Tune trial's own process holds: the worker's CPU/GPU when it trains itself; next to
    nothing when it only drives a Ray Train job (whose workers hold the resources)."""
    if runner == "tune":
        return {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker > 0 else {})}
    return {"memory": 2**20}


def run_trial(config: dict) -> None:
    """Tune trainable: one SFD run of one target with one parameter set (see the module's text)."""
    import ray.tune


    trial_id = ray.tune.get_context().get_trial_id()
    sweep = config["sweep"]
    run_dir = Path(sweep["out"]) / "trials" / config["target_slug"] / trial_id
    # [cluster] with a remote --storage, the trial's outputs are uploaded there (orchestration/cluster.py)
    outputs = sweep.get("outputs_uri")
    rel = trial_storage_rel(config["target_slug"], trial_id)
    outputs_uri = f"{outputs.rstrip('/')}/{rel}" if outputs else None
    scratch_rel = f"{sweep.get('sweep_id', 'sweep')}/{rel}"
    if sweep.get("trial_runner", "train") == "tune":
        loop_cfg = {**train_loop_config(config["sfd"], run_dir, cpus_per_worker=sweep["cpus_per_worker"],
                                        measure_speed=bool(sweep.get("measure_speed", False))),
                    "gpus": sweep["gpus_per_worker"]}
        run_with_outputs(train_fn_in_tune, loop_cfg, rank=0, outputs_uri=outputs_uri, scratch_rel=scratch_rel)
        return
    from ray.tune.integration.ray_train import TuneReportCallback
    trainer = make_trainer(config["sfd"], run_dir, num_workers=sweep["workers_per_trial"],
                           cpus_per_worker=sweep["cpus_per_worker"], gpus_per_worker=sweep["gpus_per_worker"],
                           storage=sweep["storage"], name=f"train-{trial_id}", callbacks=[TuneReportCallback()],
                           measure_speed=bool(sweep.get("measure_speed", False)),
                           # a restarted worker group continues from the trial's last checkpoint in storage;
                           # a trial resumed by `sweep.py --resume` finds it the same way (same run name)
                           max_failures=int(sweep.get("max_failures", 0)))
    trainer = for_cluster(trainer, placement=sweep.get("placement", "pack"), outputs_uri=outputs_uri,
                          scratch_rel=scratch_rel)
    trainer.fit()
