"""How forgetting is judged (SFD.md section 8), at fixed, stated sample counts.

The generator is compared with the teacher's own 18-step Heun samples at *equal* sample
counts, since FD is biased by sample size. Teacher samples are costly (35 network calls
each), so they are cached on disk per teacher, count, steps and seed.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch

from ..io import CheckpointError, load_tensors, save_tensors
from ..samplers import sample_teacher
from .metrics import accuracy, frechet_distance, judge_outputs, unlearning_accuracy
from .report import RealReference


def cache_dir() -> Path:
    return Path(os.environ.get("SFD_CACHE", Path.home() / ".cache" / "sfd"))


def teacher_fingerprint(teacher) -> str:
    h = hashlib.sha256()
    for k, v in sorted(teacher.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def teacher_samples(teacher, num_classes: int, per_class: int, steps: int = 18, seed: int = 1234,
                    progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels): ``per_class`` Heun samples of every class, cached on disk."""
    path = cache_dir() / f"teacher-{teacher_fingerprint(teacher)}-{per_class}x{num_classes}-heun{steps}-s{seed}.safetensors"
    if path.is_file():
        try:
            t, _ = load_tensors(path)
            return t["x"], t["labels"]
        except CheckpointError:
            path.unlink(missing_ok=True)          # a damaged cache entry is recomputed
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    x = sample_teacher(teacher, labels, steps=steps, generator=torch.Generator().manual_seed(seed),
                       progress=progress)
    save_tensors(path, {"x": x, "labels": labels})
    return x, labels


def first_per_class(labels: torch.Tensor, classes, n: int) -> torch.Tensor:
    return torch.cat([torch.nonzero(labels == c).flatten()[:n] for c in classes])


class ForgetEvaluator:
    """Evaluates a one-step generator against the teacher at fixed sample counts."""

    def __init__(self, preset, judge, teacher, targets, forget_samples: int = 1000, remain_per_class: int = 200,
                 seed: int = 777, progress: bool = False, reference=None):
        self.preset, self.judge, self.targets = preset, judge, targets
        self.forget_samples, self.remain_per_class = forget_samples, remain_per_class
        self.ref = RealReference.from_preset(preset, judge, reference)
        per_class = max(remain_per_class, forget_samples)
        tx, tl = teacher_samples(teacher, preset.num_classes, per_class, progress=progress)
        # Fixed evaluation inputs: the same noise and labels at every evaluation of a run.
        g = torch.Generator().manual_seed(seed)
        nf = len(targets.forget)
        self.forget_labels = torch.tensor(targets.forget).repeat_interleave(
            torch.tensor([forget_samples // nf + (i < forget_samples % nf) for i in range(nf)]))
        self.remain_labels = torch.tensor(targets.remain).repeat_interleave(remain_per_class)
        self.labels = torch.cat([self.forget_labels, self.remain_labels])
        self.z = torch.randn((len(self.labels), *preset.img_shape), generator=g)
        # The teacher's figures at the same counts.
        remain_idx = first_per_class(tl, targets.remain, remain_per_class)
        t_pred, _, t_feats = judge_outputs(judge, tx[remain_idx])
        self.teacher = {
            "fd_remaining_teacher": frechet_distance(t_feats, self.ref.of(targets.remain)),
            "remaining_accuracy_teacher": accuracy(t_pred, tl[remain_idx]),
        }
        # The teacher's own FD for the override target, with as many samples as the forget class gets.
        fd_o = []
        for f, intended in zip(targets.forget, targets.intended_override()):
            n = int((self.forget_labels == f).sum())
            per = max(2, n // len(intended))
            idx = first_per_class(tl, intended, per)
            _, _, feats = judge_outputs(judge, tx[idx])
            fd_o.append(frechet_distance(feats, self.ref.of(intended)))
        self.teacher["fd_override_teacher"] = sum(fd_o) / len(fd_o)
        self.teacher_images = tx
        self.teacher_labels = tl

    @torch.no_grad()
    def generate(self, generator_fn, batch_size: int = 1000) -> torch.Tensor:
        out = [generator_fn(z, c).float().cpu() for z, c in zip(self.z.split(batch_size), self.labels.split(batch_size))]
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, generator_fn) -> dict:
        """Metrics of ``generator_fn(z, labels) -> images`` (z ~ N(0, I), on the judge's device)."""
        x = self.generate(generator_fn)
        pred, probs, feats = judge_outputs(self.judge, x)
        nf = len(self.forget_labels)
        fpred, fprobs, ffeats = pred[:nf], probs[:nf], feats[:nf]
        rpred, rfeats = pred[nf:], feats[nf:]
        tg = self.targets
        p_forget = fprobs[torch.arange(nf), self.forget_labels]
        entropy = -(fprobs.clamp_min(1e-12).log() * fprobs).sum(1)
        overridden, fd_o = 0, []
        for f, intended in zip(tg.forget, tg.intended_override()):
            m = self.forget_labels == f
            overridden += int(torch.isin(fpred[m], torch.tensor(intended)).sum())
            fd_o.append(frechet_distance(ffeats[m.numpy()], self.ref.of(intended)))
        m = {
            "ua": unlearning_accuracy(fpred, self.forget_labels, tg.forget),
            "override_rate": overridden / nf,
            "forget_prob_mean": float(p_forget.mean()),
            "forget_entropy_mean": float(entropy.mean()),
            "remaining_accuracy": accuracy(rpred, self.remain_labels),
            "fd_remaining": frechet_distance(rfeats, self.ref.of(tg.remain)),
            "fd_forget_vs_override": sum(fd_o) / len(fd_o),
            "n_forget_samples": nf,
            "n_remaining_samples": len(self.remain_labels),
            **self.teacher,
        }
        m["fd_ratio"] = m["fd_remaining"] / max(m["fd_remaining_teacher"], 1e-12)
        m["override_fd_ratio"] = m["fd_forget_vs_override"] / max(m["fd_override_teacher"], 1e-12)
        return m

    def grid_images(self, x: torch.Tensor | None = None, generator_fn=None, per_class: int = 10):
        """(images, nrow) for a grid with one row per class, forget classes first."""
        if x is None:
            x = self.generate(generator_fn)
        idx = first_per_class(self.labels, range(self.preset.num_classes), per_class)
        return x[idx], per_class


@torch.no_grad()
def throughput(generator_fn, teacher, img_shape, batch: int = 500, steps: int = 18, device="cpu", repeats: int = 3):
    """Images per second of the one-step generator and the teacher's Heun sampler, same batch."""
    from ..samplers import karras_sigmas, sample_heun
    labels = torch.arange(batch, device=device) % max(teacher.num_classes, 1)
    z = torch.randn((batch, *img_shape), device=device)
    sigmas = karras_sigmas(steps, max(teacher.sigma_min, 0.002), min(teacher.sigma_max, 80.0), device=device)

    def best_time(fn):
        fn()                                           # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times)

    tg = best_time(lambda: generator_fn(z, labels))
    tt = best_time(lambda: sample_heun(teacher, z * float(sigmas[0]), sigmas, labels))
    return {"images_per_second_generator": batch / tg, "images_per_second_teacher": batch / tt,
            "speedup": tt / tg, "throughput_batch": batch}
