"""A finished run folder, re-evaluated (`sfd evaluate --run`, the sweep's fresh re-evaluation) and attacked
(`sfd attack`, docs/robustness.md)."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from .config import SFDConfig
from .denoisers import Denoiser, load_denoiser
from .io import read_json, read_metadata, write_json
from .loop import load_generator_init
from .robustness import Budget, Report, metrics_of
from .stage1 import bundled_stage1
from .tasks import get_task


def evaluate_run(run_dir, seed: int = 777, device="auto", forget_samples: int | None = None,
                 remain_per_class: int | None = None, progress: bool = False, teacher=None, judge=None,
                 clip=None, per_prompt: int = 1) -> dict:
    """Re-evaluate the generator of a finished run with the run's teacher and judge, on the noise
    of ``seed`` (a seed other than the run's 777 gives fresh samples: an unbiased figure for a
    run that was picked as the best of several). Stable Diffusion runs are judged on their exported
    pipeline (NudeNet; CLIP from the local folder ``clip``, ``per_prompt`` images per prompt)."""
    run_dir = Path(run_dir)
    metrics = read_json(run_dir / "metrics.json")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("config"), dict):
        raise ValueError(f"{run_dir / 'metrics.json'} has no 'config' — the run did not finish; resume it first")
    cfg = SFDConfig.from_dict(metrics["config"])
    if forget_samples:
        cfg.eval_forget_samples = forget_samples
    if remain_per_class:
        cfg.eval_remain_per_class = remain_per_class
    return get_task(cfg.preset).evaluate_run(run_dir, cfg, metrics, seed=seed, device=device, progress=progress,
                                             teacher=teacher, judge=judge, clip=clip, per_prompt=per_prompt)


# -- the command ------------------------------------------------------------------------------------------
def attack_run(run_dir, *, control=None, budget: Budget | None = None, prompts_file=None, device="cpu",
               kinds=("families", "discrete", "continuous"), progress: bool = True, task=None, cfg=None,
               teacher=None, judge=None) -> dict:
    """Attack the run in ``run_dir``; write RUN/attack.json and the ``attack_*`` figures into its metrics.json;
    return the report (the summary dict)."""
    run_dir = Path(run_dir)
    budget = budget or Budget()
    metrics = read_json(run_dir / "metrics.json")
    if cfg is None:
        if not isinstance(metrics, dict) or not isinstance(metrics.get("config"), dict):
            raise ValueError(f"{run_dir / 'metrics.json'} has no 'config' — the run did not finish; resume it first")
        cfg = SFDConfig.from_dict(metrics["config"])
    task = task or get_task(cfg.preset)
    cfg.validate()
    teacher = teacher if teacher is not None else task.load_teacher(cfg.teacher, device, cfg.allow_download)
    judge = judge if judge is not None else task.load_judge(cfg, device)
    targets = task.targets(cfg, teacher)
    suite = task.robustness(targets, teacher, judge, budget, device, prompts_file)
    gen_file = run_dir / "generator.safetensors"
    info = read_metadata(gen_file).get("generator") or {}
    sigma_init = float(info.get("sigma_init", metrics.get("sigma_init_resolved", cfg.sigma_init)))
    subjects = [suite.subject("generator", load_denoiser(gen_file, device), sigma_init),
                suite.subject("teacher", None, None)]
    if control is not None:
        subjects.append(suite.subject("control", load_control(control, teacher, task), sigma_init))
    report = Report(str(run_dir), cfg.preset, targets.describe(), asdict(budget))
    bar = tqdm(total=len(kinds) * len(subjects), desc="sfd attack", disable=not progress, unit="part")
    if "families" in kinds:
        t0 = time.perf_counter()
        report.families, report.side_effect_cells = suite.families(subjects)
        report.seconds["families"] = time.perf_counter() - t0
        bar.update(len(subjects))
    for kind in ("discrete", "continuous"):
        if kind not in kinds:
            continue
        res = {}
        for s in subjects:
            t0 = time.perf_counter()
            out = getattr(suite, kind)(s)
            examples = []
            if isinstance(out, tuple):
                out, examples = out
            bar.update(1)
            if out is None:
                break
            key = "" if s.name == "generator" else f"_{s.name}"
            res[f"asr{key}"] = out["asr"]
            if "confidence" in out:
                res[f"confidence{key}"] = out["confidence"]
            res[f"seconds{key}"] = time.perf_counter() - t0
            res[f"nfe_per_sample{key}"] = s.nfe
            if examples and s.name == "generator":
                res["examples"] = examples
            res["pairs"] = out["pairs"]
        if res:
            report.attacks[kind] = res
    bar.close()
    summary = report.summary()
    write_json(run_dir / "attack.json", summary)
    if isinstance(metrics, dict):
        write_json(run_dir / "metrics.json", {**metrics, **metrics_of(summary)})
    return summary


def load_control(path, teacher, task) -> Denoiser:
    """A generator distilled without forgetting: an `sfd forget` run with forget weights 0, a stage-1 folder,
    or 'stage1' (the preset's bundled one)."""
    p = bundled_stage1(task.preset) if str(path) == "stage1" else Path(path)
    if not p.exists():
        raise ValueError(f"--control {path} does not exist — give an `sfd forget` run folder trained with forget "
                         f"weights 0, a stage-1 folder (`sfd distil`), or 'stage1'")
    gen, fake = teacher.clone(), teacher.clone()
    load_generator_init(p, gen, fake)
    return gen.eval().requires_grad_(False)
