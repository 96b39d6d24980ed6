"""The SFD training loop (SFD.md section 4): schedule, evaluation, checkpoints, reporting; stage 1 (`distil`).

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

import copy
import time
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from .chain import extend
from .checkpoint import latest_checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import SFDConfig
from .denoisers import Denoiser
from .denoisers.ddpm import load_sfd_init
from .distributed import Dist
from .evaluate.forgetting import teacher_fingerprint, throughput
from .evaluate.plots import plot_history
from .evaluate.report import save_grid
from .io import CheckpointError, load_state_strict, load_tensors, write_json
from .iteration import SFDDivergedError, build_state, one_step, sfd_iteration, total_iterations
from .methods.finetune import train_baseline
from .presets import get_preset
from .rundir import RESUMABLE_CHANGES, plan_run_dir  # RESUMABLE_CHANGES re-exported for importers
from .stage1 import export_stage1, resolve_init, stage1_config, stage1_key
from .tasks import get_task
from .utils import pick_device

__all__ = ["train_sfd", "Stopped", "distil", "one_step", "SFDDivergedError", "Dist", "load_generator_init", "RESUMABLE_CHANGES"]


class Stopped(Exception):
    """The run stopped when asked (``should_stop``): ``checkpoint`` is where ``--resume`` continues from."""

    def __init__(self, out_dir: Path, checkpoint: Path | None, iteration: int):
        super().__init__(f"stopped at iteration {iteration}")
        self.out_dir, self.checkpoint, self.iteration = out_dir, checkpoint, iteration


def load_generator_init(path, generator: Denoiser, fake_score: Denoiser) -> None:
    """Start from an earlier SFD run (two-stage): its generator (EMA if present) and fake score.

    ``path`` is an sfd run folder or checkpoint folder, or an official SFD checkpoint
    (``[fake_score, opt, generator, opt, step, ema]`` saved by the reference code).
    """
    path = Path(path)
    if path.is_file() and path.suffix in (".pt", ".pth", ".ckpt"):
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
              measure_speed: bool = True, overwrite: bool = False,
              should_stop: Callable[[], bool] | None = None) -> dict:
    """Run SFD as configured; write checkpoints, metrics and plots under ``out_dir``.

    ``callback(metrics, checkpoint_dir)`` is called on every rank at each evaluation
    (metrics are complete on rank 0 only) and once at the end. ``stop_when(metrics)`` may end
    the run early (used by ``sfd bench``; rank 0 decides). Returns the final metrics. A checkpoint is
    written every ``checkpoint_every_kimg`` and at the end, whatever the evaluation schedule; the
    callback gets it (with the step's losses if no evaluation fell on that step). ``should_stop()``
    (rank 0's answer) true after an iteration: a checkpoint is written there and :class:`Stopped` raised.

    ``out_dir`` is owned by one run (``run.json``): a folder holding another run is refused unless
    ``resume`` (same settings; falls back to the newest intact checkpoint) or ``overwrite`` (the
    old run is moved aside to ``<out>.old-<timestamp>``). All of it is decided before any work.
    """
    if cfg.method != "sfd":                   # a baseline fine-tunes the teacher (sfd/methods/)
        return train_baseline(cfg, out_dir, callback=callback, resume=resume, progress=progress, evaluate=evaluate,
                              teacher=teacher, judge=judge, measure_speed=measure_speed, overwrite=overwrite)
    preset = get_preset(cfg.preset)
    task = get_task(preset)
    # a chain (init_from: an earlier forgetting run) keeps that run's forgotten set: the targets merge first
    cfg, chain = extend(SFDConfig.from_dict(cfg.to_dict()), preset)
    cfg = cfg.validate(preset)
    out_dir = Path(out_dir)
    dist = Dist.current()
    lead = dist.lead
    device = pick_device(cfg.device)
    t_start = time.time()
    # the run folder: decided (read-only) before any work, acted on by the lead once the models load
    plan = plan_run_dir(out_dir, cfg.to_dict(), resume=resume, overwrite=overwrite) if lead else None

    teacher = teacher if teacher is not None else task.load_teacher(cfg.teacher, device, cfg.allow_download)
    # the teacher's identity (metrics.json, chains) is taken as loaded, before build_state: a text task installs
    # the run's prompt table into the teacher there (set_prompts), and the table is a buffer of its state dict,
    # so a fingerprint taken later differs from run to run of one teacher and the next stage of a chain (which
    # checks the teacher as loaded) refused it. The table stays in teacher_fingerprint itself on purpose: it keys
    # the text evaluator's teacher-sample cache, whose condition ids index that table.
    fingerprint = teacher_fingerprint(teacher) if chain is None else chain.check_teacher(teacher, task, cfg.teacher)
    if evaluate and judge is None and not task.can_evaluate(cfg):
        evaluate = False
        if lead:
            print(f"note: UA/FD are not measured: preset '{preset.name}' has no bundled judge; pass --classifier, "
                  f"--fid-weights and --reference to evaluate", flush=True)
    if judge is None and (evaluate or cfg.override == "classifier" or cfg.lambda_anchor > 0):
        judge = task.load_judge(cfg, device)
    init_path = resolve_init(cfg.init_from, preset, teacher)
    init = (lambda gen, fake: load_generator_init(init_path, gen, fake)) if init_path else None
    st = build_state(cfg, teacher, device, dist, judge=judge, init=init)
    teacher = st.teacher

    history, losses_log, train_seconds = [], [], 0.0
    # keep_best_ua: the EMA of the best evaluation so far, kept in the checkpoints beside the run's modules
    best_ema = copy.deepcopy(st.generator_ema) if cfg.keep_best_ua > 0 and evaluate else None
    best = {}

    def modules() -> dict:
        return st.modules() if best_ema is None else {**st.modules(), "generator_best": best_ema}

    def consider(m: dict) -> None:
        """Keep this evaluation's EMA when it beats the best so far (rank 0 decides, every rank copies)."""
        better = bool(lead and "ua" in m and m.get("kimg", 0) > 0 and (not best or _selection_key(m, cfg) >
                                                                        _selection_key(best, cfg)))
        if dist.decide(better, device):
            best_ema.load_state_dict(st.generator_ema.state_dict())
            best.clear()
            best.update({k: m[k] for k in ("iteration", "kimg", "ua", "fd_ratio", "override_fd_ratio") if k in m})

    if lead:
        plan.apply(cfg.to_dict())
        for note in plan.notes:
            print(f"note: {note}", flush=True)
        ckpt, run_id = plan.checkpoint, plan.run_id
    else:
        ckpt, run_id = (resolve_checkpoint(out_dir)[0] if resume else None), None
    if resume:
        if ckpt is not None:
            info = load_checkpoint(ckpt, modules(), st.optimizers(), st.rng, device)
            best.update(info.get("best") or {})
            st.iteration, history = info["iteration"], info.get("history", [])
            losses_log, train_seconds = info.get("losses", []), info.get("train_seconds", 0.0)
            for name, sd in info.get("scalers", {}).items():
                st.scalers[name].load_state_dict(sd)
            if lead:
                print(f"resuming {out_dir} from {ckpt.name} (iteration {st.iteration})")

    evaluator = None
    if evaluate:
        evaluator = task.evaluator(cfg, judge, teacher, st.targets, progress=progress and lead, dist=dist,
                                   device=device)

    imgs_per_iter = st.imgs_per_iter
    total_iters = total_iterations(cfg)
    eval_every = max(1, round(cfg.eval_every_kimg * 1000 / imgs_per_iter))
    ckpt_every = max(1, round(cfg.checkpoint_every_kimg * 1000 / imgs_per_iter))

    def gen_fn(z, c):
        with st.autocast():
            return one_step(st.generator_ema, z.to(device), c.to(device), st.sigma_init).float()

    def progress_metrics() -> dict:
        m = {"iteration": st.iteration, "kimg": st.iteration * imgs_per_iter / 1000, "train_seconds": train_seconds,
             "wall_seconds": time.time() - t_start, "nfe": 1}
        if losses_log:
            recent = losses_log[-min(len(losses_log), eval_every):]
            m["loss_fake_score"] = sum(r[0] for r in recent) / len(recent)
            m["loss_generator"] = sum(r[1] for r in recent) / len(recent)
        return m

    def run_eval() -> dict:
        m = progress_metrics()
        if evaluator is not None:
            m.update(evaluator(gen_fn))          # every rank generates its share; rank 0 gets the metrics
            if chain is not None:
                m.update(chain.rebound(m))       # how far each earlier stage's target fell back
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
        # a stop asked for by a signal (`sfd forget`: Ctrl-C, SIGTERM) ends the run here, with a checkpoint
        interrupted = not done and should_stop is not None and dist.decide(lead and should_stop(), device)
        m = None
        if scheduled or done:
            m = run_eval()
            history.append(m)
            if best_ema is not None:
                consider(m)
            if "ua" in m:
                post.update(UA=f"{m['ua']:.3f}", FD=f"{m['fd_remaining']:.3f}")
            if stop_when is not None and dist.decide(lead and stop_when(m), device):
                done = stopped_early = True
        # checkpoints keep their own clock (--checkpoint-every-kimg), not the evaluations': a run that
        # evaluates rarely loses at most one checkpoint interval when it is killed
        ckpt_dir = None
        if lead and (st.iteration % ckpt_every == 0 or done or interrupted):
            ckpt_dir = save_checkpoint(out_dir, st.iteration, modules(), st.optimizers(), st.rng, run_id=run_id, info={
                "config": cfg.to_dict(), "history": history, "losses": losses_log, "best": dict(best),
                "train_seconds": train_seconds, "kimg": kimg_now, "sigma_init_resolved": st.sigma_init,
                "scalers": {k: v.state_dict() for k, v in st.scalers.items()}})
        if callback and (m is not None or ckpt_dir is not None):
            # a checkpoint between evaluations is reported with the step's losses only (MLflow logs it)
            callback(m if m is not None else progress_metrics(), ckpt_dir)
        if interrupted:
            bar.close()
            raise Stopped(out_dir, ckpt_dir, st.iteration)
        bar.set_postfix(post, refresh=False)
        if done:
            break
    bar.close()

    final = dict(history[-1]) if history else {}
    if best_ema is not None and best:
        # the kept EMA becomes the run's generator, measured again on noise the selection never saw
        st.generator_ema.load_state_dict(best_ema.state_dict())
        seed = evaluator.seed
        evaluator.seed = seed + 1000
        try:
            final = run_eval()
        finally:
            evaluator.seed = seed
        final.update({"selected_iteration": best.get("iteration"), "selected_kimg": best.get("kimg"),
                      "selection": {k: best[k] for k in ("ua", "fd_ratio", "override_fd_ratio") if k in best},
                      "eval_seed_selection": seed, "eval_seed": seed + 1000})
    final["stopped_early"] = stopped_early
    final["sigma_init_resolved"] = st.sigma_init
    final["precision_resolved"] = st.precision
    if lead:
        final.update(_write_outputs(out_dir, cfg, task, teacher, st, evaluator, history, gen_fn, device,
                                    evaluate, measure_speed, fingerprint, final if best else None))
        if chain is not None:
            chain.record(out_dir, cfg, final, task.chain_pairs(cfg))
    return final


def _write_outputs(out_dir: Path, cfg, task, teacher, st, evaluator, history, gen_fn, device,
                   evaluate: bool, measure_speed: bool, fingerprint: str, selected: dict | None = None) -> dict:
    """Export the generator and write metrics.json, history.json, curves and sample grids."""
    extra = {}
    info = {"sigma_init": st.sigma_init, "forget": cfg.forget_concepts or cfg.forget, "override": cfg.override,
            "preset": cfg.preset, "one_step": True}
    task.export(out_dir, st.generator_ema, st.sigma_init, info, cfg)
    if evaluate and evaluator is not None:
        if measure_speed:
            # at the training batch: on a CPU the teacher's 35-call sampler on large backbones is slow
            batch = min(500, cfg.batch_remain + cfg.batch_forget)
            extra.update(throughput(gen_fn, teacher, task.sample_shape(teacher), batch=batch, device=device,
                                    repeats=2))
        save_grid(out_dir / "samples_generator.png", *evaluator.grid_images(generator_fn=gen_fn))
        save_grid(out_dir / "samples_teacher.png", *evaluator.teacher_grid(teacher))
        plot_history(history, out_dir / "curves.png", title=f"SFD {cfg.preset}: forget {cfg.forget_concepts or cfg.forget} -> {cfg.override}")
    metrics = {**(selected or (history[-1] if history else {})), **extra, "sigma_init_resolved": st.sigma_init,
               "precision_resolved": st.precision, "teacher_fingerprint": fingerprint,
               "config": cfg.to_dict()}
    write_json(out_dir / "history.json", history)
    write_json(out_dir / "metrics.json", metrics)
    return extra


def _selection_key(m: dict, cfg) -> tuple:
    """keep_best_ua's order (larger is better): evaluations at UA >= the threshold first -- those whose
    override FD ratio is within keep_best_max_override_fd before the others -- each by the lowest
    remaining-class FD ratio; below the threshold, by the highest UA."""
    ua, fd = float(m.get("ua", 0.0)), float(m.get("fd_ratio", float("inf")))
    if ua < cfg.keep_best_ua:
        return (0, ua)
    settled = float(m.get("override_fd_ratio", float("inf"))) <= cfg.keep_best_max_override_fd
    return (2 if settled else 1, -fd)


def distil(preset_name: str, kimg: float, out, *, seed: int = 0, progress: bool = True, teacher_module=None,
           command: str = "", **changes) -> Path:
    """Train stage 1 in this process into ``out/run`` and export it to ``out``; return ``out``."""
    cfg = stage1_config(preset_name, kimg, seed, **changes)
    teacher = teacher_module if teacher_module is not None else get_task(preset_name).load_teacher(
        cfg.teacher, allow_download=cfg.allow_download)
    key = stage1_key(cfg, teacher)
    t0 = time.time()
    train_sfd(cfg, Path(out) / "run", teacher=teacher, progress=progress, measure_speed=False, resume=True)
    return export_stage1(Path(out) / "run", Path(out), key, cfg,
                         {"command": command, "wall_seconds": round(time.time() - t0, 1)},
                         teacher_fingerprint=teacher_fingerprint(teacher))
