"""The SFD training loop (SFD.md section 4): alternating fake-score and generator updates.

One linear function, read top to bottom. It knows nothing about the launcher or the
tracker: it runs the same under plain Python, torchrun/accelerate and Ray Train, and tells
observers about progress through ``callback(metrics, checkpoint_dir)``.

Data parallelism: every rank draws the *global* batch's random numbers from the same seeded
generator and keeps its slice, and gradients are summed across ranks in one coalesced
all-reduce (gloo on CPU, NCCL on GPU). Each loss is a local sum divided by the global batch,
so N workers take exactly the step one worker takes with the same global batch and seed.
We average gradients ourselves instead of wrapping in DistributedDataParallel because the
fake score is trainable in one half-step and a frozen critic in the other; DDP's reducer
expects one fixed set of trainable parameters per forward.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import SFDConfig
from .denoisers import Denoiser, Guided, load_teacher, save_denoiser
from .io import CheckpointError, load_tensors, load_state_strict, write_json
from .losses import fake_score_loss, generator_loss
from .presets import get_preset
from .samplers import sample_sigma
from .targets import ClassTargets
from .utils import ema_beta, ema_update, pick_device


class SFDDivergedError(FloatingPointError):
    """A loss became NaN or infinite; earlier checkpoints are left untouched."""


@dataclass
class Dist:
    """Rank and world size of the current data-parallel group (1 process if none)."""
    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "Dist":
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return cls(torch.distributed.get_rank(), torch.distributed.get_world_size())
        return cls()

    def local(self, n: int) -> slice:
        """This rank's slice of a global batch of n."""
        return slice(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def sum_grads(self, params, loss: torch.Tensor) -> torch.Tensor:
        """Sum gradients (and the loss) over ranks in one all-reduce; return the summed loss."""
        if self.world_size == 1:
            return loss.detach()
        params = [p for p in params if p.grad is not None]
        flat = torch.cat([p.grad.flatten() for p in params] + [loss.detach().reshape(1)])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n
        return flat[-1]


def one_step(generator: Denoiser, z: torch.Tensor, cond: torch.Tensor, sigma_init: float) -> torch.Tensor:
    """G(z, c) = D_theta(sigma_init z, sigma_init, c): the one-step generator (SFD.md section 3)."""
    return generator(z * sigma_init, sigma_init, cond)


def load_generator_init(path, generator: Denoiser, fake_score: Denoiser) -> None:
    """Start from an earlier SFD run (two-stage): its generator (EMA if present) and fake score.

    ``path`` is an sfd run folder or checkpoint folder, or an official SFD checkpoint
    (``[fake_score, opt, generator, opt, step, ema]`` saved by the reference code).
    """
    path = Path(path)
    if path.is_file() and path.suffix in (".pt", ".pth", ".ckpt"):
        from .denoisers.ddpm import load_sfd_init
        load_sfd_init(path, generator, fake_score)
        return
    ckpt = latest_checkpoint(path) if (path / "checkpoints").is_dir() else path
    if ckpt is None:
        raise CheckpointError(f"--init-from {path}: no checkpoint found in it")
    tensors, _ = load_tensors(Path(ckpt) / "state.safetensors")
    gen_key = "generator_ema/" if any(k.startswith("generator_ema/") for k in tensors) else "generator/"
    for name, module, pre in (("generator", generator, gen_key), ("fake_score", fake_score, "fake_score/")):
        state = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
        load_state_strict(module, state, f"{ckpt} [{name}]")


# Settings that may change between a run and its resumption: how long and how it is observed.
RESUMABLE_CHANGES = {"budget_kimg", "max_seconds", "eval_every_kimg", "checkpoint_every_kimg", "device",
                     "eval_forget_samples", "eval_remain_per_class"}


def _check_resumable(cfg: SFDConfig, ckpt: Path) -> None:
    saved = json.loads((ckpt / "state.json").read_text()).get("config", {})
    changed = {k: (saved[k], v) for k, v in cfg.to_dict().items()
               if k in saved and k not in RESUMABLE_CHANGES and saved[k] != v}
    if changed:
        desc = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(changed.items()))
        raise ValueError(f"cannot resume {ckpt}: the configuration changed ({desc}). Use the run's settings "
                         f"(see its metrics.json / state.json) or start a new --out folder.")


def _clip(params, value: float) -> None:
    if value > 0:
        torch.nn.utils.clip_grad_value_(params, value)


def _check_finite(loss: torch.Tensor, what: str, iteration: int) -> float:
    v = float(loss)
    if not math.isfinite(v):
        raise SFDDivergedError(
            f"{what} loss is {v} in iteration {iteration + 1}: the run diverged. Lower the learning rates "
            f"(lr_fake, lr_gen) or the forget weights; earlier checkpoints are intact and --resume restarts "
            f"from the last one.")
    return v


def train_sfd(cfg: SFDConfig, out_dir, *, callback: Callable[[dict, Path | None], None] | None = None,
              resume: bool = False, progress: bool = True, evaluate: bool = True,
              teacher: Denoiser | None = None, judge=None, stop_when: Callable[[dict], bool] | None = None,
              measure_speed: bool = True) -> dict:
    """Run SFD as configured; write checkpoints, metrics and plots under ``out_dir``.

    ``callback(metrics, checkpoint_dir)`` is called on every rank at each evaluation
    (metrics are complete on rank 0 only) and once at the end. ``stop_when(metrics)`` may end
    the run early (used by ``sfd bench``). Returns the final metrics.
    """
    preset = get_preset(cfg.preset)
    cfg = SFDConfig.from_dict(cfg.to_dict()).validate(preset)
    out_dir = Path(out_dir)
    dist = Dist.current()
    lead = dist.rank == 0
    device = pick_device(cfg.device)
    t_start = time.time()

    # --- networks: teacher frozen; fake score and generator start as copies of it --------
    teacher = teacher if teacher is not None else load_teacher(preset, cfg.teacher, device)
    teacher = teacher.to(device).eval().requires_grad_(False)
    fake_score = teacher.clone().train()
    generator = teacher.clone().train()
    if cfg.init_from:
        load_generator_init(cfg.init_from, generator, fake_score)
    generator_ema = copy.deepcopy(generator).eval().requires_grad_(False)
    targets = ClassTargets(cfg, preset.num_classes)
    from .evaluate import can_evaluate, load_judge
    if evaluate and judge is None and not can_evaluate(preset, cfg):
        evaluate = False
        if lead:
            print(f"note: UA/FD are not measured: preset '{preset.name}' has no bundled judge; pass --classifier, "
                  f"--fid-weights and --reference to evaluate", flush=True)
    if judge is None and (evaluate or targets.policy == "classifier"):
        judge = load_judge(preset, cfg.classifier, device, cfg.fid_weights)
    teacher_eval = Guided(teacher, cfg.guidance)
    fake_eval = Guided(fake_score, cfg.guidance)

    betas = (cfg.adam_beta1, cfg.adam_beta2)
    opt_fake = torch.optim.Adam(fake_score.parameters(), lr=cfg.lr_fake, betas=betas, eps=cfg.adam_eps)
    opt_gen = torch.optim.Adam(generator.parameters(), lr=cfg.lr_gen, betas=betas, eps=cfg.adam_eps)
    rng = torch.Generator().manual_seed(cfg.seed)

    modules = {"generator": generator, "generator_ema": generator_ema, "fake_score": fake_score}
    optimizers = {"generator": opt_gen, "fake_score": opt_fake}
    iteration, history, losses_log, train_seconds = 0, [], [], 0.0
    if resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is not None:
            _check_resumable(cfg, ckpt)
            info = load_checkpoint(ckpt, modules, optimizers, rng, device)
            iteration, history = info["iteration"], info.get("history", [])
            losses_log, train_seconds = info.get("losses", []), info.get("train_seconds", 0.0)
            if lead:
                print(f"resuming {out_dir} from {ckpt.name} (iteration {iteration})")

    evaluator = None
    if evaluate and lead:
        from .evaluate.forgetting import ForgetEvaluator
        evaluator = ForgetEvaluator(preset, judge, teacher, targets, cfg.eval_forget_samples,
                                    cfg.eval_remain_per_class, progress=progress, reference=cfg.reference)

    B_r, B_f = cfg.batch_remain, cfg.batch_forget
    n_r = len(range(*dist.local(B_r).indices(B_r)))
    imgs_per_iter = B_r + B_f
    total_iters = math.ceil(round(cfg.budget_kimg * 1000 / imgs_per_iter, 6))   # 9*0.016 kimg is 9 its
    eval_every = max(1, round(cfg.eval_every_kimg * 1000 / imgs_per_iter))
    ckpt_every = max(1, round(cfg.checkpoint_every_kimg * 1000 / imgs_per_iter))
    shape = tuple(teacher.img_shape)

    def draw_batch(stage1: bool):
        """Global-batch random draws (identical on every rank), then this rank's slice."""
        c_r = targets.sample_remain(B_r, rng, all_classes=stage1)
        c_f, c_o = targets.sample_forget(B_f, rng)
        n = B_r + B_f
        z = torch.randn((n, *shape), generator=rng)
        sigma = sample_sigma(cfg.sigma_dist, n, cfg.sigma_min, cfg.sigma_max, generator=rng)
        noise = torch.randn((n, *shape), generator=rng)
        sr, sf = dist.local(B_r), dist.local(B_f)
        pick = torch.cat([torch.arange(B_r)[sr], B_r + torch.arange(B_f)[sf]])
        c_o_local = c_o[sf].to(device) if c_o is not None else None
        return (c_r[sr].to(device), c_f[sf].to(device), c_o_local, z[pick].to(device),
                sigma[pick].to(device).reshape(-1, 1, 1, 1), noise[pick].to(device))

    def branch_mean(per_sample: torch.Tensor, lam_r: float, lam_f: float) -> torch.Tensor:
        # local sums over the *global* batch sizes: the all-reduced sum is the global mean
        return lam_r * per_sample[:n_r].sum() / B_r + lam_f * per_sample[n_r:].sum() / B_f

    def gen_fn(z, c):
        return one_step(generator_ema, z.to(device), c.to(device), cfg.sigma_init)

    def run_eval() -> dict:
        kimg = iteration * imgs_per_iter / 1000
        m = {"iteration": iteration, "kimg": kimg, "train_seconds": train_seconds,
             "wall_seconds": time.time() - t_start}
        if losses_log:
            recent = losses_log[-min(len(losses_log), eval_every):]
            m["loss_fake_score"] = sum(r[0] for r in recent) / len(recent)
            m["loss_generator"] = sum(r[1] for r in recent) / len(recent)
        if evaluator is not None:
            m.update(evaluator(gen_fn))
        return m

    bar = tqdm(total=total_iters, initial=iteration, desc=f"SFD forget {targets.describe()}", unit="it",
               disable=not (progress and lead), dynamic_ncols=True)
    if iteration == 0:
        m0 = run_eval()
        history.append(m0)
        if callback:
            callback(m0, None)
    stopped_early = False
    while iteration < total_iters:
        t_iter = time.time()
        stage1 = iteration * imgs_per_iter < cfg.stage1_kimg * 1000
        lam_ff = 0.0 if stage1 else cfg.lambda_fake_forget
        lam_gf = 0.0 if stage1 else cfg.lambda_gen_forget

        # (a) fake-score step: denoising score matching on detached generator samples
        c_r, c_f, _, z, sigma, noise = draw_batch(stage1)
        labels = torch.cat([c_r, c_f])
        with torch.no_grad():
            x_g = one_step(generator, z, labels, cfg.sigma_init)
        d_fake = fake_eval(x_g + sigma * noise, sigma, labels)
        per = fake_score_loss(d_fake, x_g, fake_score.loss_weight(sigma))
        loss_fake = branch_mean(per, cfg.lambda_fake_remain, lam_ff)
        opt_fake.zero_grad(set_to_none=True)
        loss_fake.backward()
        loss_fake_all = _check_finite(dist.sum_grads(fake_score.parameters(), loss_fake), "fake-score", iteration)
        _clip(fake_score.parameters(), cfg.grad_clip)
        opt_fake.step()

        # (b) generator step: teacher and fake score frozen as parameters, gradients reach
        # x_g through their inputs. The forget branch asks the teacher about the override.
        c_r, c_f, c_o, z, sigma, noise = draw_batch(stage1)
        fake_score.requires_grad_(False)
        x_g = one_step(generator, z, torch.cat([c_r, c_f]), cfg.sigma_init)
        x = x_g + sigma * noise
        y_fake = fake_eval(x, sigma, torch.cat([c_r, c_f]))
        if c_o is None:                                   # classifier pseudo-label policy
            c_o = targets.classifier_override(judge, y_fake[n_r:].detach())
        y_real = teacher_eval(x, sigma, torch.cat([c_r, c_o]))
        per = generator_loss(y_real, y_fake, x_g, cfg.alpha)
        loss_gen = branch_mean(per, cfg.lambda_gen_remain, lam_gf)
        opt_gen.zero_grad(set_to_none=True)
        loss_gen.backward()
        fake_score.requires_grad_(True)
        loss_gen_all = _check_finite(dist.sum_grads(generator.parameters(), loss_gen), "generator", iteration)
        _clip(generator.parameters(), cfg.grad_clip)
        opt_gen.step()
        kimg_now = (iteration + 1) * imgs_per_iter / 1000
        halflife = min(cfg.ema_halflife_kimg, kimg_now * 0.5)   # EMA ramp-up for short runs
        ema_update(generator_ema, generator, ema_beta(imgs_per_iter, halflife))

        iteration += 1
        train_seconds += time.time() - t_iter
        losses_log.append((loss_fake_all, loss_gen_all))
        bar.update(1)
        post = {"kimg": f"{kimg_now:.1f}", "L_psi": f"{loss_fake_all:.3f}", "L_theta": f"{loss_gen_all:.3f}"}

        done = iteration >= total_iters or (cfg.max_seconds > 0 and train_seconds >= cfg.max_seconds)
        if iteration % eval_every == 0 or done:
            m = run_eval()
            history.append(m)
            if "ua" in m:
                post.update(UA=f"{m['ua']:.3f}", FD=f"{m['fd_remaining']:.3f}")
            if stop_when is not None and lead and stop_when(m):
                done = stopped_early = True
            ckpt_dir = None
            if lead and (iteration % ckpt_every == 0 or done):
                ckpt_dir = save_checkpoint(out_dir, iteration, modules, optimizers, rng, {
                    "config": cfg.to_dict(), "history": history, "losses": losses_log,
                    "train_seconds": train_seconds, "kimg": kimg_now})
            if callback:
                callback(m, ckpt_dir)
        bar.set_postfix(post, refresh=False)
        if done:
            break
    bar.close()

    final = dict(history[-1]) if history else {}
    final["stopped_early"] = stopped_early
    if lead:
        final.update(_write_outputs(out_dir, cfg, preset, teacher, generator_ema, evaluator, history, gen_fn,
                                    device, evaluate, measure_speed))
    return final


def _write_outputs(out_dir: Path, cfg, preset, teacher, generator_ema, evaluator, history, gen_fn, device,
                   evaluate: bool, measure_speed: bool) -> dict:
    """Export the generator and write metrics.json, history.json, curves and sample grids."""
    from .evaluate.plots import plot_history
    from .evaluate.report import save_grid

    extra = {}
    save_denoiser(out_dir / "generator.safetensors", generator_ema, {
        "generator": {"sigma_init": cfg.sigma_init, "forget": cfg.forget, "override": cfg.override,
                      "preset": cfg.preset, "one_step": True}})
    if evaluate and evaluator is not None:
        if measure_speed:
            from .evaluate.forgetting import throughput
            # at the training batch: on a CPU the teacher's 35-call sampler on large backbones is slow
            batch = min(500, cfg.batch_remain + cfg.batch_forget)
            extra.update(throughput(gen_fn, teacher, preset.img_shape, batch=batch, device=device, repeats=2))
        imgs, nrow = evaluator.grid_images(generator_fn=gen_fn)
        save_grid(out_dir / "samples_generator.png", imgs, nrow)
        from .evaluate.forgetting import first_per_class
        idx = first_per_class(evaluator.teacher_labels, range(preset.num_classes), nrow)
        save_grid(out_dir / "samples_teacher.png", evaluator.teacher_images[idx], nrow)
        plot_history(history, out_dir / "curves.png", title=f"SFD {cfg.preset}: forget {cfg.forget} -> {cfg.override}")
    metrics = {**history[-1], **extra, "config": cfg.to_dict()} if history else {"config": cfg.to_dict()}
    write_json(out_dir / "history.json", history)
    write_json(out_dir / "metrics.json", metrics)
    return extra
