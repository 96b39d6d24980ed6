#!/usr/bin/env python
"""Sweep SFD over forget targets: Ray Tune + Optuna per target, Ray Train trials, MLflow.

    python orchestration/sweep.py --targets all_digits_classes
    python orchestration/sweep.py --targets cifar10:0->1 --teacher ckpt.pt --address auto

Every target gets its own Optuna study whose first trial is the preset's default
configuration (the baseline); trials run in parallel within the cluster's resources, each
as a Ray Train job; everything is logged to MLflow (SQLite in --out unless --mlflow-uri).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):           # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="orchestration/sweep.py",
        description="Search SFD's hyperparameters for every forget target with Ray Tune + Optuna (one "
                    "independent multi-objective study per target: maximise UA, minimise remaining-class FD and "
                    "the overridden class's FD to its real images), run each trial with Ray Train, track all "
                    "of it in MLflow, and write a trial table, per-target summary, Pareto plots and the best "
                    "generator per target under --out.",
        epilog="targets: all_<preset>_classes (each class in turn), <preset>:3,7 (each listed class), "
               "<preset>:3->5 (explicit override), <preset>:0+3->1,2 (several classes in one target), "
               "override policies 'random' / 'classifier' as in <preset>:3->random. "
               "Best trial per target: lowest remaining FD among trials with UA >= --ua-threshold, "
               "preferring override FD ratio <= --max-override-fd-ratio.")
    p.add_argument("--targets", nargs="+", help="forget targets (see below); required unless --summarize-only")
    p.add_argument("--targets-file", default=None,
                   help="text-to-image presets: a YAML list of concept targets (concept, override, optional "
                        "synonyms and prompt templates; see orchestration/targets.py), on top of --targets")
    p.add_argument("--override", default=None,
                   help="override for targets that name none: 'next' (c -> c+1), a class id, 'random' or "
                        "'classifier' (default: the search space's 'override')")
    p.add_argument("--space", help="search-space YAML (default: search_spaces/<preset>.yaml)")
    p.add_argument("--out", default="runs/sweep", help="output folder (default: runs/sweep)")
    p.add_argument("--trials-per-target", type=int, default=None,
                   help="trials per target, the baseline included (default: 3; 9 with --budget long)")
    p.add_argument("--budget-kimg", type=float, default=None,
                   help="training length of every trial in kimg (default: the space's defaults)")
    p.add_argument("--budget", choices=["quick", "long"], default="quick",
                   help="'quick' (the space's defaults, minutes on a laptop) or 'long' (4x the kimg, 3x the "
                        "trials: better quality); explicit --budget-kimg/--trials-per-target win")
    p.add_argument("--stage1-kimg", type=float, default=None,
                   help="budget of the shared stage 1: the teacher distilled once into a one-step generator (forget "
                        "weights 0), keyed by teacher digest + settings and reused; every trial starts its "
                        "forgetting from it (default: the space's stage1_kimg)")
    p.add_argument("--no-shared-stage1", action="store_true",
                   help="no shared stage 1: every trial distils from the teacher itself")
    p.add_argument("--max-concurrent", type=int, default=0,
                   help="trials running at once (default: as many as the cluster's CPUs/GPUs allow)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers (DDP ranks) per trial")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per Ray Train worker (default: 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs per Ray Train worker; > 0 uses CUDA and NCCL (default: 0, CPU with gloo)")
    p.add_argument("--ua-threshold", type=float, default=0.99, help="UA a trial needs to be 'best' (default: 0.99)")
    p.add_argument("--max-override-fd-ratio", type=float, default=10.0,
                   help="diversity limit on the overridden class's FD ratio (its FD to the override's real "
                        "images over the teacher's own) for the best trial; a collapse onto one template "
                        "measures ~50x, short diverse runs 1-9x (default: 10)")
    p.add_argument("--fresh-seed", type=int, default=4242,
                   help="re-evaluate each target's best and baseline trial on fresh samples of this seed (columns "
                        "*_fresh; the search-time minimum of noisy figures flatters the winner); -1 skips it")
    p.add_argument("--summarize-only", action="store_true",
                   help="re-rank an existing sweep in --out (trials.parquet) with the current --ua-threshold and "
                        "--max-override-fd-ratio, rewriting summary, Pareto plots and best exports; runs nothing")
    p.add_argument("--stop-ua-kimg", type=float, default=10.0,
                   help="stop a trial whose UA is still below --stop-ua-min after this many kimg (default: 10)")
    p.add_argument("--stop-ua-min", type=float, default=0.5, help="see --stop-ua-kimg (default: 0.5)")
    p.add_argument("--teacher", help="teacher checkpoint for presets without a bundled one, or a cached public one "
                                     "by name ('edm', 'ddpm'); default: the one `sfd fetch` put in $SFD_HOME")
    p.add_argument("--classifier", help="UA classifier (ResNet-34 state dict) for presets without a bundled judge "
                                        "(default: $SFD_HOME/<preset>/resnet34_<preset>.safetensors)")
    p.add_argument("--fid-weights", help="FID Inception weights file for presets without a bundled judge "
                                         "(default: the one `sfd fetch` put in $SFD_HOME)")
    p.add_argument("--reference", help="real images for FD: folder of class folders, .npz (images, labels) or "
                                       "per-class statistics .npz (default: the statistics `sfd fetch` computed)")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve targets, search spaces and files, print the plan and exit (starts nothing)")
    p.add_argument("--address", help="join an existing Ray cluster ('auto' or host:port); default: start a local one")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--storage", help="Ray storage path for checkpoints, local or s3:// (default: OUT/ray)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: sqlite:///OUT/mlflow.db)")
    p.add_argument("--experiment", default="sfd-sweep", help="MLflow experiment name (default: sfd-sweep)")
    p.add_argument("--seed", type=int, default=0, help="seed of every trial and of the Optuna samplers")
    p.add_argument("--verbose", action="store_true", help="show Ray's and the trial workers' own logs")
    return p


def resolve(a):
    """Validate everything a sweep needs before any trial starts; return (targets, spaces, overrides)."""
    from orchestration.space import load_space, space_path
    from orchestration.targets import parse_targets, preset_of

    from sfd.presets import get_preset

    from orchestration.targets import load_targets_file
    file_targets = load_targets_file(a.targets_file) if getattr(a, "targets_file", None) else []
    names = [t.preset for t in file_targets[:1]]
    for spec in a.targets or []:
        for part in spec.split():
            name = preset_of(part)
            get_preset(name)                       # unknown preset: error listing the valid ones
            if name not in names:
                names.append(name)
    given = load_space(a.space) if a.space else None
    spaces = {n: given if given is not None and given.preset == n else load_space(space_path(n)) for n in names}
    targets = parse_targets(a.targets, a.override or spaces[names[0]].override) if a.targets else []
    targets += file_targets
    if len({t.name for t in targets}) != len(targets):
        raise ValueError("a target is listed twice (--targets and --targets-file together) — list it once")
    overrides = {"seed": a.seed}
    if a.budget_kimg is not None:
        overrides["budget_kimg"] = a.budget_kimg
    elif a.budget == "long":
        for s in spaces.values():
            s.defaults = {**s.defaults, "budget_kimg": 4 * s.baseline().budget_kimg}
    files = {key: getattr(a, key) for key in ("teacher", "classifier", "fid_weights", "reference")}
    overrides.update({k: v for k, v in files.items() if v})
    real = sorted({t.preset for t in targets if not get_preset(t.preset).embedded})
    if len(real) > 1:
        raise ValueError(f"one real-dataset preset per sweep (the files are shared by every trial); got "
                         f"{', '.join(real)} — run one sweep per preset")
    if real:
        from sfd import assets
        paths, missing = assets.resolve(real[0], files)
        if missing:
            raise ValueError("the sweep optimises UA and FD, so " +
                             assets.missing_message(real[0], missing, "a teacher and a judge") +
                             f"\n(`sfd fetch {real[0]}` downloads the public ones; `sfd fetch {real[0]} --list` "
                             f"shows every file)")
        overrides.update({k: str(v) for k, v in paths.items()})
    return targets, spaces, overrides


def print_plan(a, targets, spaces, overrides) -> None:
    """What the sweep would run, with every file it would read."""
    from sfd.presets import get_preset

    n = len(targets) * a.trials_per_target
    print(f"[sweep] plan: {len(targets)} target(s) x {a.trials_per_target} trials = {n} trials; out: {a.out}")
    for t in targets:
        print(f"  target {t.name}")
    for name, sp in spaces.items():
        base = sp.baseline().replace(**{k: v for k, v in overrides.items() if k != "seed"})
        print(f"  space {name}: {sp.source or '(given)'}; searches {', '.join(sorted(sp.params)) or 'nothing'}; "
              f"budget {base.budget_kimg:g} kimg per trial")
        if get_preset(name).embedded:
            print(f"  files {name}: bundled teacher and judge ({get_preset(name).weights_dir})")
            continue
        for key in ("teacher", "classifier", "fid_weights", "reference"):
            v = getattr(base, key)
            ok = "ok" if v and Path(v).exists() else "MISSING"
            print(f"  {key:12s} [{ok}] {v}")
    print("[sweep] dry run: nothing started (models are loaded and checked when the sweep runs)")


def check_models(targets, spaces, overrides) -> None:
    """Load each preset's teacher and judge once on the driver: a bad path fails now, and the
    teacher's reference samples are cached before the trials need them."""
    from sfd.denoisers import load_teacher
    from sfd.evaluate import can_evaluate, load_judge
    from sfd.evaluate.forgetting import teacher_samples
    from sfd.evaluate.report import check_reference
    from sfd.presets import get_preset

    for name in sorted({t.preset for t in targets}):
        preset = get_preset(name)
        base = spaces[name].baseline().replace(**{k: v for k, v in overrides.items()
                                                  if k in ("teacher", "classifier", "fid_weights", "reference")})
        teacher = load_teacher(preset, base.teacher)
        if not can_evaluate(preset, base):
            raise ValueError(f"the sweep optimises UA and FD, so preset '{name}' needs --classifier (ResNet-34), "
                             f"--fid-weights (FID Inception) and --reference (real images per class)")
        load_judge(preset, base.classifier, fid_weights=base.fid_weights)
        if base.reference:
            check_reference(base.reference, preset)
        if preset.text:                  # prompt-table teachers: each target's evaluator caches its own samples
            continue
        per_class = max(base.eval_remain_per_class, base.eval_forget_samples)
        print(f"[sweep] teacher reference samples for {name}: {per_class} per class (cached)", flush=True)
        teacher_samples(teacher, preset.num_classes, per_class, progress=True)


class HopelessTrialStopper:
    """Tune scheduler logic: stop trials whose metrics went non-finite or whose UA is not rising."""

    def __init__(self, ua_kimg: float, ua_min: float):
        self.ua_kimg, self.ua_min = ua_kimg, ua_min
        self.stopped: dict[str, str] = {}

    def verdict(self, result: dict) -> str | None:
        for k in ("fd_remaining", "loss_generator", "loss_fake_score"):
            v = result.get(k)
            if v is not None and not math.isfinite(v):
                return f"{k} is {v}"
        if result.get("kimg", 0) >= self.ua_kimg and "ua" in result and result["ua"] < self.ua_min:
            return f"UA {result['ua']:.3f} < {self.ua_min} after {result['kimg']:.1f} kimg"
        return None


def make_scheduler(stopper: HopelessTrialStopper):
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    class HopelessTrialScheduler(FIFOScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            why = stopper.verdict(result)
            if why:
                stopper.stopped[trial.trial_id] = why
                print(f"[sweep] stopping trial {trial.trial_id} ({trial.config.get('target')}): {why}", flush=True)
                return TrialScheduler.STOP
            return TrialScheduler.CONTINUE

    return HopelessTrialScheduler()


class Progress:
    """What a person follows: trials and targets done, best so far per target."""

    def __init__(self, targets, trials_per_target: int, ua_threshold: float):
        self.total = {t.name: trials_per_target for t in targets}
        self.done = {t.name: 0 for t in targets}
        self.best: dict[str, tuple[float, float]] = {}
        self.ua_threshold = ua_threshold
        self.t0 = time.time()

    def __call__(self, event: str, trial, result):
        if event == "result":
            return
        name = trial.config["target"]
        self.done[name] += 1
        r = result or {}
        ua, fd = r.get("ua", math.nan), r.get("fd_ratio", math.nan)
        if ua >= self.ua_threshold and (name not in self.best or fd < self.best[name][1]):
            self.best[name] = (ua, fd)
        targets_done = sum(self.done[n] >= self.total[n] for n in self.total)
        trials_done = sum(self.done.values())
        best = self.best.get(name)
        best_s = f"best so far UA {best[0]:.3f}, FD ratio {best[1]:.2f}" if best else "no trial at the UA threshold yet"
        print(f"[sweep {time.time() - self.t0:6.0f}s] trial {trials_done}/{sum(self.total.values())}, "
              f"targets {targets_done}/{len(self.total)} done | {name} {trial.trial_id} {event}: "
              f"UA {ua:.3f}, FD ratio {fd:.2f} | {best_s}", flush=True)


def summarize_only(a) -> int:
    import pandas as pd

    from orchestration.results import summarise
    from orchestration.targets import parse_targets

    out = Path(a.out)
    if not (out / "trials.parquet").is_file():
        print(f"sweep.py: error: {out / 'trials.parquet'} does not exist; run the sweep first", file=sys.stderr)
        return 2
    rows = pd.read_parquet(out / "trials.parquet").to_dict("records")
    targets = parse_targets(list(dict.fromkeys(r["target"] for r in rows)), "next")
    df = summarise(rows, targets, out, a.ua_threshold, a.max_override_fd_ratio,
                   fresh_seed=None if a.fresh_seed < 0 else a.fresh_seed)
    print((out / "summary.md").read_text())
    return 0 if (df["best_trial"] != "").all() else 1


def apply_budget(a) -> None:
    """--budget long: 3x the trials unless --trials-per-target was given (4x the kimg: resolve)."""
    if a.trials_per_target is None:
        a.trials_per_target = 9 if a.budget == "long" else 3


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.summarize_only:
        return summarize_only(a)
    if not a.targets and not a.targets_file:
        print("sweep.py: error: --targets is required, e.g. --targets all_digits_classes", file=sys.stderr)
        return 2
    apply_budget(a)
    try:
        targets, spaces, overrides = resolve(a)
        if a.trials_per_target < 1:
            raise ValueError(f"--trials-per-target must be >= 1, got {a.trials_per_target}")
        if a.workers_per_trial < 1:
            raise ValueError(f"--workers-per-trial must be >= 1, got {a.workers_per_trial}")
        if a.dry_run:
            print_plan(a, targets, spaces, overrides)
            return 0
        check_models(targets, spaces, overrides)
    except Exception as e:        # a bad target, space or model: say so before anything starts
        from sfd.io import CheckpointError
        if isinstance(e, (ValueError, CheckpointError)):
            print(f"sweep.py: error: {e}", file=sys.stderr)
            return 2
        raise
    return run_sweep(a, targets, spaces, overrides)


def shared_stage1(a, preset_name: str, space, overrides: dict, out: Path) -> Path | None:
    """The preset's stage 1, found by its key (bundled, cached, or in --out) or trained now as its
    own Ray Train job; materialised under OUT/stage1/<key> so every node's trials can read it."""
    import shutil

    from sfd.denoisers import load_teacher
    from sfd.presets import get_preset
    from sfd.raytrain import make_trainer
    from sfd.stage1 import (cache_root, export_stage1, find_stage1, is_stage1, stage1_config, stage1_key)

    kimg = a.stage1_kimg if a.stage1_kimg is not None else space.stage1_kimg
    if a.no_shared_stage1 or not kimg:
        return None
    preset = get_preset(preset_name)
    models = {k: v for k, v in overrides.items() if k in ("teacher", "classifier", "fid_weights", "reference")}
    base = space.baseline()
    cfg = stage1_config(preset_name, kimg, a.seed, **models, eval_forget_samples=base.eval_forget_samples,
                        eval_remain_per_class=base.eval_remain_per_class)
    key = stage1_key(cfg, load_teacher(preset, cfg.teacher))
    dest = out / "stage1" / key
    if is_stage1(dest):
        print(f"[sweep] stage 1 for {preset_name}: {dest} (key {key})", flush=True)
        return dest
    found = find_stage1(key, preset)
    if found is not None:
        print(f"[sweep] stage 1 for {preset_name}: reusing {found} (key {key})", flush=True)
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("state.safetensors", "stage1.json"):
            shutil.copy2(found / f, dest / f)
        return dest
    print(f"[sweep] stage 1 for {preset_name}: distilling {kimg} kimg on Ray Train (key {key}) ...", flush=True)
    t0 = time.time()
    result = make_trainer(cfg.to_dict(), dest / "run", num_workers=a.workers_per_trial,
                          cpus_per_worker=a.cpus_per_worker, gpus_per_worker=a.gpus_per_worker,
                          storage=a.storage or str(out / "ray"), name=f"stage1-{key}").fit()
    if result.error:
        raise result.error
    from sfd.evaluate.forgetting import teacher_fingerprint
    extra = {"command": "orchestration/sweep.py (shared stage 1)", "wall_seconds": round(time.time() - t0, 1)}
    fingerprint = teacher_fingerprint(load_teacher(preset, cfg.teacher))
    for where in (dest, cache_root() / key):
        export_stage1(dest / "run", where, key, cfg, extra, teacher_fingerprint=fingerprint)
    print(f"[sweep] stage 1 for {preset_name}: done in {time.time() - t0:.0f} s -> {dest}", flush=True)
    return dest


def run_sweep(a, targets, spaces, overrides) -> int:
    import ray
    from ray import tune

    from orchestration.results import summarise, trial_rows
    from orchestration.search import PerTargetSearch
    from orchestration.tracking import MLflowSweep, MLflowTuneCallback
    from orchestration.trial import run_trial

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = a.storage or str(out / "ray")
    uri = a.mlflow_uri or f"sqlite:///{out / 'mlflow.db'}"
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if a.address:
        ray.init(address=a.address, log_to_driver=a.verbose)
    else:
        ray.init(num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=a.verbose,
                 logging_level="INFO" if a.verbose else "WARNING")
    cpus = ray.cluster_resources().get("CPU", 1)
    per_trial = a.workers_per_trial * a.cpus_per_worker
    max_conc = a.max_concurrent or max(1, int(cpus // max(per_trial, 1e-9)))
    n_trials = len(targets) * a.trials_per_target
    print(f"[sweep] {len(targets)} targets x {a.trials_per_target} trials = {n_trials} trials, up to {max_conc} at once "
          f"({a.workers_per_trial} worker(s) x {a.cpus_per_worker} CPU, {a.gpus_per_worker} GPU per trial); "
          f"MLflow: {uri}", flush=True)

    for name, space in spaces.items():
        path = shared_stage1(a, name, space, overrides, out)
        # every trial's stage 2 starts from it (or, without one, from copies of the teacher)
        space.defaults = {**space.defaults, "init_from": str(path) if path else "none"}

    tracker = MLflowSweep(uri, a.experiment, artifact_root=None if a.mlflow_uri else (out / "mlartifacts").as_uri())
    parent = tracker.start_parent(f"sweep-{time.strftime('%Y%m%d-%H%M%S')}", {
        "targets": " ".join([*(a.targets or []), *([f"--targets-file={a.targets_file}"] if a.targets_file else [])]), "trials_per_target": a.trials_per_target,
        "workers_per_trial": a.workers_per_trial, "ua_threshold": a.ua_threshold, **{f"override_{k}": v for k, v in overrides.items()}},
        {"preset": ",".join(sorted({t.preset for t in targets}))})
    searcher = PerTargetSearch(targets, spaces, a.trials_per_target, overrides, seed=a.seed,
                               ua_threshold=a.ua_threshold)
    stopper = HopelessTrialStopper(a.stop_ua_kimg, a.stop_ua_min)
    progress = Progress(targets, a.trials_per_target, a.ua_threshold)
    callback = MLflowTuneCallback(tracker, {t.name: t for t in targets}, out, on_event=progress)
    sweep_cfg = {"out": str(out), "storage": storage, "workers_per_trial": a.workers_per_trial,
                 "cpus_per_worker": a.cpus_per_worker, "gpus_per_worker": a.gpus_per_worker}
    tuner = tune.Tuner(
        # The trial function only drives its Ray Train job; the workers hold the resources.
        tune.with_resources(run_trial, tune.PlacementGroupFactory([{"memory": 2**20}])),
        param_space={"sweep": sweep_cfg},
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=make_scheduler(stopper), num_samples=n_trials,
                                    max_concurrent_trials=max_conc),
        run_config=tune.RunConfig(name="tune", storage_path=storage, callbacks=[callback], verbose=0),
    )
    status = "failed"
    try:
        grid = tuner.fit()
        rows = trial_rows(grid, {t.name: t for t in targets}, out, set(stopper.stopped))
        df = summarise(rows, targets, out, a.ua_threshold, a.max_override_fd_ratio, tracker,
                       fresh_seed=None if a.fresh_seed < 0 else a.fresh_seed)
        tracker.log_artifacts(parent, [out / "summary.md", out / "summary.parquet", out / "trials.parquet"])
        n_best = int((df["best_trial"] != "").sum())
        tracker.log_metrics(parent, {"targets_with_best": n_best, "trials": len(rows),
                                     "median_best_fd_ratio": float(df["fd_ratio"].median())})
        status = "finished"
    finally:
        tracker.finish(parent, status)
        ray.shutdown()
    print()
    print((out / "summary.md").read_text())
    print(f"[sweep] outputs in {out}: trials.parquet, summary.md/.parquet, pareto/*.png, best/*/generator.safetensors")
    print(f"[sweep] MLflow UI: mlflow ui --backend-store-uri {uri}")
    missing = df[df["best_trial"] == ""]["target"].tolist()
    if missing:
        print(f"[sweep] no trial reached UA >= {a.ua_threshold} for: {', '.join(missing)} "
              f"(try --budget long)", file=sys.stderr)
    failed_targets = df[df["finished"] == 0]["target"].tolist()
    if failed_targets:
        print(f"[sweep] every trial failed for: {', '.join(failed_targets)}; see trials.parquet 'error'", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
