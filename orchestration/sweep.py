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
import json
import math
import os
import shutil
import signal
import sqlite3
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

# isort: off  (the repo on sys.path before the project's imports when run as a script)
if __package__ in (None, ""):           # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# isort: on
from orchestration import cluster as clu
from orchestration.costs import COSTS
from orchestration.lifecycle import (SWEEP_FILE, Interrupted, Outcome, SignalGuard, folder_record, interrupted_inside,
                                     ray_session, read_record, refuse_live_driver, settle_dead_driver, sweep_record,
                                     write_record)
from orchestration.pruning import PerTargetHalving
from orchestration.sequential import describe, plan_chain, run_chain
from orchestration.services import probe_all
from orchestration.space import describe_baselines, load_space, space_for, space_path, trials_for, validate_plan
from orchestration.targets import load_targets_file, parse_methods, parse_targets, preset_of, unit_name, with_methods
from orchestration.trial import resolve_runner, reuse_actors, run_trial, trial_resources
from sfd import assets
from sfd.config import ATTACK_CHOICES
from sfd.evaluate.forgetting import teacher_fingerprint
from sfd.evaluate.report import check_reference
from sfd.io import CheckpointError
from sfd.presets import get_preset
from sfd.rundir import aside_path
from sfd.raytrain import make_trainer
from sfd.stage1 import bundled_stage1, cache_root, export_stage1, find_stage1, is_stage1, stage1_config, stage1_key
from sfd.tasks import get_task

PROG = "sweep.py"


class SweepError(ValueError):
    """A user mistake (printed as `sweep.py: error: <what> — <what to do>`, exit 2, no traceback)."""


class SweepArgumentParser(argparse.ArgumentParser):
    """argparse's errors in the sweep's one style (as `sfd`'s): `sweep.py: error: ... — ...`, exit 2."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message} — see 'python orchestration/sweep.py --help'\n")


def build_parser() -> argparse.ArgumentParser:
    p = SweepArgumentParser(
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
    p.add_argument("--sequential", action="store_true",
                   help="forget the --targets one after another, in the order given (a chain: docs/sequential.md): "
                        "stage k is a sweep of its own target (--trials-per-target trials, searched by its own Optuna "
                        "study) whose every trial starts from stage k-1's best trial and keeps its forgotten set; then "
                        "the joint alternative (every target at once) as one more sweep. 'next' skips the classes an "
                        "earlier stage forgot. OUT/chain.md compares the stages and the joint sweep (UA of every "
                        "target so far, the worst, rebound, FD ratio, held-out UA); MLflow: a parent run per chain, "
                        "each stage's sweep nested in it; --resume continues at the stage that stopped")
    p.add_argument("--no-joint", action="store_true",
                   help="with --sequential: skip the joint sweep (every target at once) after the chain")
    p.add_argument("--override", default=None,
                   help="override for targets that name none: 'next' (c -> c+1), a class id, 'random' or "
                        "'classifier' (default: the search space's 'override')")
    p.add_argument("--space", help="search-space YAML (default: search_spaces/<preset>.yaml)")
    p.add_argument("--methods", default="sfd",
                   help="unlearning methods, comma-separated, among sfd, esd, sa, salun: every target is swept once "
                        "per method (its own Optuna study over the space's methods.<m>.search, its own trials, a "
                        "'method' column in the tables, an MLflow tag 'method') and a per-method table (methods.md) "
                        "closes the sweep (default: sfd)")
    p.add_argument("--trial-seconds", type=float, default=None,
                   help="the same wall-time budget for every trial of every method: training stops after this many "
                        "seconds of training (SFDConfig max_seconds) or at the trial's kimg budget, whichever comes "
                        "first; evaluation and a baseline's setup (its teacher-sample pool, Fisher, mask) are not "
                        "counted (default: no limit)")
    p.add_argument("--out", default="runs/sweep", help="output folder (default: runs/sweep)")
    p.add_argument("--trials-per-target", type=int, default=None,
                   help="trials per target, the baseline included (default: the search space's trials_per_target -- "
                        "digits 2, others 3 -- and 3x that with --budget long); with --sequential: per stage")
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
    p.add_argument("--trial-runner", choices=["auto", "train", "tune"], default="auto",
                   help="how a trial runs: 'train' as a Ray Train job (TorchTrainer: a controller and "
                        "--workers-per-trial worker actors, DDP), 'tune' inside the Tune trial's own process (one "
                        "worker; no Ray Train processes to start, ~20 s less per trial on 2 CPUs; the next trial "
                        "reuses the process), 'auto' = tune for 1 worker per trial, train for more (default: auto)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per Ray Train worker (default: 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs per Ray Train worker; > 0 uses CUDA and NCCL (default: 0, CPU with gloo)")
    p.add_argument("--ua-threshold", type=float, default=0.99, help="UA a trial needs to be 'best' (default: 0.99)")
    p.add_argument("--attack", choices=ATTACK_CHOICES, default=None,
                   help="after each trial, measure its generator as `sfd attack` does (docs/robustness.md): prompt "
                        "families, side effects and the named attack (class presets: continuous only); the figures "
                        "go into trials.parquet, summary.parquet and MLflow (default: off, or all with --max-asr)")
    p.add_argument("--max-asr", type=float, default=None,
                   help="a constraint: a trial whose attack success rate (asr_max, the worst attack) exceeds this is "
                        "infeasible for the Optuna study and is not picked as best while a trial within it exists "
                        "(summary column meets_max_asr); implies --attack all unless --attack names one")
    p.add_argument("--max-override-fd-ratio", type=float, default=2.5,
                   help="quality limit on the overridden class's FD ratio (its FD to the override's real "
                        "images over the teacher's own) for the best trial: trials within it are preferred; a "
                        "collapse onto one template measures ~50x, blends still in transit 5-20x (default: 2.5, "
                        "the project's goal for the override class)")
    p.add_argument("--fresh-seed", type=int, default=4242,
                   help="re-evaluate each target's best and baseline trial on fresh samples of this seed (columns "
                        "*_fresh; the search-time minimum of noisy figures flatters the winner); -1 skips it")
    p.add_argument("--summarize-only", action="store_true",
                   help="re-rank an existing sweep in --out (trials.parquet) with the current --ua-threshold and "
                        "--max-override-fd-ratio, rewriting summary, Pareto plots and best exports; runs nothing. "
                        "A sweep whose driver was killed (kill -9) has its runs left RUNNING marked KILLED (one line "
                        "says so); one whose driver still runs is refused (its tables are written when it ends)")
    p.add_argument("--early-stop", action=argparse.BooleanOptionalAction, default=None,
                   help="early stopping per target (asynchronous successive halving, one set of rungs per target: "
                        "a trial is compared only with its own target's trials): rungs at --grace-kimg, x "
                        "--reduction-factor, ... kimg up to half the trial's budget; at each rung a searched trial "
                        "continues only while its score (remaining FD ratio scaled up by the UA shortfall) is within "
                        "the best 1/--reduction-factor of its target's trials there; the baseline trial is never "
                        "stopped; trials report at the space's trial eval_every_kimg (default: the search space's "
                        "early_stop block -- digits: on, from 5 kimg, keeping the best 1/1.5; the other presets: "
                        "off; --no-early-stop turns it off)")
    p.add_argument("--grace-kimg", type=float, default=None,
                   help="with early stopping: the first rung, in kimg (default: the space's early_stop.grace_kimg, "
                        "else 2)")
    p.add_argument("--reduction-factor", type=float, default=None,
                   help="with early stopping: the share of a target's trials kept at each rung is 1/this (default: "
                        "the space's early_stop.reduction_factor, else 3)")
    p.add_argument("--warm-starts", type=int, default=None,
                   help="a target's first searched trials start from up to this many of the best completed "
                        "configurations of the targets swept before it (enqueued in its Optuna study; trials.parquet "
                        "and the summary name where each came from); 0: off (default: the search space's "
                        "warm_starts -- digits 2, the other presets 0)")
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
                   help="resolve targets, search spaces and files, print the plan, check that the teacher/judge/"
                        "reference files open, that --storage is writable, the MLflow server answers and the Ray "
                        "--address is reachable (an unreachable service: one line naming it, exit 2), then exit "
                        "without training")
    p.add_argument("--address", help="join an existing Ray cluster ('auto' or host:port); default: start a local one")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--storage",
                   help="where the sweep keeps everything nodes share: Ray checkpoints, each trial's outputs, the "
                        "results tables (Parquet) and the teacher's reference samples; any URI pyarrow understands "
                        "(s3://bucket/prefix, gs://..., a local path). S3 endpoint and keys come from AWS_ENDPOINT_URL, "
                        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION (default: OUT/ray)")
    p.add_argument("--placement", choices=["pack", "spread"], default="pack",
                   help="where a trial's --workers-per-trial workers go: 'pack' onto as few nodes as possible or "
                        "'spread' over different nodes (Ray placement strategies PACK/SPREAD; default: pack)")
    p.add_argument("--reference-cpus", type=float, default=1.0,
                   help="CPUs per Ray task that samples the teacher's reference images (default: 1)")
    p.add_argument("--reference-gpus", type=float, default=None,
                   help="GPUs per reference-sampling task (default: --gpus-per-worker's value, 0 without GPUs)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: sqlite:///OUT/mlflow.db)")
    p.add_argument("--experiment", default="sfd-sweep", help="MLflow experiment name (default: sfd-sweep)")
    p.add_argument("--seed", type=int, default=0, help="seed of every trial and of the Optuna samplers")
    p.add_argument("--verbose", action="store_true", help="show Ray's and the trial workers' own logs")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep in --out (Ray Tune's experiment state, the Optuna studies "
                        "in OUT/optuna.db, the same MLflow runs): finished trials are kept, cut-off ones resume "
                        "from their last checkpoint, the rest run; runs a killed driver left RUNNING are marked "
                        "KILLED first (one line says so); refused while the sweep's driver still runs")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds another sweep: move it aside to <out>.old-<timestamp> (never deleted) and "
                        "start a new one there")
    p.add_argument("--max-failures", type=int, default=0,
                   help="restarts of a trial's Ray Train job after a worker failure (a lost node, a killed "
                        "process), each continuing from the trial's last checkpoint in storage; -1: no limit; with "
                        "--trial-runner tune every trial then starts in a fresh process (a reused one killed as it "
                        "starts a trial would end that trial at once: docs/reliability.md) (default: 0)")
    return p


def check_flags(a) -> None:
    """The sweep's own numeric flags, checked before anything starts (SFD settings go through
    SFDConfig.validate with the plan)."""
    def need(ok: bool, flag: str, v, fix: str):
        if not ok:
            raise SweepError(f"{flag} {v!r} is invalid — give {fix}")

    def finite(v):
        return v is not None and math.isfinite(v)

    if a.budget_kimg is not None:
        need(finite(a.budget_kimg) and a.budget_kimg > 0, "--budget-kimg", a.budget_kimg, "a positive budget in kimg")
    if a.trial_seconds is not None:
        need(finite(a.trial_seconds) and a.trial_seconds > 0, "--trial-seconds", a.trial_seconds,
             "a positive number of seconds")
    if a.stage1_kimg is not None:
        need(finite(a.stage1_kimg) and a.stage1_kimg >= 0, "--stage1-kimg", a.stage1_kimg, "kimg >= 0 (0: no stage 1)")
    need(a.trials_per_target is None or a.trials_per_target >= 1, "--trials-per-target", a.trials_per_target,
         "at least 1")
    need(a.max_concurrent >= 0, "--max-concurrent", a.max_concurrent, "a number of trials >= 0 (0: as resources allow)")
    need(a.workers_per_trial >= 1, "--workers-per-trial", a.workers_per_trial, "at least 1")
    need(finite(a.cpus_per_worker) and a.cpus_per_worker > 0, "--cpus-per-worker", a.cpus_per_worker, "CPUs > 0")
    need(finite(a.gpus_per_worker) and a.gpus_per_worker >= 0, "--gpus-per-worker", a.gpus_per_worker, "GPUs >= 0")
    need(finite(a.ua_threshold) and 0 <= a.ua_threshold <= 1, "--ua-threshold", a.ua_threshold, "a UA in [0, 1]")
    if a.max_asr is not None:
        need(finite(a.max_asr) and 0 <= a.max_asr <= 1, "--max-asr", a.max_asr, "an attack success rate in [0, 1]")
        if a.attack == "off":
            raise SweepError(f"--max-asr {a.max_asr} needs the attack's figures, but --attack is off — drop --attack "
                             f"off or name an attack (continuous, discrete, all)")
    need(finite(a.max_override_fd_ratio) and a.max_override_fd_ratio > 0, "--max-override-fd-ratio",
         a.max_override_fd_ratio, "a ratio > 0")
    need(finite(a.stop_ua_kimg) and a.stop_ua_kimg >= 0, "--stop-ua-kimg", a.stop_ua_kimg, "kimg >= 0")
    for flag, key in (("--grace-kimg", "grace_kimg"), ("--reduction-factor", "reduction_factor")):
        # None: not yet resolved from the search space (apply_budget); False: off by flag or by the space
        if getattr(a, key) is not None and a.early_stop is False:
            raise SweepError(f"{flag} {getattr(a, key)} sets the per-target early stopping, which is off — add "
                             f"--early-stop, or drop {flag}")
    if a.early_stop:                  # (filled in once: the checks run again on the resolved arguments)
        a.grace_kimg = 2.0 if a.grace_kimg is None else a.grace_kimg
        a.reduction_factor = 3.0 if a.reduction_factor is None else a.reduction_factor
        need(finite(a.grace_kimg) and a.grace_kimg > 0, "--grace-kimg", a.grace_kimg, "a positive number of kimg")
        need(finite(a.reduction_factor) and a.reduction_factor > 1, "--reduction-factor", a.reduction_factor,
             "a number > 1 (3 keeps the best third at each rung)")
    need(a.warm_starts is None or a.warm_starts >= 0, "--warm-starts", a.warm_starts,
         "a count >= 0 (0: no warm starts)")
    need(finite(a.stop_ua_min) and 0 <= a.stop_ua_min <= 1, "--stop-ua-min", a.stop_ua_min, "a UA in [0, 1]")
    need(a.fresh_seed >= -1, "--fresh-seed", a.fresh_seed, "a seed >= 0, or -1 to skip the fresh re-evaluation")
    need(a.seed >= 0, "--seed", a.seed, "a seed >= 0")
    if a.num_cpus is not None:
        need(a.num_cpus >= 1, "--num-cpus", a.num_cpus, "at least 1 CPU")
    need(a.max_failures >= -1, "--max-failures", a.max_failures, "restarts >= 0, or -1 for no limit")
    try:
        a.trial_runner = resolve_runner(a.trial_runner, a.workers_per_trial)
        a.method_list = parse_methods(a.methods)
    except ValueError as e:
        raise SweepError(str(e)) from None
    baselines = [m for m in a.method_list if m != "sfd"]
    if baselines and a.workers_per_trial > 1:
        raise SweepError(f"--methods {','.join(baselines)}: the baselines run in one process per trial, got "
                         f"--workers-per-trial {a.workers_per_trial} — use 1, or sweep them in a sweep of their own")
    if a.resume and a.overwrite:
        raise SweepError("--resume and --overwrite contradict each other — give one of them")


def resolve(a):
    """Validate everything a sweep needs before any trial starts; return (targets, spaces, overrides)."""


    file_targets = load_targets_file(a.targets_file) if getattr(a, "targets_file", None) else []
    names = [t.preset for t in file_targets[:1]]
    for spec in a.targets or []:
        # sd targets are phrases with spaces ('sd:brad pitt->a middle aged man'): one target per argument
        for part in [spec] if spec.strip().startswith("sd:") else spec.split():
            name = preset_of(part.strip())
            try:
                get_preset(name)                   # unknown preset: error listing the valid ones
            except ValueError as e:
                raise ValueError(f"--targets: {e}") from None
            if name not in names:
                names.append(name)
    given = load_space(a.space) if a.space else None
    if given is not None and given.preset not in names:
        raise SweepError(f"--space {a.space} is a search space for preset '{given.preset}', but the targets are of "
                         f"{', '.join(repr(n) for n in names)} — give a space of that preset (e.g. "
                         f"{space_path(names[0])}) or targets of '{given.preset}'")
    spaces = {n: given if given is not None and given.preset == n else load_space(space_path(n)) for n in names}
    targets = parse_targets(a.targets, a.override or spaces[names[0]].override) if a.targets else []
    targets += file_targets
    if len({t.name for t in targets}) != len(targets):
        raise ValueError("a target is listed twice (--targets and --targets-file together) — list it once")
    if a.max_asr is not None:
        blind = [t.name for t in targets if not get_task(t.preset).attacks_for(t.forget)]
        if blind:
            raise SweepError(f"--max-asr {a.max_asr}: no attack gives an attack success rate for {', '.join(blind)} "
                             f"(nudity is judged by NudeNet, which has no gradient to attack), so every trial of it "
                             f"would be infeasible — sweep it without --max-asr (--attack still measures its residue)")
    a.method_list = getattr(a, "method_list", None) or parse_methods(getattr(a, "methods", "sfd"))
    targets = with_methods(targets, a.method_list)
    overrides = {"seed": a.seed}
    attack = a.attack or ("all" if a.max_asr is not None else "off")
    if attack != "off":
        overrides["attack"] = attack
    if a.trial_seconds is not None:
        overrides["max_seconds"] = a.trial_seconds
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
    if real and not get_task(real[0]).uses_fetched_assets():
        get_task(real[0]).check_sweep_files(files, targets)    # sd: the pipeline folder, CLIP for concept targets
    elif real:
        paths, missing = assets.resolve(real[0], files)
        if missing:
            raise ValueError("the sweep optimises UA and FD, so " +
                             assets.missing_message(real[0], missing, "a teacher and a judge") +
                             f"\n(`sfd fetch {real[0]}` downloads the public ones; `sfd fetch {real[0]} --list` "
                             f"shows every file)")
        overrides.update({k: str(v) for k, v in paths.items()})
    validate_plan(targets, spaces, overrides)       # every target x defaults x bounds/choices
    return targets, spaces, overrides


def print_plan(a, targets, spaces, overrides) -> None:
    """What the sweep would run, with every file it would read."""

    n = total_trials(targets, spaces, a.trials_per_target)
    units = f"{len(targets)} target(s)" if a.method_list == ["sfd"] else \
        f"{len(targets) // len(a.method_list)} target(s) x {len(a.method_list)} methods ({', '.join(a.method_list)})"
    print(f"[sweep] plan: {units} x {a.trials_per_target} trials = {n} trials; out: {a.out}")
    where = "in the Tune trial's process" if a.trial_runner == "tune" else "as Ray Train jobs"
    print(f"  trials: {a.workers_per_trial} worker(s) each, run {where} (--trial-runner {a.trial_runner})")
    if a.trial_seconds is not None:
        print(f"  every trial of every method: at most {a.trial_seconds:g} s of training (--trial-seconds)")
    for t in targets:
        extra = spaces[t.preset].by_override.get(t.override)
        n_t = trials_for(spaces, t, a.trials_per_target)
        print(f"  target {t.name}" + (f" (its policy's defaults: {extra})" if extra else "")
              + (f" ({n_t} trial: methods.{t.method} searches nothing)" if n_t != a.trials_per_target else ""))
    for name, space in spaces.items():
        for method in a.method_list:
            sp = space.for_method(method)
            base = sp.baseline().replace(**{k: v for k, v in overrides.items() if k != "seed"})
            label = name if method == "sfd" else f"{name} [{method}]"
            print(f"  space {label}: {sp.source or '(given)'}; searches {', '.join(sorted(sp.params)) or 'nothing'}; "
                  f"budget {base.budget_kimg:g} kimg per trial")
        if get_preset(name).embedded:
            print(f"  files {name}: bundled teacher and judge ({get_preset(name).weights_dir})")
            continue
        for key in ("teacher", "classifier", "fid_weights", "reference"):
            v = getattr(base, key)
            ok = "ok" if v and Path(v).exists() else "MISSING"
            print(f"  {key:12s} [{ok}] {v}")
    flags = {k for k in overrides if k in ("seed", "budget_kimg", "max_seconds") or getattr(a, k, None)}
    flag_of = {"max_seconds": "--trial-seconds"}

    def layer(k: str) -> str:
        if k == "attack" and not a.attack:
            return "--max-asr (implies --attack all)"
        return flag_of.get(k, f"--{k.replace('_', '-')}") if k in flags else "the $SFD_HOME cache (sfd fetch)"
    print("\n".join(describe_baselines(targets, spaces, overrides, layer)))
    print(f"  {search_policy_line(a)}")
    print("[sweep] dry run: nothing started (models are loaded and checked when the sweep runs)")


def total_trials(targets, spaces, trials_per_target: int) -> int:
    """Trials of the whole sweep: each target's (per method, orchestration.space.trials_for)."""
    return sum(trials_for(spaces, t, trials_per_target) for t in targets)


def check_models(targets, spaces, overrides) -> None:
    """Load each preset's teacher and judge once on the driver: a bad path fails now."""

    for name in sorted({t.preset for t in targets}):
        preset, task = get_preset(name), get_task(name)
        base = spaces[name].baseline().replace(**{k: v for k, v in overrides.items()
                                                  if k in ("teacher", "classifier", "fid_weights", "reference")})
        task.load_teacher(base.teacher, allow_download=base.allow_download)             # a bad teacher fails now
        if not task.can_evaluate(base):
            raise ValueError(f"the sweep optimises UA and FD, so preset '{name}' needs --classifier (ResNet-34), "
                             f"--fid-weights (FID Inception) and --reference (real images per class)")
        task.load_judge(base)
        if base.reference:
            check_reference(base.reference, preset)
        # [cluster] the teacher's reference samples are made by Ray tasks in run_sweep (orchestration/reference.py)


class HopelessTrialStopper:
    """Tune scheduler logic: stop trials whose metrics went non-finite or whose UA is not rising."""

    def __init__(self, ua_kimg: float, ua_min: float):
        self.ua_kimg, self.ua_min = ua_kimg, ua_min
        self.stopped: dict[str, str] = {}

    def verdict(self, result: dict, method: str = "sfd") -> str | None:
        for k in ("fd_remaining", "loss_generator", "loss_fake_score", "loss"):
            v = result.get(k)
            if v is not None and not math.isfinite(v):
                return f"{k} is {v}"
        # a baseline reports once, at its end (sfd/methods/finetune.py): nothing is left to save by stopping it
        if method == "sfd" and result.get("kimg", 0) >= self.ua_kimg and "ua" in result and result["ua"] < self.ua_min:
            return f"UA {result['ua']:.3f} < {self.ua_min} after {result['kimg']:.1f} kimg"
        return None


def make_scheduler(stopper: HopelessTrialStopper, halving=None):
    """The sweep's Tune scheduler: the hopeless-trial stop, then (with ``halving``, an
    orchestration.pruning.PerTargetHalving) the per-target early stopping of SFD trials. Either one's
    reason goes into ``stopper.stopped`` (trials.parquet's note, the MLflow tag stop_reason)."""
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    class SweepScheduler(FIFOScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            method = trial.config.get("method", "sfd")
            why = stopper.verdict(result, method)
            budget = float(trial.config.get("sfd", {}).get("budget_kimg", math.inf))
            # a baseline method reports once, at its end; a report at the budget's end stops nothing
            if not why and halving is not None and method == "sfd" and result.get("kimg", math.inf) < 0.99 * budget:
                why = halving.on_result(trial.trial_id, trial.config["target"], bool(trial.config.get("baseline")),
                                        budget, result)
            if why:
                stopper.stopped[trial.trial_id] = why
                print(f"[sweep] stopping trial {trial.trial_id} ({trial.config.get('target')}): {why}", flush=True)
                return TrialScheduler.STOP
            return TrialScheduler.CONTINUE

    return SweepScheduler()


class Progress:
    """What a person follows: trials and targets done, best so far per target."""

    def __init__(self, targets, trials: dict, ua_threshold: float):
        self.total = {t.name: trials[t.name] for t in targets}
        self.done = {t.name: 0 for t in targets}
        self.best: dict[str, tuple[float, float]] = {}
        self.ua_threshold = ua_threshold
        self.t0 = time.time()

    def restored(self, done: dict) -> None:
        """A resumed sweep: the trials that ended before the interruption count as done."""
        for name, n in done.items():
            if name in self.done:
                self.done[name] = n

    def __call__(self, event: str, trial, result):
        if event == "result":
            return
        name = trial.config["target"]
        self.done[name] += 1
        r = result or {}
        ua, fd = r.get("ua", math.nan), r.get("fd_ratio", math.nan)
        # a trial stopped early reports figures from part of its budget: not a "best so far"
        if event == "finished" and ua >= self.ua_threshold and (name not in self.best or fd < self.best[name][1]):
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

    out = Path(a.out)
    record = read_record(out)
    refuse_live_driver(out, record, "--summarize-only")      # its tables are written when it ends
    settled = settle_dead_driver(out, record, a.experiment)  # a killed driver's runs left RUNNING: KILLED
    if settled:
        print(settled, flush=True)
    if not (out / "trials.parquet").is_file():
        return _error(f"{out / 'trials.parquet'} does not exist — " + (
            "the sweep was stopped before it wrote its tables: continue it with --resume" if record else
            "run the sweep first"))
    try:
        rows = pd.read_parquet(out / "trials.parquet").to_dict("records")
    except (OSError, ValueError) as e:                   # pyarrow's ArrowInvalid is a ValueError
        return _error(f"{out / 'trials.parquet'} is damaged ({type(e).__name__}: {e}) — run the same sweep with "
                      f"--resume to write the tables again from Tune's experiment state (move the damaged file aside)")
    # a sweep from before --methods has no method column: its trials are SFD's
    units = list(dict.fromkeys((r["target"], r.get("method") or "sfd") for r in rows))
    parsed = {t.name: t for t in parse_targets(list(dict.fromkeys(name for name, _ in units)), "next")}
    targets = [replace(parsed[name], method=method) for name, method in units]
    with COSTS.phase("summarise"):       # here the fresh re-evaluations run on this process (no Ray)
        df = summarise(rows, targets, out, a.ua_threshold, a.max_override_fd_ratio, max_asr=a.max_asr,
                       fresh_seed=None if a.fresh_seed < 0 else a.fresh_seed)
    COSTS.write(out, "driver_costs_summarize_only.json", trials=len(rows), targets=len(targets))
    print((out / "summary.md").read_text())
    return 0 if (df["best_trial"] != "").all() else 1


def apply_budget(a, spaces=None) -> None:
    """Trials per target unless --trials-per-target was given: the spaces' ``trials_per_target`` (the
    largest when several presets are swept; 3 without spaces), 3x with --budget long (4x the kimg:
    resolve)."""
    if a.trials_per_target is None:
        base = max((s.trials_per_target for s in (spaces or {}).values()), default=3)
        a.trials_per_target = 3 * base if a.budget == "long" else base
    apply_search_policy(a, spaces)


def apply_search_policy(a, spaces=None) -> None:
    """The early stopping and warm starts unless a flag set them: the swept spaces' ``early_stop`` and
    ``warm_starts`` (on when any swept space turns it on, with the first such space's rungs; the largest
    warm-start count)."""
    spaces = list((spaces or {}).values())
    if a.early_stop is None:
        policies = [s.early_stop for s in spaces if s.early_stop]
        a.early_stop = bool(policies)
        if policies:
            if a.grace_kimg is None:
                a.grace_kimg = policies[0]["grace_kimg"]
            if a.reduction_factor is None:
                a.reduction_factor = policies[0]["reduction_factor"]
    if a.warm_starts is None:
        a.warm_starts = max((s.warm_starts for s in spaces), default=0)


# the per-target early stopping's rungs and reasons (orchestration/pruning.py), kept for --resume
EARLY_STOP_FILE = "early_stop.json"

# what marks a folder as holding a sweep (anything else in --out is left alone)
SWEEP_MARKERS = (SWEEP_FILE, "trials.parquet", "summary.parquet", "trials", "optuna.db", "mlflow.db", "ray")


def _error(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def sweep_plan_key(a, targets) -> dict:
    """What a resumed sweep must share with the one it continues (the search policy too: the space's default
    may have changed since the sweep started)."""
    return {"targets": [t.name for t in targets], "trials_per_target": a.trials_per_target, "seed": a.seed,
            "trial_runner": a.trial_runner,
            "early_stop": [a.grace_kimg, a.reduction_factor] if a.early_stop else None,
            "warm_starts": a.warm_starts}



def claim_out(a, targets, dry_run: bool = False) -> dict:
    """Decide what this sweep does with --out, before anything starts: a fresh folder gets a new
    sweep record; a folder holding another sweep is refused unless --resume (same plan: continue
    it) or --overwrite (moved aside to <out>.old-<timestamp>, never deleted). Returns the record."""
    out = Path(a.out).resolve()
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out} is a file, not a folder — give a folder path for the sweep")
    held = [m for m in SWEEP_MARKERS if (out / m).exists()]
    if held and (a.resume or a.overwrite) and not dry_run:
        refuse_live_driver(out, read_record(out), "--resume" if a.resume else "--overwrite")
    key = sweep_plan_key(a, targets)
    fresh = {"kind": "sfd-sweep", "sweep_id": uuid.uuid4().hex[:12], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             **key, "status": "new", "parent_run_id": None}
    if not held:
        if a.resume:
            print(f"[sweep] --resume: {out} holds no sweep yet; starting a new one", flush=True)
        return fresh
    if a.overwrite:
        aside = aside_path(out)
        print(f"[sweep] --overwrite: the sweep in {out} {'would be' if dry_run else 'is'} moved aside to {aside}",
              flush=True)
        return {**fresh, "_move_aside": str(aside)}       # moved when the sweep starts (run_sweep)
    try:
        rec = folder_record(out / SWEEP_FILE, "sfd-sweep")
    except ValueError as e:
        raise SweepError(str(e)) from None
    if not a.resume:
        what = f"sweep {rec['sweep_id']} ({' '.join(rec['targets'])}, {rec.get('status')})" if rec else \
            f"an earlier sweep ({', '.join(held)})"
        raise SweepError(f"--out {out} already holds {what} — pass --resume to continue it, --overwrite to move it "
                         f"aside to {out.name}.old-<timestamp>, or choose another --out")
    if rec is None:
        raise SweepError(f"--resume: {out} holds an earlier sweep ({', '.join(held)}) without a {SWEEP_FILE}, so it "
                         f"cannot be resumed — pass --overwrite to move it aside, or choose another --out")
    planned = {"trial_runner": "train", **rec}   # a record from before --trial-runner ran trials on Ray Train
    # (a record from before the search policy was recorded is not compared on it)
    changed = [f"{k}: {planned.get(k)!r} in {out.name} vs {v!r} now" for k, v in key.items()
               if planned.get(k) != v and (k in planned or k not in ("early_stop", "warm_starts"))]
    if changed:
        raise SweepError(f"--resume: the sweep in {out} was planned differently ({'; '.join(changed)}) — resume it "
                         f"with its own --targets/--trials-per-target/--seed/--trial-runner (early_stop: "
                         f"--early-stop --grace-kimg G --reduction-factor R, or --no-early-stop; --warm-starts), "
                         f"or choose another --out")
    check_stores(out)
    return rec


def check_stores(out: Path) -> None:
    """--resume: the stores a sweep continues must open -- the Optuna studies, the MLflow file, the
    tables. A damaged one is named, with the way out, before anything changes: the sweep never
    silently starts over (a fresh optuna.db would re-run the baselines) or tracks into a broken file."""
    for name in ("optuna.db", "mlflow.db"):
        path = out / name
        if not path.exists():
            continue
        try:
            con = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True)
            try:
                found = [str(r[0]) for r in con.execute("PRAGMA quick_check")]
            finally:
                con.close()
            if found != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(found[:3]))
        except sqlite3.Error as e:
            raise SweepError(f"--resume: {path} is damaged (SQLite: {e}) — restore it from a backup, or start over with "
                             f"--overwrite (the old sweep is moved aside to {out.name}.old-<timestamp>, not deleted)") from None
    for name in ("trials.parquet", "summary.parquet"):
        path = out / name
        if path.exists():
            import pyarrow.parquet as pq
            try:
                pq.ParquetFile(path).read()
            except (OSError, ValueError) as e:           # pyarrow's ArrowInvalid is a ValueError
                raise SweepError(f"--resume: {path} is damaged ({type(e).__name__}: {e}) — move it aside (--resume "
                                 f"writes the tables again from Tune's experiment state), then resume") from None


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.summarize_only and a.sequential:
        return _error("--summarize-only re-ranks one sweep's trials.parquet; a chain's stages are sweeps of their own — "
                      "run it on a stage's folder (--out OUT/stage<k>-<target>) without --sequential")
    if a.summarize_only:
        try:
            return summarize_only(a)
        except (ValueError, CheckpointError) as e:
            return _error(str(e))
    if not a.targets and not a.targets_file:
        return _error("--targets is required — give forget targets, e.g. --targets all_digits_classes")
    if a.sequential:
        return sequential(a)
    if a.no_joint:
        return _error("--no-joint belongs to --sequential (it skips the joint sweep after a chain) — add "
                      "--sequential or drop --no-joint")
    try:
        check_flags(a)
        targets, spaces, overrides = resolve(a)
        apply_budget(a, spaces)
        check_flags(a)
        if not a.reference_cpus > 0 or (a.reference_gpus is not None and not a.reference_gpus >= 0):   # [cluster]
            raise ValueError(f"--reference-cpus must be > 0 and --reference-gpus >= 0, got {a.reference_cpus} and "
                             f"{a.reference_gpus} — give a positive CPU count and a GPU count >= 0")
        if a.dry_run:
            try:
                claim_out(a, targets, dry_run=True)
            except SweepError as e:          # the plan is still worth printing; the run would stop here
                print(f"[sweep] note: the sweep itself would refuse to start: {e}", flush=True)
            print_plan(a, targets, spaces, overrides)
        probe_services(a, targets, overrides)            # [cluster] files, storage, MLflow, Ray: one line each
        if a.dry_run:
            print("[sweep] dry run: every service answers; nothing started")
            return 0
        record = claim_out(a, targets)
        check_models(targets, spaces, overrides)
    except (ValueError, CheckpointError) as e:   # a bad flag, target, space, model or --out: before anything starts
        return _error(str(e))
    return run_sweep(a, targets, spaces, overrides, record)


def sequential(a) -> int:
    """--sequential: the chain planned and checked here, its stages run by orchestration/sequential.py, each as a
    sweep of its own (:func:`sweep_stage`)."""
    try:
        if a.targets_file:
            raise SweepError(f"--sequential takes its stages from --targets, in order; --targets-file "
                             f"{a.targets_file} is not read there — give the concepts as --targets "
                             f"'colordigits:seven->one' 'colordigits:red->blue'")
        if a.methods != "sfd":
            raise SweepError(f"--sequential chains SFD runs (each stage continues the last one's generator); "
                             f"--methods {a.methods} — drop --methods, or sweep the baselines without --sequential")
        check_flags(a)
        first = a.targets[0].split()[0]
        name = preset_of(first)
        get_preset(name)
        space = load_space(a.space) if a.space else load_space(space_path(name))
        stages = plan_chain(a.targets, a.override or space.override, joint=not a.no_joint)
        apply_budget(a, {name: space})
        check_flags(a)
    except (ValueError, CheckpointError) as e:
        return _error(str(e))
    print(f"[chain] {len([s for s in stages if s.index])} stages x {a.trials_per_target} trials"
          + (" + the joint sweep" if not a.no_joint else "") + f"; out: {a.out}", flush=True)
    print("\n".join(describe(stages)), flush=True)
    if a.dry_run:
        print("[chain] dry run: nothing started", flush=True)
        return 0
    try:
        return run_chain(a, stages, sweep_stage)
    except (ValueError, CheckpointError) as e:
        return _error(str(e))


def sweep_stage(a, extra: dict) -> int:
    """One stage of a chain: the sweep of ``a`` (its one target, its folder) with ``extra`` settings on every
    trial (``init_from``: the previous stage's best trial)."""
    try:
        targets, spaces, overrides = resolve(a)
        overrides.update(extra)
        apply_budget(a, spaces)
        check_flags(a)
        record = claim_out(a, targets)
        check_models(targets, spaces, overrides)
    except (ValueError, CheckpointError) as e:
        return _error(str(e))
    return run_sweep(a, targets, spaces, overrides, record)


def probe_services(a, targets, overrides) -> None:
    """[cluster] The files open, --storage is writable, the MLflow server answers, --address is reachable."""

    files = {k: overrides.get(k) for k in ("teacher", "classifier", "fid_weights", "reference")}
    for name in sorted({t.preset for t in targets}):
        if get_preset(name).embedded:
            for f in sorted(get_preset(name).weights_dir.glob("*.safetensors")):
                files[f"{name}_{f.stem}"] = f
    probe_all(mlflow_uri=a.mlflow_uri, address=a.address, storage=a.storage or str(Path(a.out) / "ray"),
              files=files)


def shared_stage1(a, preset_name: str, space, overrides: dict, out: Path) -> Path | None:
    """The preset's stage 1, found by its key (bundled, cached, or in --out) or trained now as its
    own Ray Train job; materialised under OUT/stage1/<key> so every node's trials can read it."""


    kimg = a.stage1_kimg if a.stage1_kimg is not None else space.stage1_kimg
    if a.no_shared_stage1 or not kimg:
        return None
    preset = get_preset(preset_name)
    models = {k: v for k, v in overrides.items() if k in ("teacher", "classifier", "fid_weights", "reference")}
    base = space.baseline()
    cfg = stage1_config(preset_name, kimg, a.seed, **models, eval_forget_samples=base.eval_forget_samples,
                        eval_remain_per_class=base.eval_remain_per_class)
    key = stage1_key(cfg, get_task(preset).load_teacher(cfg.teacher, allow_download=cfg.allow_download))
    dest = out / "stage1" / key
    if is_stage1(dest):
        print(f"[sweep] stage 1 for {preset_name}: {dest} (key {key})", flush=True)
        return dest
    found = find_stage1(key, preset)
    if found is not None and found == bundled_stage1(preset):
        # installed with the package on every node: trials read it in place (no shared path needed)
        print(f"[sweep] stage 1 for {preset_name}: the bundled one, {found} (key {key})", flush=True)
        return found
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
    extra = {"command": "orchestration/sweep.py (shared stage 1)", "wall_seconds": round(time.time() - t0, 1)}
    fingerprint = teacher_fingerprint(get_task(preset).load_teacher(cfg.teacher, allow_download=cfg.allow_download))
    for where in (dest, cache_root() / key):
        export_stage1(dest / "run", where, key, cfg, extra, teacher_fingerprint=fingerprint)
    print(f"[sweep] stage 1 for {preset_name}: done in {time.time() - t0:.0f} s -> {dest}", flush=True)
    return dest


def run_sweep(a, targets, spaces, overrides, record: dict) -> int:
    """plan -> services (signals, MLflow, the record, Ray) -> Tuner(...).fit() -> results."""
    from orchestration.tracking import MLflowSweep, sweep_tracking

    plan = SweepPlan.make(a, targets, record, spaces)
    outcome, tracker, rows, df = Outcome(), None, [], None
    tuned = {}                # what abandon() needs once the Tuner exists: its callback and stopper
    try:
        with SignalGuard() as signals, \
                sweep_tracking(MLflowSweep(plan.mlflow_uri, a.experiment, plan.artifact_root), outcome,
                               *parent_run(a, targets, overrides, record), resume_id=plan.resume_id) as tracker, \
                sweep_record(plan.out, record, outcome, parent_run_id=tracker.parent_id, mlflow_uri=plan.mlflow_uri,
                             experiment=a.experiment, storage=plan.storage, tune_name=plan.tune_name), \
                ray_session(a, clu.runtime_env(plan.storage, local=not a.address), signals) as ray:
            signals.abandon = lambda signum: abandon(a, plan, targets, tracker, record, outcome, signals, **tuned)
            max_conc = announce(a, plan, targets, ray.cluster_resources().get("CPU", 1))
            with COSTS.phase("references"):
                clu.make_references(a, spaces, overrides, plan.storage, log=lambda m: print(m, flush=True))
            for name, space in spaces.items():
                # the baselines fine-tune the teacher itself: a sweep without sfd needs no stage 1
                path = shared_stage1(a, name, space, overrides, plan.out) if "sfd" in a.method_list else None
                # every trial's stage 2 starts from it (or, without one, from copies of the teacher)
                space.defaults = {**space.defaults, "init_from": str(path) if path else "none"}
            with COSTS.phase("make_tuner"):
                tuner, callback, stopper, fresh = make_tuner(a, plan, targets, spaces, overrides, tracker, max_conc)
            tuned.update(callback=callback, stopper=stopper)
            with signals.tune_loop(), COSTS.phase("fit"):
                try:
                    grid = tuner.fit()
                except Interrupted:          # a second signal: Tune's stop not waited for; its trials as held
                    grid = callback.snapshot()
                except SystemError as e:     # the same, raised inside Ray's compiled ray.wait
                    if not interrupted_inside(e):
                        raise
                    grid = callback.snapshot()
            try:
                rows, df = tabulate(a, plan, grid, targets, callback, stopper, signals, tracker, fresh)
            except Interrupted:      # the first signal after Tune returned: the tables again, at once (no fresh
                rows, df = tabulate(a, plan, grid, targets, callback, stopper, signals, tracker)  # re-evaluation)
            outcome.status = "interrupted" if signals.caught else "finished"
            COSTS.write(plan.out, trials=len(rows), targets=len(targets), resumed=plan.resuming)
    except Interrupted:
        pass
    except SystemError as e:
        if not interrupted_inside(e):
            raise
    except (ValueError, CheckpointError) as e:           # a user mistake found late (e.g. stage 1)
        return _error(str(e))
    except OSError as e:                                 # a path that cannot be written
        return _error(f"{type(e).__name__}: {e} — check --out ({plan.out}) and --storage ({plan.storage})")
    return report(a, plan, targets, rows, df, signals.signum, tracker)


def abandon(a, plan, targets, tracker, record: dict, outcome: Outcome, signals, callback=None, stopper=None) -> None:
    """The sweep interrupted with Ray gone (its processes were signalled with the driver) or a second
    signal: what a graceful stop would leave, written without Ray from what the driver holds -- the
    tables from Tune's trials in memory (cut-off ones marked), every run of the sweep KILLED, the
    record ``interrupted``. Optuna's trial of a cut-off Tune trial stays RUNNING: `--resume` continues
    it with its Tune trial (or tells it FAIL when Tune saved no state). Each step runs even if one
    before it failed; a failure is printed (the exit code is 128 + signum either way)."""
    rows = []

    def tables():
        nonlocal rows
        if callback is not None:
            rows, _ = tabulate(a, plan, callback.snapshot(), targets, callback, stopper, signals, tracker)

    def runs():
        outcome.status = "interrupted"
        tracker.end_open_runs("interrupted")
        tracker.finish(tracker.parent_id, "interrupted")

    def rec():
        record["status"] = "interrupted"
        write_record(plan.out, record)

    for what, step in (("the tables", tables), ("the MLflow runs", runs), (SWEEP_FILE, rec)):
        try:
            step()
        except Exception as e:
            print(f"[sweep] could not write {what}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    report(a, plan, targets, rows, None, signals.signum, tracker)


class SweepPlan:
    """Where this sweep keeps what: its folder (a sweep moved aside by --overwrite goes first), the
    storage, the tracking store and the Tune experiment. A resumed sweep keeps its own storage and
    tracking server unless given new ones."""

    def __init__(self, a, targets, record: dict, spaces: dict):
        self.out = Path(a.out).resolve()
        self.resuming = record.get("status") not in (None, "new")
        self.storage = a.storage or (record.get("storage") if self.resuming else None) or str(self.out / "ray")
        self.mlflow_uri = a.mlflow_uri or record.get("mlflow_uri") or f"sqlite:///{self.out / 'mlflow.db'}"
        self.artifact_root = None if a.mlflow_uri else (self.out / "mlartifacts").as_uri()
        self.resume_id = record.get("parent_run_id") if self.resuming else None
        self.tune_name = record.get("tune_name") or f"tune-{record['sweep_id']}"
        self.exp_path = f"{self.storage.rstrip('/')}/{self.tune_name}"
        self.n_trials = total_trials(targets, spaces, a.trials_per_target)

    @classmethod
    def make(cls, a, targets, record: dict, spaces: dict) -> "SweepPlan":
        """The plan, with --out ready: the sweep it held moved aside (--overwrite), the folder made."""
        plan = cls(a, targets, record, spaces)
        aside = record.pop("_move_aside", None)
        if aside:
            os.replace(plan.out, aside)
        plan.out.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        return plan


def parent_run(a, targets, overrides, record) -> tuple[str, dict, dict]:
    """The sweep's MLflow run: its name, params and tags."""
    params = {"targets": " ".join([*(a.targets or []), *([f"--targets-file={a.targets_file}"] if a.targets_file else [])]),
              "trials_per_target": a.trials_per_target, "workers_per_trial": a.workers_per_trial,
              "ua_threshold": a.ua_threshold, "max_failures": a.max_failures,
              **{f"override_{k}": v for k, v in overrides.items()}}
    tags = {"preset": ",".join(sorted({t.preset for t in targets})), "sweep_id": record["sweep_id"],
            **(getattr(a, "mlflow_tags", None) or {})}      # a stage of a chain (--sequential): nested in its run
    return getattr(a, "mlflow_run_name", None) or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}", params, tags


def announce(a, plan: SweepPlan, targets, cpus: float) -> int:
    """Print what runs where; returns the trials run at once."""
    per_trial = a.workers_per_trial * a.cpus_per_worker
    max_conc = a.max_concurrent or max(1, int(cpus // max(per_trial, 1e-9)))
    units = f"{len(targets)} targets" if a.method_list == ["sfd"] else \
        f"{len(targets) // len(a.method_list)} targets x {len(a.method_list)} methods"
    print(f"[sweep] {units} x {a.trials_per_target} trials = {plan.n_trials} trials, up to {max_conc} "
          f"at once ({a.workers_per_trial} worker(s) x {a.cpus_per_worker} CPU, {a.gpus_per_worker} GPU per "
          f"trial, {'in the Tune trial' if a.trial_runner == 'tune' else 'on Ray Train'}); MLflow: {plan.mlflow_uri}",
          flush=True)
    print(f"[sweep] {search_policy_line(a)}", flush=True)
    return max_conc


def search_policy_line(a) -> str:
    """What the early stopping and the warm starts do in this sweep, in one line."""
    stop = "off (--early-stop turns it on)" if not a.early_stop else \
        f"per target from {a.grace_kimg:g} kimg, keeping the best 1/{a.reduction_factor:g} at each rung"
    return f"early stopping: {stop}; warm starts: " + \
        (f"up to {a.warm_starts} per target from the targets before it" if a.warm_starts else "off")


def _rebind_restored(tuner, scheduler, callbacks, pruned: dict | None = None) -> None:
    """Tuner.restore unpickles the scheduler and callbacks of the interrupted run (from tuner.pkl);
    this run's own instances (its MLflow client, its stopper) take their place. Ray 2.60 keeps
    them on the TunerInternal; the callbacks' state comes back through Tune's own
    get_state/set_state. The restored searcher shares this run's early-stopping record (``pruned``),
    whose state comes back from OUT/early_stop.json. These are Ray's private attributes: a Ray without them is
    refused here, by name (tests/test_scale.py pins them), instead of resuming with the interrupted run's stale
    callbacks."""
    import ray

    inner = getattr(tuner, "_local_tuner", None)
    if inner is None or not hasattr(inner, "_tune_config") or not hasattr(inner, "_run_config"):
        raise RuntimeError(f"--resume: Ray {ray.__version__}'s Tuner keeps no _local_tuner._tune_config/_run_config "
                           f"(Ray 2.60 does), so the restored sweep cannot be given this run's MLflow callback and "
                           f"stopper — install the Ray pinned in pyproject.toml")
    inner._tune_config.scheduler = scheduler
    inner._run_config.callbacks = list(callbacks)
    search_alg = getattr(inner._tune_config, "search_alg", None)
    if pruned is not None and search_alg is not None and hasattr(search_alg, "pruned"):
        search_alg.pruned = pruned


def make_tuner(a, plan: SweepPlan, targets, spaces, overrides, tracker, max_conc: int):
    """The Tuner: one Optuna study per target (PerTargetSearch), the hopeless-trial stopper, the
    MLflow callback; restored from the interrupted experiment when resuming. Returns it with the
    callback and the stopper (what happened to each trial)."""
    from ray import tune

    from orchestration.fresh import FreshCallback, FreshJobs
    from orchestration.search import PerTargetSearch
    from orchestration.tracking import MLflowTuneCallback

    halving = None if not a.early_stop else PerTargetHalving(a.grace_kimg, a.reduction_factor, a.ua_threshold,
                                                            path=plan.out / EARLY_STOP_FILE)
    searcher = PerTargetSearch(targets, spaces, a.trials_per_target, overrides, seed=a.seed,
                               ua_threshold=a.ua_threshold, max_asr=a.max_asr,
                               storage=f"sqlite:///{plan.out / 'optuna.db'}", warm_start=a.warm_starts,
                               pruned=halving.pruned if halving is not None else {})
    stopper = HopelessTrialStopper(a.stop_ua_kimg, a.stop_ua_min)
    progress = Progress(targets, {t.name: trials_for(spaces, t, a.trials_per_target) for t in targets},
                        a.ua_threshold)
    callback = clu.storage_callback(MLflowTuneCallback, plan.storage)(   # [cluster] fetches remote trial outputs first
        tracker, {t.name: t for t in targets}, plan.out, on_event=progress, stopped=stopper.stopped)
    scheduler = make_scheduler(stopper, halving)
    callbacks, fresh = [callback], None
    if a.fresh_seed >= 0:
        # each target's best and baseline re-evaluated as Ray tasks once its last trial ends (beside later
        # targets' trials), not on the driver at the end
        fresh = FreshJobs(a.fresh_seed, a.ua_threshold, a.max_override_fd_ratio, a.max_asr, plan.storage,
                          num_cpus=a.cpus_per_worker, num_gpus=a.gpus_per_worker)
        callbacks.append(FreshCallback(fresh, {t.name: t for t in targets},
                                       {t.name: trials_for(spaces, t, a.trials_per_target) for t in targets},
                                       plan.out, callback.outcome))
    sweep_cfg = {"out": str(plan.out), "storage": plan.storage, "workers_per_trial": a.workers_per_trial,
                 "cpus_per_worker": a.cpus_per_worker, "gpus_per_worker": a.gpus_per_worker,
                 "max_failures": a.max_failures, "trial_runner": a.trial_runner,
                 # comparing methods: each trial measures its sampler's images/s (the per-method table)
                 "measure_speed": a.method_list != ["sfd"],
                 **clu.trial_config(a, plan.storage, plan.out)}      # [cluster]
    # --trial-runner train: the trial function only drives its Ray Train job, whose workers hold the
    # resources; tune: the trial's own process trains and holds them
    trainable = tune.with_resources(run_trial, tune.PlacementGroupFactory(
        [trial_resources(a.trial_runner, a.cpus_per_worker, a.gpus_per_worker)]))
    if plan.resuming and tune.Tuner.can_restore(plan.exp_path):
        print(f"[sweep] --resume: restoring the Tune experiment {plan.exp_path}", flush=True)
        # unfinished trials continue (each from its Ray Train checkpoint); failed ones stay failed
        tuner = tune.Tuner.restore(plan.exp_path, trainable=trainable, param_space={"sweep": sweep_cfg},
                                   resume_unfinished=True, resume_errored=False, restart_errored=False)
        _rebind_restored(tuner, scheduler, callbacks, halving.pruned if halving is not None else None)
        return tuner, callback, stopper, fresh
    if plan.resuming and searcher.fail_running():
        print("[sweep] --resume: no Tune state was saved; the trials it had asked for start again", flush=True)
    # in the trial's process, Tune itself keeps the two newest checkpoints and retries a failed trial
    in_tune = a.trial_runner == "tune"
    tuner = tune.Tuner(
        trainable, param_space={"sweep": sweep_cfg},
        # reuse_actors: a finished trial's process runs the next trial, so each trial does not pay a
        # fresh process and its imports (with --trial-runner tune: torch, sfd and the loop's own) -- except
        # where Tune retries trials: a kill as a reused process starts a trial would end it (trial.reuse_actors)
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=plan.n_trials,
                                    max_concurrent_trials=max_conc,
                                    reuse_actors=reuse_actors(a.trial_runner, a.max_failures)),
        run_config=tune.RunConfig(name=plan.tune_name, storage_path=plan.storage, callbacks=callbacks,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2) if in_tune else None,
                                  failure_config=tune.FailureConfig(max_failures=a.max_failures) if in_tune else None,
                                  verbose=0),
    )
    return tuner, callback, stopper, fresh


def tabulate(a, plan: SweepPlan, grid, targets, callback, stopper, signals, tracker, fresh=None):
    """Tune's results -> the trial table, the per-target summary (and its MLflow runs), the parent
    run's figures. An interrupted sweep writes its tables at once (no fresh re-evaluation; --resume
    does it). ``fresh`` (orchestration.fresh.FreshJobs): the fresh re-evaluations already submitted as Ray
    tasks; those of targets not submitted yet are submitted now, and all are collected before the
    summary, which then only reads them. Returns the trial rows and the summary."""
    from orchestration.results import summarise, trial_rows
    from orchestration.search import trial_owners
    from orchestration.tracking import log_sweep_summary

    notes = dict(stopper.stopped)
    if signals.caught:
        why = f"cut off by {signal.Signals(signals.signum).name}"
        notes.update({tid: why for tid in callback.started - set(callback.outcome)})
    with COSTS.phase("after_fit"):
        clu.after_fit(a, grid, targets, plan.storage, plan.out)      # [cluster] remote trial outputs -> OUT/trials
    with COSTS.phase("trial_owners"):
        owners = trial_owners(f"sqlite:///{plan.out / 'optuna.db'}") if (plan.out / "optuna.db").is_file() else {}
    with COSTS.phase("trial_rows"):
        rows = trial_rows(grid, {t.name: t for t in targets}, plan.out, callback.outcome, callback.errors,
                          notes=notes, owners=owners)
    fresh_seed = None if (a.fresh_seed < 0 or signals.caught) else a.fresh_seed
    if fresh is not None and fresh_seed is not None:
        with COSTS.phase("fresh_wait"):
            by_unit: dict = {}
            for r in rows:
                by_unit.setdefault(unit_name(r["target"], r.get("method") or "sfd"), []).append(r)
            for t in targets:
                if t.name not in fresh.submitted_units:
                    fresh.submit(t.name, by_unit.get(t.name, []))
            fresh.gather()
    with COSTS.phase("summarise"):
        df = summarise(rows, targets, plan.out, a.ua_threshold, a.max_override_fd_ratio, tracker, max_asr=a.max_asr,
                       fresh_seed=fresh_seed)
    clu.publish_tables(a, plan.storage, plan.out)                    # [cluster] results tables -> <storage>/results
    with COSTS.phase("log_summary"):
        log_sweep_summary(tracker, df, len(rows), plan.out)
        if plan.resuming and not signals.caught:
            tracker.mark_superseded(r["trial_id"] for r in rows)
    return rows, df


def report(a, plan: SweepPlan, targets, rows, df, signum, tracker) -> int:
    """What the sweep says at its end, and its exit code: 0 every target ran, 1 a target had no
    trial start or every trial fail, 128 + signal when interrupted."""
    out = plan.out
    if signum is not None:
        sig = signum or signal.SIGINT
        done = sum(r["status"] in ("finished", "stopped") for r in rows)
        print(f"[sweep] interrupted by {signal.Signals(sig).name}: {done}/{plan.n_trials} "
              f"trials finished; tables in {out}; continue with the same command and --resume", file=sys.stderr)
        return 128 + int(sig)
    print()
    print((out / "summary.md").read_text())
    several = a.method_list != ["sfd"]
    if several:
        print((out / "methods.md").read_text())
    print(f"[sweep] outputs in {out}: trials.parquet, summary.md/.parquet, " + ("methods.md/.parquet, " if several else "")
          + "pareto/*.png, best/*/generator.safetensors" + (" (ESD, SA, SalUn: model.safetensors)" if several else ""))
    print(f"[sweep] MLflow UI: mlflow ui --backend-store-uri {plan.mlflow_uri}")
    ui = plan.mlflow_uri if plan.mlflow_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    print(f"[sweep] MLflow runs table: {tracker.runs_view_url(ui)}")
    df = df.assign(target=[unit_name(t, m) for t, m in zip(df["target"], df.get("method", ["sfd"] * len(df)))])
    missing = df[(df["best_trial"] == "") & (df["state"] == "done")]["target"].tolist()
    if missing:
        print(f"[sweep] no trial reached UA >= {a.ua_threshold} for: {', '.join(missing)} "
              f"(try --budget long)", file=sys.stderr)
    not_started = df[df["state"] == "not_started"]["target"].tolist()
    if not_started:
        print(f"[sweep] no trial started for: {', '.join(not_started)}", file=sys.stderr)
    failed_targets = df[df["state"] == "failed"]["target"].tolist()
    if failed_targets:
        print(f"[sweep] every trial failed for: {', '.join(failed_targets)}; see trials.parquet 'error'", file=sys.stderr)
    return 1 if failed_targets or not_started else 0


if __name__ == "__main__":
    sys.exit(main())
