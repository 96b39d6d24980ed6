"""How forgetting is judged (SFD.md section 8), at fixed, stated sample counts.

The generator is compared with the teacher's own 18-step Heun samples at *equal* sample
counts, since FD is biased by sample size. Teacher samples are costly (35 network calls
each), so they are cached on disk per teacher, count, steps and seed.

On N ranks the work is sharded: samples are produced in fixed chunks of ``CHUNK`` rows, each
drawn from its own seeded noise, and every rank generates and featurises a contiguous run
of chunks; the outputs are gathered and rank 0 computes the metrics. Chunks do not depend on
the number of ranks, so 1 and N workers compute the same samples.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..distributed import Dist
from ..io import CheckpointError, atomic_path, load_tensors, save_tensors
from ..samplers import sample_heun, teacher_grid
from .metrics import accuracy, feature_stats, frechet_distance, judge_outputs, unlearning_accuracy
from .report import RealReference


def cache_dir() -> Path:
    return Path(os.environ.get("SFD_CACHE", Path.home() / ".cache" / "sfd"))


def teacher_fingerprint(teacher) -> str:
    """The teacher's identity: its state dict and what the denoiser holds outside it (a text encoder:
    ``identity_parts``). It keys the teacher's reference samples, stage 1 and a chain's teacher check."""
    h = hashlib.sha256()
    for k, v in sorted(teacher.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    # a model without extra parts (every class teacher) keeps the fingerprint it always had (the bundled stage 1's key)
    extra = teacher.identity_parts() if hasattr(teacher, "identity_parts") else {}
    for k, v in sorted(extra.items()):
        h.update(k.encode())
        h.update(v)
    return h.hexdigest()[:16]


CHUNK = 500


def sharded(fn, n: int, dist=None, device="cpu", chunk: int = CHUNK):
    """Rows 0..n of ``fn(start, end) -> tuple of tensors``, computed chunk by chunk, each rank a
    contiguous run of chunks, gathered on every rank (in row order)."""
    dist = dist or Dist()
    bounds = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    mine = bounds[slice(*dist.bounds(len(bounds)))]
    if mine:
        outs = [fn(a, b) for a, b in mine]
        local = [torch.cat(parts) for parts in zip(*outs)]
    else:                                      # more ranks than chunks: idle, but shaped like the rest
        local = [t[:0] for t in fn(0, 1)]
    if dist.world_size == 1:
        return tuple(t.cpu() for t in local)
    sizes = [sum(b - a for a, b in bounds[slice(*dist.bounds(len(bounds), r))]) for r in range(dist.world_size)]
    return tuple(dist.gather_rows(t, sizes, device) for t in local)


def reference_name(fingerprint: str, num_classes: int, per_class: int, steps: int = 18, seed: int = 1234) -> str:
    """File name of the teacher's reference samples: the digest of its weights and the sampler settings."""
    return f"teacher-{fingerprint}-{per_class}x{num_classes}-heun{steps}-s{seed}-c{CHUNK}.safetensors"


REFERENCE_STORE_ENV = "SFD_REFERENCE_STORE"


def fetch_reference(path: Path) -> bool:
    """Copy ``path.name`` from the reference store ($SFD_REFERENCE_STORE: a URI pyarrow understands,
    set by the sweep on every node) into the local cache; False when there is no store or no copy."""
    uri = os.environ.get(REFERENCE_STORE_ENV)
    if not uri:
        return False
    import pyarrow.fs as pafs
    fs, root = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), str(Path(uri).resolve()))
    src = root.rstrip("/") + "/" + path.name
    if fs.get_file_info(src).type != pafs.FileType.File:
        return False
    with fs.open_input_stream(src) as f, atomic_path(path) as tmp:
        tmp.write_bytes(f.read())
    return True


def chunk_noise(seed: int, a: int, b: int, shape) -> torch.Tensor:
    """z of rows a..b (within one chunk): chunk a // CHUNK has its own seeded noise, so any process
    and any number of ranks draw the same rows."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + a // CHUNK)
    off = a % CHUNK
    return torch.randn((CHUNK, *shape), generator=g)[off: off + b - a]


def teacher_chunk(teacher, labels: torch.Tensor, a: int, b: int, steps: int = 18, seed: int = 1234,
                  device=None) -> torch.Tensor:
    """Rows a..b (within one chunk) of the reference samples: chunk a // CHUNK has its own seeded noise,
    so any process computes the same rows."""
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    sigmas = teacher_grid(teacher, steps, device)
    z = chunk_noise(seed, a, b, teacher.img_shape).to(device)
    return sample_heun(teacher, z * float(sigmas[0]), sigmas, labels[a:b].to(device)).cpu()


def teacher_samples(teacher, num_classes: int, per_class: int, steps: int = 18, seed: int = 1234,
                    progress: bool = False, dist=None, device=None,
                    bundled: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels): ``per_class`` Heun samples of every class, cached on disk (and fetched from the
    sweep's reference store when there is one, or read from ``bundled``, the folder of reference files
    shipped with an embedded preset); sharded over ranks."""
    dist = dist or Dist()
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    name = reference_name(teacher_fingerprint(teacher), num_classes, per_class, steps, seed)
    path = cache_dir() / name
    cached = None
    if not path.is_file():
        fetch_reference(path)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    # the name is the key (teacher digest + sampler settings): any intact file of that name holds these rows
    for candidate in (path, *([Path(bundled) / name] if bundled is not None else [])):
        if cached is None and candidate.is_file():
            try:
                t, _ = load_tensors(candidate)
                if torch.equal(t["labels"], labels) and len(t["x"]) == len(labels):
                    cached = t["x"], t["labels"]
            except (CheckpointError, KeyError) as e:  # a damaged entry is recomputed (the cache) or skipped
                print(f"note: teacher reference {candidate} is damaged ({type(e).__name__}: {e}); not used",
                      flush=True)
    if dist.all_true(cached is not None, device):
        return cached
    bar = tqdm(total=len(labels), disable=not progress, desc=f"teacher {steps}-step Heun", unit="img")

    def sample(a, b):
        x = teacher_chunk(teacher, labels, a, b, steps, seed, device)
        bar.update(b - a)
        return (x,)

    (x,) = sharded(sample, len(labels), dist, device)
    bar.close()
    if dist.lead:
        if path.is_file():
            path.unlink()
        save_tensors(path, {"x": x, "labels": labels})
    return x, labels


MAX_FLOOR_SETS = 16


def _stats(ref):
    """(mu, cov) of reference features, or the precomputed pair as it is."""
    return ref if isinstance(ref, tuple) else feature_stats(ref)


def first_per_class(labels: torch.Tensor, classes, n: int, skip: int = 0) -> torch.Tensor:
    """Rows of the ``n`` samples of every class in ``classes`` after its first ``skip``."""
    return torch.cat([torch.nonzero(labels == c).flatten()[skip:skip + n] for c in classes])


class ForgetEvaluator:
    """Evaluates a one-step generator against the teacher at fixed sample counts.

    Built on every rank of a run; each rank generates and judges its share, rank 0 alone holds
    the real-image reference and computes UA / FD (the other ranks get ``{}``).
    """

    def __init__(self, preset, judge, teacher, targets, forget_samples: int = 1000, remain_per_class: int = 200,
                 seed: int = 777, progress: bool = False, reference=None, dist=None, device=None, fd_draws: int = 1):
        self.preset, self.judge, self.targets = preset, judge, targets
        self.forget_samples, self.remain_per_class = forget_samples, remain_per_class
        # The generator's remaining-class FD is averaged over ``fd_draws`` disjoint draws of
        # ``remain_per_class`` samples per class, as the teacher's floor is averaged over its disjoint
        # sets: the same count per FD (the same expectation), a smaller spread between noise seeds.
        self.fd_draws = int(fd_draws)
        if self.fd_draws < 1:
            raise ValueError(f"fd_draws {fd_draws}: give at least 1 draw (1: one draw, the default)")
        self.dist = dist or Dist()
        self.device = torch.device(device) if device is not None else next(judge.parameters()).device
        self.seed = seed
        self.ref = RealReference.from_preset(preset, judge, reference) if self.dist.lead else None
        per_class = max(remain_per_class, forget_samples)
        bundle = preset.weights_dir / "reference" if preset.embedded else None
        tx, tl = teacher_samples(teacher, preset.num_classes, per_class, progress=progress, dist=self.dist,
                                 device=self.device, bundled=bundle)
        # Fixed evaluation inputs: the same labels (and per-chunk noise) at every evaluation of a run.
        nf = len(targets.forget)
        self.forget_labels = torch.tensor(targets.forget).repeat_interleave(
            torch.tensor([forget_samples // nf + (i < forget_samples % nf) for i in range(nf)]))
        self.remain_labels = torch.tensor(targets.remain).repeat_interleave(remain_per_class).repeat(self.fd_draws)
        self.labels = torch.cat([self.forget_labels, self.remain_labels])
        # The teacher's figures at the same counts (judged on every rank's share, measured on rank 0).
        # A floor is one FD measured on a finite sample: the teacher's own figure is averaged over
        # every disjoint set of equal count its samples hold (``floor_sets``; 15 of 200 per class
        # for a digits evaluation): one draw of it moved a target's FD ratio by 10-20 %.
        n_over = [int((self.forget_labels == f).sum()) for f in targets.forget]
        self.floor_sets = max(1, min(MAX_FLOOR_SETS, per_class // max(remain_per_class, 1)))
        remain_sets = [first_per_class(tl, targets.remain, remain_per_class, k * remain_per_class)
                       for k in range(self.floor_sets)]
        override_sets = []                  # per pair: the disjoint sets of that pair's count
        for n, intended in zip(n_over, targets.intended_override()):
            m = max(2, n // len(intended))
            override_sets.append([first_per_class(tl, intended, m, k * m)
                                  for k in range(max(1, min(MAX_FLOOR_SETS, per_class // m)))])
        parts = remain_sets + [i for sets in override_sets for i in sets]
        t_pred, _, t_feats = self._judge(tx[torch.cat(parts)])
        self.teacher = {}
        if self.dist.lead:
            feats_of = np.split(t_feats, np.cumsum([len(i) for i in parts])[:-1])
            ref_remain = _stats(self.ref.of(targets.remain))
            fd_r = [frechet_distance(f, ref_remain) for f in feats_of[:len(remain_sets)]]
            self.teacher = {
                "fd_remaining_teacher": sum(fd_r) / len(fd_r),
                "remaining_accuracy_teacher": accuracy(t_pred[:len(remain_sets[0])], tl[remain_sets[0]]),
                "teacher_floor_sets": len(fd_r),
            }
            # the teacher's own FD for the override target, with as many samples as the forget class gets
            fd_o, k = [], len(remain_sets)
            for sets, intended in zip(override_sets, targets.intended_override()):
                ref_o = _stats(self.ref.of(intended))
                fd_o.append(sum(frechet_distance(f, ref_o) for f in feats_of[k:k + len(sets)]) / len(sets))
                k += len(sets)
            self.teacher["fd_override_teacher"] = sum(fd_o) / len(fd_o)
        self.teacher_images = tx
        self.teacher_labels = tl

    def _judge(self, x: torch.Tensor):
        """Judge outputs (pred, probs, feats as numpy) of images ``x``, sharded over ranks."""
        def run(a, b):
            pred, probs, feats = judge_outputs(self.judge, x[a:b])
            return pred, probs, torch.from_numpy(feats)
        pred, probs, feats = sharded(run, len(x), self.dist, self.device)
        return pred, probs, feats.numpy()

    def noise(self, a: int, b: int) -> torch.Tensor:
        """z of rows a..b (within one chunk): every chunk has its own seeded noise."""
        return chunk_noise(self.seed, a, b, self.preset.img_shape)

    @torch.no_grad()
    def _outputs(self, generator_fn):
        def run(a, b):
            x = generator_fn(self.noise(a, b).to(self.device), self.labels[a:b].to(self.device)).float()
            pred, probs, feats = judge_outputs(self.judge, x)
            return pred, probs, torch.from_numpy(feats)
        return sharded(run, len(self.labels), self.dist, self.device)

    @torch.no_grad()
    def generate(self, generator_fn, rows=None) -> torch.Tensor:
        """The generator's evaluation images (all of them, or ``rows``), on this rank alone."""
        rows = torch.arange(len(self.labels)) if rows is None else torch.as_tensor(rows)
        chunks = {int(c): self.noise(int(c) * CHUNK, int(c) * CHUNK + CHUNK) for c in (rows // CHUNK).unique()}
        z = torch.stack([chunks[int(i) // CHUNK][int(i) % CHUNK] for i in rows])
        return generator_fn(z.to(self.device), self.labels[rows].to(self.device)).float().cpu()

    @torch.no_grad()
    def __call__(self, generator_fn) -> dict:
        """Metrics of ``generator_fn(z, labels) -> images`` (z ~ N(0, I)); call it on every rank."""
        pred, probs, feats = self._outputs(generator_fn)
        if not self.dist.lead:
            return {}
        feats = feats.numpy()
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
        per_target = {str(f): unlearning_accuracy(fpred, self.forget_labels, [f]) for f in tg.forget}
        m = {
            "ua": unlearning_accuracy(fpred, self.forget_labels, tg.forget),
            "ua_per_target": per_target,        # each forgotten class on its own (chained forgetting: rebound)
            "ua_worst": min(per_target.values()),
            "override_rate": overridden / nf,
            "forget_prob_mean": float(p_forget.mean()),
            "forget_entropy_mean": float(entropy.mean()),
            "remaining_accuracy": accuracy(rpred, self.remain_labels),
            "fd_remaining": self._fd_remaining(rfeats),
            "fd_draws": self.fd_draws,
            "fd_forget_vs_override": sum(fd_o) / len(fd_o),
            "n_forget_samples": nf,
            "n_remaining_samples": len(self.remain_labels),
            **self.teacher,
        }
        m["fd_ratio"] = m["fd_remaining"] / max(m["fd_remaining_teacher"], 1e-12)
        m["override_fd_ratio"] = m["fd_forget_vs_override"] / max(m["fd_override_teacher"], 1e-12)
        return m

    def _fd_remaining(self, rfeats: np.ndarray) -> float:
        """The mean FD of the ``fd_draws`` consecutive draws (each every remaining class at its count)."""
        ref = self.ref.of(self.targets.remain)
        return float(np.mean([frechet_distance(f, ref) for f in np.split(rfeats, self.fd_draws)]))

    def grid_images(self, generator_fn, per_class: int = 10):
        """(images, nrow) for a grid with one row per class, forget classes first (this rank alone)."""
        idx = first_per_class(self.labels, range(self.preset.num_classes), per_class)
        return self.generate(generator_fn, idx), per_class

    def teacher_grid(self, teacher=None, per_class: int = 10):
        """(images, nrow): the teacher's reference samples in the same layout as :meth:`grid_images`."""
        idx = first_per_class(self.teacher_labels, range(self.preset.num_classes), per_class)
        return self.teacher_images[idx], per_class


@torch.no_grad()
def throughput(generator_fn, teacher, img_shape, batch: int = 500, steps: int = 18, device="cpu", repeats: int = 3):
    """Images per second of the one-step generator and the teacher's Heun sampler, same batch."""
    labels = torch.arange(batch, device=device) % max(teacher.num_classes, 1)
    z = torch.randn((batch, *img_shape), device=device)
    sigmas = teacher_grid(teacher, steps, device)

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
