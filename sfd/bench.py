"""`sfd bench`: the embedded default's speed and quality figures, measured in one run.

Ratios are taken against baselines measured in the same process (teacher sampler vs
one-step generator on the same batch, SFD iteration vs teacher training step at equal total
batch), so the figures survive a noisy shared machine better than absolute times.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import resource
import statistics
import time
from pathlib import Path

import torch

from .config import SFDConfig, config_for_preset
from .denoisers import load_denoiser, load_teacher
from .denoisers.ddpm import DDPM_CONFIGS, ConditionalDDPMUNet, VPDenoiser
from .denoisers.latent_unet import LatentTextUNet
from .evaluate import load_judge
from .evaluate.forgetting import throughput
from .io import load_tensors, write_json
from .iteration import build_state, one_step, sfd_iteration
from .loop import train_sfd
from .losses import edm_loss
from .presets import get_preset


def _first(history, pred):
    for h in history:
        if "ua" in h and pred(h):
            return h
    return None


# Forward-pass equivalents (a backward ~ 2 forwards; a backward to the input only ~ 1):
# SFD iteration = (a) generator forward 1 + fake-score forward/backward 3, (b) generator
# forward/backward 3 + fake score and teacher each forward 1 + backward to the input 1 = 11;
# a teacher training step = forward/backward 3. Guidance doubles the critic passes.
SFD_PASSES, TEACHER_STEP_PASSES = 11, 3


def iteration_vs_teacher_step(cfg: SFDConfig, teacher, repeats: int = 10, device=None) -> dict:
    """Seconds of one real SFD iteration (sfd.iteration.sfd_iteration, the loop's own code) vs one
    EDM teacher training step at equal total batch, and their ratio next to the pass-count limit."""

    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    st = build_state(cfg, teacher, device)
    n = cfg.batch_remain + cfg.batch_forget
    x0 = torch.rand((n, *teacher.img_shape), device=device) * 2 - 1
    labels = torch.randint(0, teacher.num_classes, (n,), device=device)
    student = teacher.clone().train()
    opt = torch.optim.Adam(student.parameters(), 1e-4)

    def teacher_step():
        with st.autocast():
            loss = edm_loss(student, x0, labels).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def timed(fn):
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    t_teacher, t_sfd = timed(teacher_step), timed(lambda: sfd_iteration(st))
    return {"batch": n, "teacher_step_seconds": t_teacher, "sfd_iteration_seconds": t_sfd,
            "sfd_iteration_over_teacher_step": t_sfd / t_teacher,
            "pass_count_limit": SFD_PASSES / TEACHER_STEP_PASSES}


def _iteration_child(arch: str, batch: int, grad_checkpointing: bool, precision: str, queue, lora_rank: int = 0,
                     memory_limit_gb: float = 0.0) -> None:
    """In a fresh process: peak memory of one SFD iteration (forward + backward of both steps)."""
    if memory_limit_gb > 0:              # an overrun fails here, cleanly, instead of taking the machine down
        lim = int(memory_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    torch.manual_seed(0)
    row = {"arch": arch, "batch": batch, "grad_checkpointing": grad_checkpointing, "precision": precision,
           "lora_rank": lora_rank, "memory_limit_gb": memory_limit_gb}
    stage = "building the networks"
    try:
        teacher = random_teacher(arch)
        row["params"] = sum(p.numel() for p in teacher.parameters())
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if arch == "sd15":               # the SD recipe (search_spaces/sd.yaml): CFG in all three guided passes
            cfg = config_for_preset("sd", forget_concepts=["brad pitt"], override="a middle aged man",
                                    batch_remain=max(1, batch // 2), batch_forget=max(1, batch - batch // 2),
                                    grad_checkpointing=grad_checkpointing, precision=precision, lora_rank=lora_rank,
                                    device=device)
        else:
            cfg = SFDConfig(preset="cifar10" if arch != "digits" else "digits", batch_remain=batch // 2,
                            batch_forget=batch - batch // 2, grad_checkpointing=grad_checkpointing,
                            precision=precision, device=device)
        device = torch.device(cfg.device)
        st = build_state(cfg, teacher, device)
        stage = "the iteration"
        _measure_iteration(st, device, row, sfd_iteration)
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "alloc" not in str(e).lower() and "memory" not in str(e).lower():
            raise
        row.update(oom=True, oom_stage=stage, error=str(e).splitlines()[0][:200],
                   peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    queue.put(row)


def _measure_iteration(st, device, row, sfd_iteration) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    t0 = time.perf_counter()
    losses = sfd_iteration(st)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    row.update({"device": device.type, "seconds": seconds, "memory_before_mb": base, "peak_mb": peak,
                "iteration_peak_mb": peak - base, "losses_finite": all(map(math.isfinite, losses)), "oom": False,
                "trained_params": sum(p.numel() for p in st.generator.parameters() if p.requires_grad)})


def random_teacher(arch: str):
    """Full-size backbones with random weights, for speed and memory figures."""
    if arch == "ddpm-cifar10":
        return VPDenoiser(ConditionalDDPMUNet(**DDPM_CONFIGS["cifar10"]))
    if arch == "sd15":
        return random_sd15()
    if arch == "digits":
        return load_teacher(get_preset("digits"))
    raise ValueError(f"--arch {arch!r}: choose ddpm-cifar10 or digits")


# Stable Diffusion 1.5's UNet (its published unet/config.json values), for speed and memory with random weights
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, center_input_sample=False)
SD15_SCHEDULER = dict(_class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, prediction_type="epsilon", set_alpha_to_one=False, steps_offset=1)


class _RandomText:
    """Stands in for CLIP's text encoder in the benchmark: fixed random (77, 768) embeddings per prompt."""
    max_length = 77

    def __call__(self, prompts):
        g = torch.Generator().manual_seed(len(prompts))
        return torch.randn((len(prompts), 77, 768), generator=g)


def random_sd15():
    from diffusers import UNet2DConditionModel

    d = LatentTextUNet(UNet2DConditionModel(**SD15_UNET), SD15_SCHEDULER, None, None, embed_shape=(77, 768))
    d.text.obj = _RandomText()
    return d


def full_finetune_state_bytes(params: int) -> dict:
    """Bytes of full fine-tuning's fp32 state, counted (not measured): teacher + fake score + generator
    weights, the two trained networks' gradients and their Adam first and second moments."""
    b = 4 * params
    return {"weights": 3 * b, "gradients": 2 * b, "adam_moments": 4 * b, "total": 9 * b}


def run_iteration_bench(a) -> int:
    """`sfd bench --iteration`: one SFD iteration's time and peak memory, each variant in a fresh
    process (peak RSS only grows within a process), with and without gradient checkpointing."""
    ctx = mp.get_context("spawn")
    if a.arch == "sd15":
        return _sd15_bench(a, ctx)
    rows = []
    for gc in (False, True):
        q = ctx.Queue()
        p = ctx.Process(target=_iteration_child, args=(a.arch, a.batch, gc, a.precision, q))
        p.start()
        row = q.get()
        p.join()
        rows.append(row)
        print(f"{a.arch} batch {a.batch} {a.precision} grad_checkpointing={gc}: {row['seconds']:.2f} s, "
              f"peak {row['peak_mb']:.0f} MB ({row['iteration_peak_mb']:.0f} MB above the built state), "
              f"losses finite: {row['losses_finite']}", flush=True)
    ratio = rows[1]["iteration_peak_mb"] / max(rows[0]["iteration_peak_mb"], 1e-9)
    print(f"gradient checkpointing: iteration memory x{ratio:.2f}, time x{rows[1]['seconds'] / rows[0]['seconds']:.2f}")
    write_json(Path(a.out) / "bench_iteration.json", {"rows": rows, "memory_ratio_checkpointing": ratio})
    return 0


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def run_bench(a) -> int:
    if a.iteration:
        return run_iteration_bench(a)

    if a.threads:
        torch.set_num_threads(a.threads)
    preset = get_preset("digits")
    classes = [int(c) for c in a.classes.split(",")]
    out = Path(a.out)
    teacher = load_teacher(preset)
    judge = load_judge(preset)
    rows = []
    for c in classes:
        override = str((c + 1) % preset.num_classes) if a.override == "next" else a.override
        cfg = config_for_preset("digits", forget=[c], override=override, budget_kimg=10_000, max_seconds=a.seconds,
                        eval_every_kimg=a.eval_every_kimg, checkpoint_every_kimg=10_000)
        run_dir = out / f"forget{c}"
        # Unless --full-budget, a digit is done once forgetting and quality targets hold together.
        stop = None if a.full_budget else (lambda h: h["ua"] >= 0.99 and h["fd_ratio"] <= 2.0 and
                                           h["remaining_accuracy_teacher"] - h["remaining_accuracy"] <= 0.02)
        final = train_sfd(cfg, run_dir, progress=not a.no_progress, teacher=teacher, judge=judge, stop_when=stop,
                          overwrite=bool(getattr(a, "overwrite", False)))
        history = json.loads((run_dir / "history.json").read_text())
        ua_hit = _first(history, lambda h: h["ua"] >= 0.99)
        both_hit = _first(history, lambda h: h["ua"] >= 0.99 and h["fd_ratio"] <= 2.0)
        rows.append({
            "forget": c, "override": override,
            "seconds_to_ua99": ua_hit["train_seconds"] if ua_hit else None,
            "kimg_to_ua99": ua_hit["kimg"] if ua_hit else None,
            "seconds_to_ua99_and_fd2x": both_hit["train_seconds"] if both_hit else None,
            "kimg_to_ua99_and_fd2x": both_hit["kimg"] if both_hit else None,
            "stopped_at_target": bool(final.get("stopped_early")),
            "final_seconds": final["train_seconds"], "final_kimg": final["kimg"],
            "final_ua": final["ua"], "final_fd_ratio": final["fd_ratio"],
            "best_fd_ratio_with_ua99": min((h["fd_ratio"] for h in history if "ua" in h and h["ua"] >= 0.99),
                                           default=None),
            "final_remaining_accuracy": final["remaining_accuracy"],
            "teacher_remaining_accuracy": final["remaining_accuracy_teacher"],
            "final_override_fd_ratio": final["override_fd_ratio"],
            "images_per_second_generator": final["images_per_second_generator"],
            "images_per_second_teacher": final["images_per_second_teacher"],
        })
        r = rows[-1]
        print(f"forget {c}->{override}: UA>=0.99 at {r['seconds_to_ua99']} s; UA>=0.99 & FD<=2x at "
              f"{r['seconds_to_ua99_and_fd2x']} s; after {r['final_seconds']:.0f} s: UA {r['final_ua']:.3f}, "
              f"FD ratio {r['final_fd_ratio']:.2f}, remaining acc {r['final_remaining_accuracy']:.3f} "
              f"(teacher {r['teacher_remaining_accuracy']:.3f}), override FD ratio {r['final_override_fd_ratio']:.2f}",
              flush=True)
    it = iteration_vs_teacher_step(SFDConfig(), load_teacher(preset))
    gen_path = out / f"forget{classes[-1]}" / "generator.safetensors"
    gen = load_denoiser(gen_path).eval()
    sigma_init = load_tensors(gen_path)[1]["generator"]["sigma_init"]
    speed = throughput(lambda z, c: one_step(gen, z, c, sigma_init), teacher, preset.img_shape,
                       batch=500, repeats=3)

    def med(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return statistics.median(vals) if vals else None

    summary = {
        "targets": len(rows),
        "median_seconds_to_ua99": med("seconds_to_ua99"),
        "median_seconds_to_ua99_and_fd2x": med("seconds_to_ua99_and_fd2x"),
        "reached_ua99_and_fd2x": sum(r["seconds_to_ua99_and_fd2x"] is not None for r in rows),
        "median_final_fd_ratio": med("final_fd_ratio"),
        "median_final_override_fd_ratio": med("final_override_fd_ratio"),
        "max_remaining_accuracy_drop": max(r["teacher_remaining_accuracy"] - r["final_remaining_accuracy"] for r in rows),
        "images_per_second_generator_b500": speed["images_per_second_generator"],
        "images_per_second_teacher_heun18_b500": speed["images_per_second_teacher"],
        "speedup_one_step_vs_heun18_b500": speed["speedup"],
        **it,
        "peak_memory_mb": peak_memory_mb(),
        "torch_threads": torch.get_num_threads(),
        "seconds_budget_per_target": a.seconds,
    }
    write_json(out / "bench.json", {"summary": summary, "targets": rows})
    print("\nsummary")
    for k, v in summary.items():
        print(f"  {k:36s} {v:.4g}" if isinstance(v, float) else f"  {k:36s} {v}")
    print(f"-> {out / 'bench.json'}")
    return 0


def _sd15_bench(a, ctx) -> int:
    """SD 1.5 UNet: full fine-tuning (fp32) vs LoRA on the shared base + bf16 + checkpointing, each in a fresh
    process under an address-space limit (--memory-limit-gb): a variant that does not fit fails cleanly and
    is reported as such, next to the counted size of full fine-tuning's fp32 state."""
    variants = [("full fine-tuning, fp32", dict(gc=False, precision="fp32", lora=0)),
                (f"LoRA r{a.lora_rank} on the shared UNet, bf16, checkpointing",
                 dict(gc=True, precision="bf16", lora=a.lora_rank))]
    rows = []
    for label, v in variants:
        q = ctx.Queue()
        p = ctx.Process(target=_iteration_child, args=("sd15", a.batch, v["gc"], v["precision"], q, v["lora"],
                                                       a.memory_limit_gb))
        p.start()
        p.join()
        row = q.get() if not q.empty() else {"oom": True, "error": f"process exited with code {p.exitcode}",
                                              "peak_mb": float("nan")}
        row["variant"] = label
        rows.append(row)
        if row.get("oom"):
            print(f"sd15 {label}: does not fit in {a.memory_limit_gb:g} GiB of address space (failed while "
                  f"{row.get('oom_stage', '?')}: {row.get('error')}); peak RSS before failing {row['peak_mb']:.0f} MB",
                  flush=True)
        else:
            print(f"sd15 {label}: {row['seconds']:.1f} s, peak RSS {row['peak_mb']:.0f} MB "
                  f"({row['iteration_peak_mb']:.0f} MB above the built state), trained parameters per network "
                  f"{row['trained_params']:,}, losses finite: {row['losses_finite']}", flush=True)
    params = next((r["params"] for r in rows if "params" in r), None)
    out = {"rows": rows, "memory_limit_gb": a.memory_limit_gb}
    if params:
        acc = full_finetune_state_bytes(params)
        out["full_finetune_state_bytes_counted"] = acc
        print(f"full fine-tuning's fp32 state, counted for {params:,} UNet parameters: weights x3 "
              f"{acc['weights'] / 2**30:.1f} GiB + gradients x2 {acc['gradients'] / 2**30:.1f} GiB + Adam moments x4 "
              f"{acc['adam_moments'] / 2**30:.1f} GiB = {acc['total'] / 2**30:.1f} GiB before any activation")
    full, lora = rows
    if not lora.get("oom"):
        if not full.get("oom"):
            out["memory_ratio"] = lora["peak_mb"] / full["peak_mb"]
            print(f"memory ratio (peak RSS, measured): {out['memory_ratio']:.3f}")
        else:
            out["memory_ratio_below"] = lora["peak_mb"] / (a.memory_limit_gb * 1024)
            print(f"memory ratio < {out['memory_ratio_below']:.3f} (measured LoRA peak over the limit full "
                  f"fine-tuning did not fit in); against the counted state alone: "
                  f"{lora['peak_mb'] * 2**20 / acc['total']:.3f}")
    write_json(Path(a.out) / "bench_iteration_sd15.json", out)
    return 0
