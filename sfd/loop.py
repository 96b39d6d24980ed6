"""The SFD training loop (SFD.md section 4): schedule, evaluation, checkpoints, reporting.

One linear function, read top to bottom; one iteration is :func:`sfd.iteration.sfd_iteration`
(shared with `sfd bench` and the tests). It knows nothing about the launcher or the tracker:
it runs the same under plain Python, torchrun and Ray Train, and tells observers about
progress through ``callback(metrics, checkpoint_dir)``.

On N ranks every decision that changes control flow is taken once and shared: the losses
are all-reduced before the divergence check, the wall-clock limit reads rank 0's clock and
``stop_when`` rank 0's metrics, both broadcast. Evaluation is sharded: each rank generates and
featurises its share of the samples, rank 0 computes UA/FD from the gathered features.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from .checkpoint import latest_checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import SFDConfig
from .denoisers import Denoiser, load_teacher, save_denoiser
from .distributed import Dist
from .io import CheckpointError, load_tensors, load_state_strict, write_json
from .iteration import SFDDivergedError, build_state, one_step, sfd_iteration, total_iterations
from .presets import get_preset
from .rundir import RESUMABLE_CHANGES, plan_run_dir  # RESUMABLE_CHANGES re-exported for importers
from .utils import pick_device

__all__ = ["train_sfd", "one_step", "SFDDivergedError", "Dist", "load_generator_init", "RESUMABLE_CHANGES"]


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


def train_sfd(cfg: SFDConfig, out_dir, *, callback: Callable[[dict, Path | None], None] | None = None,
              resume: bool = False, progress: bool = True, evaluate: bool = True,
              teacher: Denoiser | None = None, judge=None, stop_when: Callable[[dict], bool] | None = None,
              measure_speed: bool = True, overwrite: bool = False) -> dict:
    """Run SFD as configured; write checkpoints, metrics and plots under ``out_dir``.

    ``callback(metrics, checkpoint_dir)`` is called on every rank at each evaluation
    (metrics are complete on rank 0 only) and once at the end. ``stop_when(metrics)`` may end
    the run early (used by ``sfd bench``; rank 0 decides). Returns the final metrics.

    ``out_dir`` is owned by one run (``run.json``): a folder holding another run is refused unless
    ``resume`` (same settings; falls back to the newest intact checkpoint) or ``overwrite`` (the
    old run is moved aside to ``<out>.old-<timestamp>``). All of it is decided before any work.
    """
    preset = get_preset(cfg.preset)
    cfg = SFDConfig.from_dict(cfg.to_dict()).validate(preset)
    out_dir = Path(out_dir)
    dist = Dist.current()
    lead = dist.lead
    device = pick_device(cfg.device)
    t_start = time.time()
    # the run folder: decided (read-only) before any work, acted on by the lead once the models load
    plan = plan_run_dir(out_dir, cfg.to_dict(), resume=resume, overwrite=overwrite) if lead else None

    teacher = teacher if teacher is not None else load_teacher(preset, cfg.teacher, device, allow_download=cfg.allow_download)
    from .evaluate import can_evaluate, load_judge
    if evaluate and judge is None and not can_evaluate(preset, cfg):
        evaluate = False
        if lead:
            print(f"note: UA/FD are not measured: preset '{preset.name}' has no bundled judge; pass --classifier, "
                  f"--fid-weights and --reference to evaluate", flush=True)
    if judge is None and (evaluate or cfg.override == "classifier"):
        judge = load_judge(preset, cfg.classifier, device, cfg.fid_weights)
    from .stage1 import resolve_init
    init_path = resolve_init(cfg.init_from, preset, teacher)
    init = (lambda gen, fake: load_generator_init(init_path, gen, fake)) if init_path else None
    st = build_state(cfg, teacher, device, dist, judge=judge, init=init)
    teacher = st.teacher

    history, losses_log, train_seconds = [], [], 0.0
    if lead:
        plan.apply(cfg.to_dict())
        for note in plan.notes:
            print(f"note: {note}", flush=True)
        ckpt, run_id = plan.checkpoint, plan.run_id
    else:
        ckpt, run_id = (resolve_checkpoint(out_dir)[0] if resume else None), None
    if resume:
        if ckpt is not None:
            info = load_checkpoint(ckpt, st.modules(), st.optimizers(), st.rng, device)
            st.iteration, history = info["iteration"], info.get("history", [])
            losses_log, train_seconds = info.get("losses", []), info.get("train_seconds", 0.0)
            for name, sd in info.get("scalers", {}).items():
                st.scalers[name].load_state_dict(sd)
            if lead:
                print(f"resuming {out_dir} from {ckpt.name} (iteration {st.iteration})")

    evaluator = None
    if evaluate:
        from .evaluate.forgetting import ForgetEvaluator
        extra = {}
        if preset.text:                                   # prompts and concepts (sfd.evaluate.concepts)
            from .evaluate.concepts import ConceptEvaluator as ForgetEvaluator
        if preset.extra.get("latent"):                    # Stable Diffusion: FD vs the teacher's samples, CLIP, NudeNet
            from .evaluate.sd import SDEvaluator as ForgetEvaluator
            extra = {"guidance": cfg.guidance_of("teacher")}
        evaluator = ForgetEvaluator(preset, judge, teacher, st.targets, cfg.eval_forget_samples,
                                    cfg.eval_remain_per_class, progress=progress and lead, reference=cfg.reference,
                                    dist=dist, device=device, **extra)

    imgs_per_iter = st.imgs_per_iter
    total_iters = total_iterations(cfg)
    eval_every = max(1, round(cfg.eval_every_kimg * 1000 / imgs_per_iter))
    ckpt_every = max(1, round(cfg.checkpoint_every_kimg * 1000 / imgs_per_iter))

    def gen_fn(z, c):
        with st.autocast():
            return one_step(st.generator_ema, z.to(device), c.to(device), st.sigma_init).float()

    def run_eval() -> dict:
        m = {"iteration": st.iteration, "kimg": st.iteration * imgs_per_iter / 1000, "train_seconds": train_seconds,
             "wall_seconds": time.time() - t_start}
        if losses_log:
            recent = losses_log[-min(len(losses_log), eval_every):]
            m["loss_fake_score"] = sum(r[0] for r in recent) / len(recent)
            m["loss_generator"] = sum(r[1] for r in recent) / len(recent)
        if evaluator is not None:
            m.update(evaluator(gen_fn))          # every rank generates its share; rank 0 gets the metrics
        return m

    bar = tqdm(total=total_iters, initial=st.iteration, desc=f"SFD forget {st.targets.describe()}", unit="it",
               disable=not (progress and lead), dynamic_ncols=True)
    if st.iteration == 0 and cfg.eval_at_start:
        m0 = run_eval()
        history.append(m0)
        if callback:
            callback(m0, None)
    stopped_early = False
    while st.iteration < total_iters:
        t_iter = time.time()
        stage1 = st.iteration * imgs_per_iter < cfg.stage1_kimg * 1000
        loss_fake, loss_gen = sfd_iteration(st, stage1=stage1)
        train_seconds += time.time() - t_iter
        losses_log.append((loss_fake, loss_gen))
        bar.update(1)
        kimg_now = st.iteration * imgs_per_iter / 1000
        post = {"kimg": f"{kimg_now:.1f}", "L_psi": f"{loss_fake:.3f}", "L_theta": f"{loss_gen:.3f}"}

        # rank 0's clock decides the time limit for everyone
        out_of_time = cfg.max_seconds > 0 and train_seconds >= cfg.max_seconds
        done = st.iteration >= total_iters or dist.decide(out_of_time, device)
        # a scheduled evaluation less than half an interval before the end is left to the final one
        # (20 kimg at 128 images per iteration is 157 iterations: not an evaluation at 156 and at 157)
        scheduled = st.iteration % eval_every == 0 and total_iters - st.iteration >= eval_every / 2
        if scheduled or done:
            m = run_eval()
            history.append(m)
            if "ua" in m:
                post.update(UA=f"{m['ua']:.3f}", FD=f"{m['fd_remaining']:.3f}")
            if stop_when is not None and dist.decide(lead and stop_when(m), device):
                done = stopped_early = True
            ckpt_dir = None
            if lead and (st.iteration % ckpt_every == 0 or done):
                ckpt_dir = save_checkpoint(out_dir, st.iteration, st.modules(), st.optimizers(), st.rng, run_id=run_id, info={
                    "config": cfg.to_dict(), "history": history, "losses": losses_log,
                    "train_seconds": train_seconds, "kimg": kimg_now, "sigma_init_resolved": st.sigma_init,
                    "scalers": {k: v.state_dict() for k, v in st.scalers.items()}})
            if callback:
                callback(m, ckpt_dir)
        bar.set_postfix(post, refresh=False)
        if done:
            break
    bar.close()

    final = dict(history[-1]) if history else {}
    final["stopped_early"] = stopped_early
    final["sigma_init_resolved"] = st.sigma_init
    final["precision_resolved"] = st.precision
    if lead:
        final.update(_write_outputs(out_dir, cfg, preset, teacher, st, evaluator, history, gen_fn, device,
                                    evaluate, measure_speed))
    return final


def _write_outputs(out_dir: Path, cfg, preset, teacher, st, evaluator, history, gen_fn, device,
                   evaluate: bool, measure_speed: bool) -> dict:
    """Export the generator and write metrics.json, history.json, curves and sample grids."""
    from .evaluate.plots import plot_history
    from .evaluate.report import save_grid

    extra = {}
    info = {"sigma_init": st.sigma_init, "forget": cfg.forget_concepts or cfg.forget, "override": cfg.override,
            "preset": cfg.preset, "one_step": True}
    from .export import export_one_step, is_latent
    if is_latent(st.generator_ema):       # Stable Diffusion: a diffusers pipeline folder (sfd.export)
        export_one_step(out_dir / "pipeline", st.generator_ema, st.sigma_init, {"generator": info, "config": cfg.to_dict()})
    else:
        save_denoiser(out_dir / "generator.safetensors", st.generator_ema, {"generator": info})
    if evaluate and evaluator is not None:
        if measure_speed:
            from .evaluate.forgetting import throughput
            # at the training batch: on a CPU the teacher's 35-call sampler on large backbones is slow
            batch = min(500, cfg.batch_remain + cfg.batch_forget)
            shape = teacher.img_shape if preset.extra.get("latent") else preset.img_shape    # sd: the UNet's latents
            extra.update(throughput(gen_fn, teacher, shape, batch=batch, device=device, repeats=2))
        imgs, nrow = evaluator.grid_images(generator_fn=gen_fn)
        save_grid(out_dir / "samples_generator.png", imgs, nrow)
        if hasattr(evaluator, "teacher_grid"):           # text presets: the same prompts from the teacher
            save_grid(out_dir / "samples_teacher.png", *evaluator.teacher_grid(teacher))
        else:
            from .evaluate.forgetting import first_per_class
            idx = first_per_class(evaluator.teacher_labels, range(preset.num_classes), nrow)
            save_grid(out_dir / "samples_teacher.png", evaluator.teacher_images[idx], nrow)
        plot_history(history, out_dir / "curves.png", title=f"SFD {cfg.preset}: forget {cfg.forget_concepts or cfg.forget} -> {cfg.override}")
    metrics = {**(history[-1] if history else {}), **extra, "sigma_init_resolved": st.sigma_init,
               "precision_resolved": st.precision,
               "config": cfg.to_dict()}
    write_json(out_dir / "history.json", history)
    write_json(out_dir / "metrics.json", metrics)
    return extra
