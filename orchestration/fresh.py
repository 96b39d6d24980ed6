"""The fresh re-evaluation of each target's best and baseline trial, as Ray tasks on the workers.

`orchestration.results.summarise` reports, for every target, its best and its baseline trial
re-evaluated on fresh noise (columns ``*_fresh``). Done on the driver, that is two full
evaluations per target in series on the one process that should only plan -- on the card's
KubeRay layout a head node with no GPU and no trial CPUs. Here each re-evaluation is a Ray task
with a trial worker's resources, submitted as soon as the last trial of its target ends (Tune's
callback below), so it runs beside later targets' trials; the driver only collects the figures
and writes each into the trial's run folder (``evaluation_fresh_seed<seed>.json``, the cache
`summarise` reads). Like the reference-sample job (orchestration/reference.py), the driver loads
no model.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from ray.tune import Callback

from orchestration.storage import Storage, is_remote
from sfd.io import write_json
from sfd.runs import evaluate_run


def fresh_cache(run_dir, seed: int) -> Path:
    return Path(run_dir) / f"evaluation_fresh_seed{seed}.json"


def _evaluate(run_dir: str, seed: int, storage_uri: str | None, rel: str | None) -> dict:
    """(runs as a task) ``sfd.runs.evaluate_run`` on fresh noise; with a remote storage the trial's folder is
    fetched from ``<storage>/<rel>`` first (it was written on another node)."""
    torch.set_num_threads(1)
    if storage_uri and is_remote(storage_uri):
        with tempfile.TemporaryDirectory() as d:
            Storage.from_uri(storage_uri).download_dir(rel, d)
            return evaluate_run(d, seed=seed)
    return evaluate_run(run_dir, seed=seed)


def wanted(rows: list[dict], ua_threshold: float, max_override_fd_ratio: float, max_asr: float | None) -> list[dict]:
    """The rows a target's summary re-evaluates: its best trial (`choose_best`, the summary's own rule) and its
    baseline; only finished ones that exported a model."""
    from orchestration.results import choose_best, model_file

    best = choose_best(rows, ua_threshold, max_override_fd_ratio, max_asr)
    base = next((r for r in rows if r["baseline"]), None)
    out = {r["trial_id"]: r for r in (best, base) if r is not None and model_file(r["run_dir"]) is not None}
    return list(out.values())


class FreshJobs:
    """Fresh re-evaluations in flight: submitted per target, gathered (and cached) once before the summary."""

    def __init__(self, seed: int, ua_threshold: float, max_override_fd_ratio: float, max_asr: float | None = None,
                 storage_uri: str | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0):
        self.seed, self.ua_threshold, self.max_ofr, self.max_asr = seed, ua_threshold, max_override_fd_ratio, max_asr
        self.storage_uri, self.num_cpus, self.num_gpus = storage_uri, num_cpus, num_gpus
        self.pending: dict[str, tuple[str, object]] = {}      # trial id -> (run dir, object ref)
        self.submitted_units: set[str] = set()

    def submit(self, unit: str, rows: list[dict]) -> int:
        """The re-evaluations of one target (``rows``: its trial rows) not cached yet; returns how many."""
        import ray

        self.submitted_units.add(unit)
        task = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=1)(_evaluate)
        n = 0
        for r in wanted(rows, self.ua_threshold, self.max_ofr, self.max_asr):
            if r["trial_id"] in self.pending or fresh_cache(r["run_dir"], self.seed).is_file():
                continue
            rel = "/".join(Path(r["run_dir"]).parts[-3:])          # trials/<target>/<trial>, as in the storage
            ref = task.remote(r["run_dir"], self.seed, self.storage_uri, rel)
            self.pending[r["trial_id"]] = (r["run_dir"], ref)
            n += 1
        return n

    def gather(self) -> int:
        """Wait for every submitted re-evaluation and cache its figures in the trial's run folder; returns how
        many. A failed one raises, naming the trial (as the driver's own evaluation did)."""
        import ray

        n = 0
        for trial_id, (run_dir, ref) in list(self.pending.items()):
            try:
                metrics = ray.get(ref)
            except Exception as e:
                raise RuntimeError(f"the fresh re-evaluation of trial {trial_id} ({run_dir}) failed: "
                                   f"{type(e).__name__}: {e}") from e
            write_json(fresh_cache(run_dir, self.seed), metrics)
            del self.pending[trial_id]
            n += 1
        return n


class FreshCallback(Callback):
    """Submits a target's fresh re-evaluations when its last trial ends (what happened to each trial comes from
    the MLflow callback's ``outcome``, which Tune calls first)."""

    def __init__(self, jobs: FreshJobs, targets: dict, totals: dict, out_dir: Path, outcome: dict):
        self.jobs, self.targets, self.totals, self.out_dir, self.outcome = jobs, targets, totals, Path(out_dir), outcome

    def _ended(self, trials, trial):
        from orchestration.results import trial_rows

        unit = trial.config.get("target")
        if unit is None or unit in self.jobs.submitted_units:
            return
        mine = [t for t in trials if t.config.get("target") == unit]
        if len(mine) < self.totals.get(unit, 0) or any(t.trial_id not in self.outcome for t in mine):
            return
        records = [SimpleNamespace(config=t.config, metrics=dict(t.last_result or {}), path=t.path, error=None)
                   for t in mine]
        rows = trial_rows(records, self.targets, self.out_dir, self.outcome)
        self.jobs.submit(unit, rows)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trials, trial)
