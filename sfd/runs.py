"""A finished run folder, re-evaluated: `sfd evaluate --run` and the sweep's fresh re-evaluation."""
from __future__ import annotations

from pathlib import Path

from .config import SFDConfig
from .io import read_json
from .methods.finetune import evaluate_baseline
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
    if cfg.method != "sfd":                   # a baseline: its fine-tuned model with the teacher's sampler
        return evaluate_baseline(run_dir, cfg, seed=seed, device=device, progress=progress, teacher=teacher,
                                 judge=judge)
    return get_task(cfg.preset).evaluate_run(run_dir, cfg, metrics, seed=seed, device=device, progress=progress,
                                             teacher=teacher, judge=judge, clip=clip, per_prompt=per_prompt)


# -- the command ------------------------------------------------------------------------------------------
