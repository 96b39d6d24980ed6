"""`sfd bench`: the embedded default's speed and quality figures, measured in one run.

Ratios are taken against baselines measured in the same process (teacher sampler vs
one-step generator on the same batch, SFD iteration vs teacher training step at equal total
batch), so the figures survive a noisy shared machine better than absolute times.
"""
from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import torch

from .config import SFDConfig
from .io import write_json


def _first(history, pred):
    for h in history:
        if "ua" in h and pred(h):
            return h
    return None


def iteration_vs_teacher_step(cfg: SFDConfig, teacher, repeats: int = 10) -> dict:
    """Seconds of one SFD iteration vs one EDM teacher training step at equal total batch."""
    from .loop import one_step
    from .losses import edm_loss, fake_score_loss, generator_loss

    device = next(teacher.parameters()).device
    n = cfg.batch_remain + cfg.batch_forget
    shape = teacher.img_shape
    x0 = torch.rand((n, *shape), device=device) * 2 - 1
    labels = torch.randint(0, teacher.num_classes, (n,), device=device)
    student = teacher.clone().train()
    fake = teacher.clone().train()
    opt_s = torch.optim.Adam(student.parameters(), 1e-4)
    opt_f = torch.optim.Adam(fake.parameters(), 1e-4)

    def teacher_step():
        loss = edm_loss(student, x0, labels).mean()
        opt_s.zero_grad()
        loss.backward()
        opt_s.step()

    def sfd_iteration():
        z = torch.randn((n, *shape), device=device)
        sigma = torch.rand(n, 1, 1, 1, device=device) * 2 + 0.2
        with torch.no_grad():
            xg = one_step(student, z, labels, 2.5)
        lf = fake_score_loss(fake(xg + sigma * z, sigma, labels), xg, fake.loss_weight(sigma)).mean()
        opt_f.zero_grad()
        lf.backward()
        opt_f.step()
        fake.requires_grad_(False)
        xg = one_step(student, z, labels, 2.5)
        x = xg + sigma * z
        lg = generator_loss(teacher(x, sigma, labels), fake(x, sigma, labels), xg, 1.2).mean()
        opt_s.zero_grad()
        lg.backward()
        opt_s.step()
        fake.requires_grad_(True)

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

    t_teacher, t_sfd = timed(teacher_step), timed(sfd_iteration)
    return {"batch": n, "teacher_step_seconds": t_teacher, "sfd_iteration_seconds": t_sfd,
            "sfd_iteration_over_teacher_step": t_sfd / t_teacher}


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def run_bench(a) -> int:
    from .denoisers import load_teacher
    from .evaluate import load_judge
    from .loop import train_sfd
    from .presets import get_preset

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
        cfg = SFDConfig(forget=[c], override=override, budget_kimg=10_000, max_seconds=a.seconds,
                        eval_every_kimg=a.eval_every_kimg, checkpoint_every_kimg=10_000)
        run_dir = out / f"forget{c}"
        # Unless --full-budget, a digit is done once forgetting and quality targets hold together.
        stop = None if a.full_budget else (lambda h: h["ua"] >= 0.99 and h["fd_ratio"] <= 2.0 and
                                           h["remaining_accuracy_teacher"] - h["remaining_accuracy"] <= 0.02)
        final = train_sfd(cfg, run_dir, progress=not a.no_progress, teacher=teacher, judge=judge, stop_when=stop)
        import json
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
    it = iteration_vs_teacher_step(SFDConfig(), teacher)
    from .denoisers import load_denoiser
    from .evaluate.forgetting import throughput
    from .loop import one_step
    gen = load_denoiser(out / f"forget{classes[-1]}" / "generator.safetensors").eval()
    speed = throughput(lambda z, c: one_step(gen, z, c, SFDConfig().sigma_init), teacher, preset.img_shape,
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
