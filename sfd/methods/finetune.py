"""The baselines' shared loop: fine-tune a copy of the teacher with one method's loss, then judge it
sampled with the teacher's own sampler (docs/baselines.md).

Same teacher, targets, judge, evaluator, sample counts, seeds, run folder, checkpoints and
``callback(metrics, checkpoint_dir)`` as :func:`sfd.loop.train_sfd` (which hands a baseline's
configuration to :func:`train_baseline`), so the sweep, MLflow and the tables treat a baseline
trial like an SFD trial. A baseline is evaluated once, at the end: every image costs the
sampler's 35 network evaluations.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from ..config import SFDConfig
from ..denoisers import load_denoiser, save_denoiser
from ..denoisers.base import Denoiser
from ..distributed import Dist
from ..evaluate.report import save_grid
from ..io import write_json
from ..presets import get_preset
from ..rundir import plan_run_dir
from ..samplers import teacher_grid
from ..tasks import get_task
from ..utils import pick_device
from .common import (SAMPLER_STEPS, denoise_loss, discrete_sigmas, draw_sigma, heun_sampler, sampler_nfe,
                     teacher_pool)
from .esd import esd_loss, esd_points
from .sa import REFERENCE_LEVELS, ewc_penalty, fisher_diagonal, surrogate_images
from .salun import apply_mask, relabel_loss, saliency_mask, saliency_scores

MODEL_FILE = "model.safetensors"
FISHER_LEVELS = 50
POOL_SEED = 4321                      # the training pool's noise: not the evaluation's (777) nor the reference's (1234)


def condition_sets(targets) -> tuple[torch.Tensor, torch.Tensor]:
    """(forget conditions, remain conditions) of a run's targets (class ids or prompt-table ids)."""
    return targets._forget_t.clone(), targets._remain_t.clone()


def fisher_sigmas(net: Denoiser, levels: int = FISHER_LEVELS) -> torch.Tensor:
    """``levels`` noise levels spread over the training distribution: equally spaced steps of a discrete
    VP grid, else quantiles of EDM's log-normal (P_mean -1.2, P_std 1.2)."""
    grid = discrete_sigmas(net)
    if grid is not None:
        t = torch.linspace(0, len(grid) - 1, levels).round().long()
        return grid.cpu()[t]
    q = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    return (torch.distributions.Normal(0.0, 1.0).icdf(q) * 1.2 - 1.2).exp().float()


class Pool:
    """The data-free training set: the teacher's samples of the forget and remain conditions, with each
    forget row's override condition (None for a per-sample classifier policy)."""

    def __init__(self, cfg, teacher, targets, device):
        g = torch.Generator().manual_seed(POOL_SEED + cfg.seed)
        f_conds, r_conds = condition_sets(targets)
        n = cfg.pool_per_condition
        self.c_forget, self.c_override = targets.sample_forget(n * len(f_conds), g)
        self.c_remain = (r_conds.repeat_interleave(n) if len(r_conds) <= 50 else targets.sample_remain(n * 50, g))
        x = teacher_pool(teacher, torch.cat([self.c_forget, self.c_remain]), POOL_SEED + cfg.seed, device=device)
        self.x_forget, self.x_remain = x[:len(self.c_forget)], x[len(self.c_forget):]

    def forget(self, n, gen):
        i = torch.randint(0, len(self.c_forget), (n,), generator=gen)
        return self.x_forget[i], self.c_forget[i], None if self.c_override is None else self.c_override[i]

    def remain(self, n, gen):
        i = torch.randint(0, len(self.c_remain), (n,), generator=gen)
        return self.x_remain[i], self.c_remain[i]


class Recipe:
    """One method's loss on a fine-tuned copy of the teacher; ``images`` per iteration."""
    clip_norm = 0.0                    # gradient-norm clip (the SA / SalUn references clip at 1)

    def __init__(self, cfg, student, teacher, targets, gen, device):
        self.cfg, self.student, self.teacher, self.targets, self.gen, self.device = (cfg, student, teacher, targets,
                                                                                        gen, device)
        self.weight = teacher.loss_weight

    def after_backward(self) -> None:
        pass


class ESDRecipe(Recipe):
    def __init__(self, *a):
        super().__init__(*a)
        self.images = self.cfg.batch_forget
        self.sigmas = teacher_grid(self.teacher, SAMPLER_STEPS, self.device)

    def loss(self):
        cfg, g, dev = self.cfg, self.gen, self.device
        n = cfg.batch_forget
        c_f, _ = self.targets.sample_forget(n, g)
        stop = int(torch.randint(0, SAMPLER_STEPS, (1,), generator=g))      # one step per iteration, as the reference
        z = torch.randn((n, *self.teacher.img_shape), generator=g).to(dev)
        x = esd_points(self.student, z, c_f.to(dev), self.sigmas, stop, cfg.esd_start_guidance)
        sigma = self.sigmas[stop].float().expand(n)
        return esd_loss(self.student, self.teacher, x, sigma, c_f.to(dev), cfg.esd_negative_guidance,
                        self.weight(sigma)).mean()


class PoolRecipe(Recipe):
    """A recipe that trains on a pool of the teacher's own samples (SA, SalUn), with clipped gradients."""

    clip_norm = 1.0

    def __init__(self, *a):
        super().__init__(*a)
        self.images = self.cfg.batch_remain + self.cfg.batch_forget
        self.pool = Pool(self.cfg, self.teacher, self.targets, self.device)


class SARecipe(PoolRecipe):
    def __init__(self, *a):
        super().__init__(*a)
        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed + 17)
        x_all = torch.cat([self.pool.x_forget, self.pool.x_remain])
        c_all = torch.cat([self.pool.c_forget, self.pool.c_remain])
        pick = torch.randperm(len(x_all), generator=g)[:cfg.sa_fisher_samples]
        sig = fisher_sigmas(self.teacher).to(self.device)
        # the teacher's Fisher (the student is still equal to it here), scaled to the reference's 1000 steps
        self.fisher = fisher_diagonal(self.student, x_all[pick].to(self.device), c_all[pick].to(self.device), sig,
                                      self.weight, g, scale=(REFERENCE_LEVELS / len(sig)) ** 2)
        self.anchor = {k: p.detach().clone() for k, p in self.student.named_parameters()}

    def loss(self):
        cfg, g, dev = self.cfg, self.gen, self.device
        x_r, c_r = self.pool.remain(cfg.batch_remain, g)
        n_f = cfg.batch_forget
        c_f, _ = self.targets.sample_forget(n_f, g)
        x_f = surrogate_images(n_f, self.teacher.img_shape, g)
        # one noise level per row, shared by both terms as the reference shares t (batches may differ in size)
        s_f, s_r = draw_sigma(self.teacher, n_f, g), draw_sigma(self.teacher, cfg.batch_remain, g)
        e_f, e_r = torch.randn(x_f.shape, generator=g), torch.randn(x_r.shape, generator=g)
        s_f, s_r = s_f.to(dev), s_r.to(dev)
        forget = denoise_loss(self.student, x_f.to(dev), s_f, e_f.to(dev), c_f.to(dev), self.weight(s_f)).mean()
        replay = denoise_loss(self.student, x_r.to(dev), s_r, e_r.to(dev), c_r.to(dev), self.weight(s_r)).mean()
        return forget + cfg.sa_gamma * replay + cfg.sa_lambda * ewc_penalty(self.student, self.fisher, self.anchor)


class SalUnRecipe(PoolRecipe):
    def __init__(self, *a):
        super().__init__(*a)
        cfg = self.cfg
        if self.pool.c_override is None:
            raise ValueError(f"salun relabels forget images with the override condition; override "
                             f"{cfg.override!r} decides per sample from the fake score (SFD only) — give a class or "
                             f"'random'")
        g = torch.Generator().manual_seed(cfg.seed + 29)
        bs, dev = max(cfg.batch_forget, 1), self.device
        batches = []
        for a in range(0, len(self.pool.x_forget), bs):        # one pass over the forget set, as the reference
            x = self.pool.x_forget[a:a + bs].to(dev)
            batches.append((x, self.pool.c_forget[a:a + bs].to(dev), draw_sigma(self.teacher, len(x), g).to(dev)))
        self.mask = saliency_mask(saliency_scores(self.student, batches, self.weight, g), cfg.salun_mask_ratio)

    def loss(self):
        cfg, g, dev = self.cfg, self.gen, self.device
        x_r, c_r = self.pool.remain(cfg.batch_remain, g)
        x_f, c_f, c_o = self.pool.forget(cfg.batch_forget, g)
        s_f, s_r = draw_sigma(self.teacher, len(x_f), g).to(dev), draw_sigma(self.teacher, len(x_r), g).to(dev)
        e_f, e_r = torch.randn(x_f.shape, generator=g).to(dev), torch.randn(x_r.shape, generator=g).to(dev)
        x_t = x_f.to(dev) + s_f.view(-1, 1, 1, 1) * e_f
        forget = relabel_loss(self.student, x_t, s_f, c_f.to(dev), c_o.to(dev), self.weight(s_f))
        retain = denoise_loss(self.student, x_r.to(dev), s_r, e_r, c_r.to(dev), self.weight(s_r)).mean()
        return forget + cfg.salun_alpha * retain

    def after_backward(self) -> None:
        apply_mask(self.student, self.mask)


RECIPES = {"esd": ESDRecipe, "sa": SARecipe, "salun": SalUnRecipe}


@torch.no_grad()
def sampler_speed(net, shape, num_classes: int, batch: int, device, repeats: int = 2) -> float:
    """Images per second of the teacher's sampler around ``net`` at ``batch`` (best of ``repeats``)."""
    fn = heun_sampler(net)
    z = torch.randn((batch, *shape), device=device)
    c = torch.arange(batch, device=device) % max(num_classes, 1)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(z, c)
        best = min(best, time.perf_counter() - t0)
    return batch / best


def train_baseline(cfg: SFDConfig, out_dir, *, callback: Callable[[dict, Path | None], None] | None = None,
                   resume: bool = False, progress: bool = True, evaluate: bool = True,
                   teacher: Denoiser | None = None, judge=None, measure_speed: bool = True,
                   overwrite: bool = False, **_) -> dict:
    """Fine-tune the teacher with ``cfg.method``'s loss; write model.safetensors, metrics and grids under
    ``out_dir``; return the final metrics (``nfe``: network evaluations per image of its sampler)."""
    preset = get_preset(cfg.preset)
    task = get_task(preset)
    cfg = SFDConfig.from_dict(cfg.to_dict()).validate(preset)
    if cfg.method not in RECIPES:
        raise ValueError(f"method {cfg.method!r} is not a baseline ({', '.join(RECIPES)}); 'sfd' runs sfd.loop")
    if Dist.current().world_size > 1:
        raise ValueError(f"method {cfg.method}: the baselines run in one process — drop --num-workers")
    out_dir = Path(out_dir)
    device = pick_device(cfg.device)
    t_start = time.time()
    plan = plan_run_dir(out_dir, cfg.to_dict(), resume=resume, overwrite=overwrite)
    teacher = teacher if teacher is not None else task.load_teacher(cfg.teacher, device, cfg.allow_download)
    teacher = teacher.to(device).eval().requires_grad_(False)
    targets = task.targets(cfg, teacher)        # text presets: installs the prompt table before the copy
    if evaluate and judge is None and not task.can_evaluate(cfg):
        evaluate = False
        print(f"note: UA/FD are not measured: preset '{preset.name}' has no bundled judge", flush=True)
    if judge is None and evaluate:
        judge = task.load_judge(cfg, device)
    torch.manual_seed(cfg.seed)
    student = teacher.clone().train()
    gen = torch.Generator().manual_seed(cfg.seed)
    t_setup = time.time()
    recipe = RECIPES[cfg.method](cfg, student, teacher, targets, gen, device)
    setup_seconds = time.time() - t_setup
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr_finetune, betas=(0.9, 0.999), eps=cfg.adam_eps)
    plan.apply(cfg.to_dict())
    for note in plan.notes:
        print(f"note: {note}", flush=True)
    iteration, train_seconds, losses = 0, 0.0, []
    if resume and plan.checkpoint is not None:
        info = load_checkpoint(plan.checkpoint, {"model": student}, {"model": opt}, gen, device)
        iteration, losses, train_seconds = info["iteration"], info.get("losses", []), info.get("train_seconds", 0.0)
        print(f"resuming {out_dir} from {plan.checkpoint.name} (iteration {iteration})", flush=True)

    total = max(1, round(cfg.budget_kimg * 1000 / recipe.images))
    bar = tqdm(total=total, initial=iteration, desc=f"{cfg.method.upper()} forget {targets.describe()}", unit="it",
               disable=not progress, dynamic_ncols=True)
    while iteration < total:
        t0 = time.time()
        loss = recipe.loss()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"method {cfg.method}: the loss is {float(loss)} at iteration {iteration} — "
                                     f"lower --lr-finetune (now {cfg.lr_finetune})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, recipe.clip_norm)
        recipe.after_backward()
        opt.step()
        iteration += 1
        train_seconds += time.time() - t0
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
        if cfg.max_seconds > 0 and train_seconds >= cfg.max_seconds:
            break
    bar.close()

    kimg = iteration * recipe.images / 1000
    ckpt = save_checkpoint(out_dir, iteration, {"model": student}, {"model": opt}, gen, run_id=plan.run_id, info={
        "config": cfg.to_dict(), "losses": losses, "train_seconds": train_seconds, "kimg": kimg})
    student.eval()
    save_denoiser(out_dir / MODEL_FILE, student, {"baseline": {"method": cfg.method, "preset": cfg.preset,
                                                               "forget": cfg.forget_concepts or cfg.forget,
                                                               "override": cfg.override, "steps": SAMPLER_STEPS}})
    m = {"iteration": iteration, "kimg": kimg, "train_seconds": train_seconds, "setup_seconds": setup_seconds,
         "wall_seconds": time.time() - t_start, "method": cfg.method, "nfe": sampler_nfe(),
         "loss": sum(losses[-20:]) / max(1, len(losses[-20:]))}
    if evaluate:
        evaluator = task.evaluator(cfg, judge, teacher, targets, progress=progress, device=device)
        fn = heun_sampler(student)
        m.update(evaluator(fn))
        if measure_speed:
            batch = min(500, cfg.batch_remain + cfg.batch_forget)
            m["images_per_second_generator"] = sampler_speed(student, task.sample_shape(teacher),
                                                             teacher.num_classes, batch, device)
        save_grid(out_dir / "samples_generator.png", *evaluator.grid_images(generator_fn=fn))
        save_grid(out_dir / "samples_teacher.png", *evaluator.teacher_grid(teacher))
    # the outputs first: a sweep's scheduler may end the trial at its one report
    write_json(out_dir / "history.json", [m])
    write_json(out_dir / "metrics.json", {**m, "config": cfg.to_dict()})
    if callback:
        callback(m, ckpt)
    return {**m, "stopped_early": False}


def load_baseline_model(run_dir, cfg: SFDConfig, device, teacher) -> Denoiser:
    """A finished baseline run's fine-tuned denoiser (model.safetensors), in eval mode; a text model gets the
    teacher's prompt table (the run's targets were installed in the teacher before it was read)."""
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing — give the folder of a finished `sfd forget --method {cfg.method}` run")
    model = load_denoiser(path, device).eval()
    if hasattr(teacher, "prompts") and hasattr(model, "set_prompts"):
        model.set_prompts(teacher.prompts)
    return model


def evaluate_baseline(run_dir, cfg: SFDConfig, *, seed: int = 777, device="auto", progress: bool = False,
                      teacher=None, judge=None, **_) -> dict:
    """A finished baseline run's model.safetensors re-evaluated with its teacher's sampler on ``seed``'s noise."""
    task = get_task(cfg.preset)
    device = pick_device(device)
    teacher = teacher if teacher is not None else task.load_teacher(cfg.teacher, device, cfg.allow_download)
    teacher = teacher.to(device).eval()
    targets = task.targets(cfg.validate(get_preset(cfg.preset)), teacher)
    judge = judge if judge is not None else task.load_judge(cfg, device)
    model = load_baseline_model(run_dir, cfg, device, teacher)
    ev = task.evaluator(cfg, judge, teacher, targets, seed=seed, progress=progress, device=device)
    return {**ev(heun_sampler(model)), "seed": seed, "nfe": sampler_nfe(), "method": cfg.method}
