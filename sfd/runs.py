"""A finished run folder, re-evaluated (`sfd evaluate --run`, the sweep's fresh re-evaluation) or attacked
(`sfd attack RUN`, sfd.robustness)."""
from __future__ import annotations

from pathlib import Path

from .config import SFDConfig
from .io import read_json, write_json
from .methods.common import SAMPLER_STEPS
from .methods.finetune import evaluate_baseline, load_baseline_model
from .robustness import ATTACK_KEYS, ATTACK_KINDS, Budget, Sampler, Subject, judge_fingerprint, measure
from .tasks import get_task
from .utils import pick_device


def evaluate_run(run_dir, seed: int = 777, device="auto", forget_samples: int | None = None,
                 remain_per_class: int | None = None, progress: bool = False, teacher=None, judge=None,
                 clip=None, per_prompt: int = 1, fd_draws: int | None = None) -> dict:
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
    if fd_draws:
        cfg.eval_fd_draws = fd_draws
    if cfg.method != "sfd":                   # a baseline: its fine-tuned model with the teacher's sampler
        return evaluate_baseline(run_dir, cfg, seed=seed, device=device, progress=progress, teacher=teacher,
                                 judge=judge)
    return get_task(cfg.preset).evaluate_run(run_dir, cfg, metrics, seed=seed, device=device, progress=progress,
                                             teacher=teacher, judge=judge, clip=clip, per_prompt=per_prompt)


def _run_config(run_dir: Path) -> tuple[SFDConfig, dict]:
    metrics = read_json(run_dir / "metrics.json")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("config"), dict):
        raise ValueError(f"{run_dir / 'metrics.json'} has no 'config' — the run did not finish; resume it first")
    return SFDConfig.from_dict(metrics["config"]), metrics


def attack_run(run_dir, *, control=None, attacks=ATTACK_KINDS, families: bool = True, budget: Budget | None = None,
               prompts_file=None, device="cpu", progress: bool = False, write: bool = True, clip=None,
               neighbors=None) -> dict:
    """Measure how well a finished single-target run forgot (sfd.robustness): prompt families, side effects and
    white-box attacks on its generator, with the teacher and an optional ``control`` run (the same target
    distilled with forget weights 0) at the same budget. Writes RUN/attack.json and the summary figures into
    RUN/metrics.json (under ``attack``); returns attack.json's content. Stable Diffusion runs: ``clip`` (a local
    CLIP folder) judges a concept, ``neighbors`` (a file of neighbour concepts) adds side-effect cells."""
    run_dir = Path(run_dir)
    cfg, metrics = _run_config(run_dir)
    task = get_task(cfg.preset)
    task.check_attackable()
    unknown = [a for a in attacks if a not in ATTACK_KINDS]
    if unknown:
        raise ValueError(f"attack kind {', '.join(unknown)} is unknown — give any of {', '.join(ATTACK_KINDS)}")
    budget = budget or Budget()
    notes = [f"{a} attack: preset '{cfg.preset}' has no such attack — it runs {', '.join(task.attacks)} only"
             for a in attacks if a not in task.attacks]
    attacks = [a for a in attacks if a in task.attacks]
    if progress:
        for n in notes:
            print(f"note: {n}", flush=True)
    device = pick_device(device)
    extra = task.read_attack_prompts(prompts_file) if prompts_file else None
    say = (lambda m: print(f"attack: {m}", flush=True)) if progress else None
    teacher = task.load_teacher(cfg.teacher, device, cfg.allow_download)
    judge = task.attack_judge(cfg, device, clip)
    # the anchor term's rows of the prompt table are training's alone: without them the teacher's table (part of
    # its fingerprint, which keys the attack caches) is the same as for a run of the target without the term
    targets = task.targets(cfg.validate(task.preset).replace(lambda_anchor=0.0), teacher)
    suite = task.robustness_suite(targets, judge, budget, teacher, extra, cfg=cfg, neighbors=neighbors)
    t_net = task.attack_teacher(teacher, cfg, targets)
    if cfg.method == "sfd":
        gen, sigma_init = task.run_generator(run_dir, cfg, metrics, device, teacher)
        attacked, sampler_text = Subject("generator", Sampler(gen, sigma_init=sigma_init)), "one step"
    else:      # a baseline's fine-tuned teacher: attacked through the teacher's sampler at the teacher's budget
        net = task.attack_teacher(load_baseline_model(run_dir, cfg, device, teacher), cfg, targets)
        attacked = Subject("generator", Sampler(net, steps=budget.teacher_steps), fast=Sampler(net, steps=SAMPLER_STEPS))
        sampler_text = (f"{cfg.method}'s fine-tuned teacher: {budget.teacher_steps}-step Heun in attacks, "
                        f"{SAMPLER_STEPS}-step Heun for families")
    subjects = {"generator": attacked,
                "teacher": Subject("teacher", Sampler(t_net, steps=budget.teacher_steps),
                                   fast=Sampler(t_net, steps=SAMPLER_STEPS), cached=True, judge=judge_fingerprint(judge))}
    control_info = None
    if control is not None:
        control = Path(control)
        ccfg, cmetrics = _run_config(control)
        if (ccfg.preset, ccfg.teacher) != (cfg.preset, cfg.teacher):
            raise ValueError(f"control run {control} used preset {ccfg.preset!r} / teacher {ccfg.teacher!r}, the "
                             f"attacked run {cfg.preset!r} / {cfg.teacher!r} — a control must share the teacher")
        cgen, csigma = task.run_generator(control, ccfg, cmetrics, device, teacher)
        subjects["control"] = Subject("control", Sampler(cgen, sigma_init=csigma))
        control_info = {"run": str(control), "lambda_gen_forget": ccfg.lambda_gen_forget,
                        "lambda_fake_forget": ccfg.lambda_fake_forget}
    for n in getattr(suite, "notes", []):
        notes.append(n)
        if progress:
            print(f"note: {n}", flush=True)
    rep = measure(suite, subjects, budget, attacks=tuple(attacks), families=families, progress=say)
    out = {**rep.to_dict(), "run": str(run_dir), "preset": cfg.preset, "method": cfg.method, "control": control_info,
           "notes": notes, "generator_sampler": sampler_text,
           "teacher_sampler": f"{budget.teacher_steps}-step Heun in attacks ({2 * budget.teacher_steps - 1} NFE), "
                              f"{SAMPLER_STEPS}-step Heun for families"}
    if write:
        write_json(run_dir / "attack.json", out)
        metrics["attack"] = rep.summary()
        write_json(run_dir / "metrics.json", metrics)
    return out


def attack_after_run(run_dir, cfg, progress: bool = False) -> dict:
    """The ``attack`` setting of a run that just finished: ``sfd attack`` with the default budget (no control),
    returning the flat figures (ATTACK_KEYS) for the run's last report; {} when the setting is off."""
    if cfg.attack == "off":
        return {}
    kinds = ATTACK_KINDS if cfg.attack == "all" else (cfg.attack,)
    kinds = tuple(k for k in kinds if k in get_task(cfg.preset).attacks)
    out = attack_run(run_dir, attacks=kinds, device=cfg.device, progress=progress)
    return {k: float(out[k]) for k in ATTACK_KEYS if isinstance(out.get(k), (int, float))}
