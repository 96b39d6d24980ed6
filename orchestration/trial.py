"""A sweep trial: Ray Train's TorchTrainer running `sfd.loop.train_sfd` on N workers.

`run_trial` is the Tune trainable (the trial's driver). The trainer itself is
`sfd.raytrain.make_trainer`, the same one `sfd forget --num-workers N` fits, so a trial runs
exactly what a single run runs; `TuneReportCallback` forwards its reports to the Tune trial.
"""
from __future__ import annotations

from pathlib import Path

from sfd.raytrain import REPORT_KEYS, make_trainer

__all__ = ["run_trial", "REPORT_KEYS"]


def run_trial(config: dict) -> None:
    """Tune trainable: one SFD run of one target with one parameter set, on Ray Train."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    sweep = config["sweep"]
    run_dir = Path(sweep["out"]) / "trials" / config["target_slug"] / trial_id
    trainer = make_trainer(config["sfd"], run_dir, num_workers=sweep["workers_per_trial"],
                           cpus_per_worker=sweep["cpus_per_worker"], gpus_per_worker=sweep["gpus_per_worker"],
                           storage=sweep["storage"], name=f"train-{trial_id}", callbacks=[TuneReportCallback()],
                           # a restarted worker group continues from the trial's last checkpoint in storage;
                           # a trial resumed by `sweep.py --resume` finds it the same way (same run name)
                           max_failures=int(sweep.get("max_failures", 0)))
    # [cluster] --placement, and the trial's outputs uploaded to a remote --storage (orchestration/cluster.py)
    from orchestration.cluster import for_cluster, trial_storage_rel
    outputs = sweep.get("outputs_uri")
    rel = trial_storage_rel(config["target_slug"], trial_id)
    trainer = for_cluster(trainer, placement=sweep.get("placement", "pack"),
                          outputs_uri=f"{outputs.rstrip('/')}/{rel}" if outputs else None,
                          scratch_rel=f"{sweep.get('sweep_id', 'sweep')}/{rel}")
    trainer.fit()
