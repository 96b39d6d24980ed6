"""Judging text-to-image forgetting on ``colordigits``: a two-headed judge and the concept metrics.

The judge is a small CNN with a digit head and a colour head; its penultimate features are the
Frechet space. ``features_and_logits`` returns the digit head, so class-style code works too.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import colordigits as cd
from ..distributed import Dist
from ..io import CheckpointError, load_state_strict, load_tensors, save_tensors
from ..prompts import contains
from ..samplers import sample_heun, teacher_grid
from .forgetting import cache_dir, chunk_noise, sharded, teacher_fingerprint
from .metrics import frechet_distance
from .report import save_grid

JUDGE_ARCH = "colordigits-cnn"


class ColorDigitsCNN(nn.Module):
    def __init__(self, in_channels: int = 3, num_digits: int = 10, num_colors: int = len(cd.COLOR_NAMES),
                 width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.config = dict(in_channels=in_channels, num_digits=num_digits, num_colors=num_colors, width=width,
                           feature_dim=feature_dim)
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * w * 4, feature_dim), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.digit_head = nn.Linear(feature_dim, num_digits)
        self.color_head = nn.Linear(feature_dim, num_colors)

    def heads(self, x):
        f = self.body(x)
        h = self.dropout(f)
        return f, self.digit_head(h), self.color_head(h)

    def forward(self, x):
        return self.heads(x)[1]

    def features_and_logits(self, x):
        f = self.body(x)
        return f, self.digit_head(f)


def save_colordigits_judge(path, model: ColorDigitsCNN) -> None:
    save_tensors(path, model.state_dict(), {"judge": {"arch": JUDGE_ARCH, "config": model.config}})


def load_colordigits_judge(path, device="cpu") -> ColorDigitsCNN:
    tensors, meta = load_tensors(Path(path), device)
    spec = meta.get("judge")
    if not isinstance(spec, dict) or spec.get("arch") != JUDGE_ARCH:
        raise CheckpointError(f"{path} is not a colordigits judge (metadata 'judge' arch must be {JUDGE_ARCH!r})")
    model = ColorDigitsCNN(**spec["config"])
    load_state_strict(model, tensors, path)
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def judge_both(judge, x: torch.Tensor, batch: int = 1000):
    """(digit pred, colour pred, features as numpy) of images in [-1, 1]."""
    p = next(judge.parameters())
    ds, ks, fs = [], [], []
    for chunk in x.split(batch):
        f, ld, lk = judge.heads(chunk.to(p.device, p.dtype).clamp(-1, 1))
        ds.append(ld.argmax(1).cpu())
        ks.append(lk.argmax(1).cpu())
        fs.append(f.cpu())
    if not ds:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), np.zeros((0, 1))
    return torch.cat(ds), torch.cat(ks), torch.cat(fs).double().numpy()


class RealColorDigits:
    """Judge features of every real colordigits image (all splits), selectable by (digit, colour)."""

    def __init__(self, judge):
        x, y = cd.real_data("all")
        self.digit, self.color = cd.split_label(y)
        _, _, self.feats = judge_both(judge, x)

    def of(self, pairs) -> np.ndarray:
        pairs = {(int(d), int(k)) for d, k in pairs}
        keep = np.array([(int(d), int(k)) in pairs for d, k in zip(self.digit, self.color)])
        return self.feats[keep]

    def floor(self, pairs, seed: int = 0) -> float:
        f = self.of(pairs)
        perm = np.random.default_rng(seed).permutation(len(f))
        half = len(f) // 2
        return frechet_distance(f[perm[:half]], f[perm[half:2 * half]])


def heun_samples(teacher, ids: torch.Tensor, seed: int, steps: int = 18, batch: int = 500, progress: bool = False):
    """18-step Heun samples of ``teacher`` for prompt ids, each batch from its own seeded noise."""

    dev = next(teacher.parameters()).device
    sigmas = teacher_grid(teacher, steps, dev)
    out = []
    for i in tqdm(range(0, len(ids), batch), disable=not progress, desc="teacher Heun", unit="batch"):
        c = ids[i:i + batch]
        g = torch.Generator().manual_seed(seed * 1_000_003 + i // batch)
        z = torch.randn((len(c), *teacher.img_shape), generator=g).to(dev)
        out.append(sample_heun(teacher, z * float(sigmas[0]), sigmas, c.to(dev)).cpu())
    return torch.cat(out) if out else torch.zeros(0, *teacher.img_shape)


def evaluate_text_teacher(teacher, judge, per_prompt: int = 4, seed: int = 0, progress: bool = False,
                          grid_path=None) -> dict:
    """Prompt accuracy (digit and colour both right) on training and held-out templates; FD vs real
    per colour (training-template samples of all digits in that colour) next to the real floor."""
    train = cd.captions(cd.TRAIN_TEMPLATES)
    held = cd.captions(cd.HELDOUT_TEMPLATES)
    caps = [*train, *held]
    teacher.set_prompts(["", *[c.text for c in caps]])
    ids = torch.arange(1, len(caps) + 1).repeat_interleave(per_prompt)
    x = heun_samples(teacher, ids, seed, progress=progress)
    d_true = torch.tensor([caps[i - 1].digit for i in ids])
    k_true = torch.tensor([caps[i - 1].color for i in ids])
    is_train = ids <= len(train)
    pd, pk, feats = judge_both(judge, x)
    ok = (pd == d_true) & (pk == k_true)
    real = RealColorDigits(judge)
    fd_color, floor_color = {}, {}
    for k, name in enumerate(cd.COLOR_NAMES):
        m = (is_train & (k_true == k)).numpy()
        pairs = [(d, k) for d in range(10)]
        ref = real.of(pairs)
        fd_color[name] = round(frechet_distance(feats[m], ref), 4)
        # the floor at the same count: two disjoint real subsets of that size
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(ref))
        n = min(int(m.sum()), len(ref) // 2)
        floor_color[name] = round(frechet_distance(ref[perm[:n]], ref[perm[n:2 * n]]), 4)
    if grid_path is not None:
        pick = []
        for d in range(10):
            for k in range(len(cd.COLOR_NAMES)):
                j = torch.nonzero(is_train & (d_true == d) & (k_true == k)).flatten()[:1]
                pick.append(j)
        save_grid(grid_path, x[torch.cat(pick)], nrow=len(cd.COLOR_NAMES))
    return {
        "sampler": "18-step Heun (35 network evaluations), guidance 0",
        "samples_per_prompt": per_prompt,
        "prompt_accuracy_train_templates": float(ok[is_train].float().mean()),
        "prompt_accuracy_heldout_templates": float(ok[~is_train].float().mean()),
        "digit_accuracy_heldout_templates": float((pd == d_true)[~is_train].float().mean()),
        "color_accuracy_heldout_templates": float((pk == k_true)[~is_train].float().mean()),
        "n_train_template_samples": int(is_train.sum()), "n_heldout_template_samples": int((~is_train).sum()),
        "fd_per_color": fd_color, "fd_real_floor_per_color_same_count": floor_color,
    }


def _spread(ids: list[int], n: int) -> torch.Tensor:
    """``n`` rows cycling through ``ids`` (every prompt gets n / len(ids) samples, +-1)."""
    return torch.tensor(ids)[torch.arange(n) % len(ids)] if ids and n > 0 else torch.zeros(0, dtype=torch.long)


class ConceptEvaluator:
    """Concept forgetting of a one-step generator against the teacher, at fixed sample counts.

    Rows (fixed per run, each CHUNK of rows with its own seeded noise):
      forget       ``forget_samples`` over the forget prompts of the training templates (ua, override_rate)
      heldout      ``forget_samples`` over the forget prompts of the held-out templates (ua_heldout)
      remain       ``remain_per_pair`` per remaining (digit, colour) pair over its training-template prompts
    The teacher's 18-step Heun samples of the remain rows (same prompts, same count) and of the
    override prompts of the forget rows give the ``*_teacher`` figures, cached on disk.
    """

    def __init__(self, preset, judge, teacher, targets, forget_samples: int = 500, remain_per_pair: int = 40,
                 seed: int = 777, progress: bool = False, dist=None, device=None, **_):
        self.preset, self.judge, self.targets, self.seed = preset, judge, targets, seed
        self.dist = dist or Dist()
        self.device = torch.device(device) if device is not None else next(judge.parameters()).device
        tg = targets
        self.forget_rows = _spread(tg.forget_ids, forget_samples)
        self.override_rows = _spread(tg.override_ids, forget_samples)
        self.heldout_rows = _spread(tg.heldout_forget_ids, forget_samples)
        self.heldout_override_rows = _spread(tg.heldout_override_ids, forget_samples)
        by_pair: dict = {}
        for i in tg.remain_ids:
            by_pair.setdefault((tg.table[i].digit, tg.table[i].color), []).append(i)
        self.remain_pairs = sorted(by_pair)
        self.remain_rows = torch.cat([_spread(by_pair[p], remain_per_pair) for p in self.remain_pairs])
        self.labels = torch.cat([self.forget_rows, self.heldout_rows, self.remain_rows])
        self.real = RealColorDigits(judge) if self.dist.lead else None
        self.override_pairs = sorted({(tg.table[i].digit, tg.table[i].color) for i in tg.override_ids})
        # the teacher at the same counts: remain rows and the override prompts of the forget rows
        t_ids = torch.cat([self.remain_rows, self.override_rows])
        tx = self._teacher_samples(teacher, t_ids, progress)
        nr = len(self.remain_rows)
        td, tk, tf = judge_both(judge, tx)
        self.teacher_images, self.teacher_ids = tx, t_ids
        rd, rk = tg.attrs(self.remain_rows)
        ok = (td[:nr] == rd) & (tk[:nr] == rk)
        leak = torch.tensor([tg.contains_override(int(i)) for i in self.remain_rows], dtype=torch.bool)
        self.leak_mask = leak
        self.teacher = {"prompt_accuracy_remaining_teacher": float(ok.float().mean()),
                        "remaining_accuracy_teacher": float(ok.float().mean())}
        if bool(leak.any()):
            self.teacher["leakage_accuracy_teacher"] = float(ok[leak].float().mean())
        if self.dist.lead:
            self.teacher["fd_remaining_teacher"] = frechet_distance(tf[:nr], self.real.of(self.remain_pairs))
            self.teacher["fd_override_teacher"] = frechet_distance(tf[nr:], self.real.of(self.override_pairs))

    def _teacher_samples(self, teacher, ids, progress):

        h = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:12]
        path = cache_dir() / f"text-teacher-{teacher_fingerprint(teacher)}-{h}-heun18-s{self.seed}.safetensors"
        if path.is_file():
            try:
                return load_tensors(path)[0]["x"]
            except CheckpointError:      # a damaged cache entry is recomputed
                pass
        x = heun_samples(teacher, ids, self.seed, progress=progress)
        if self.dist.lead:
            save_tensors(path, {"x": x, "ids": ids})
        return x

    def noise(self, a: int, b: int) -> torch.Tensor:
        return chunk_noise(self.seed, a, b, self.preset.img_shape)

    @torch.no_grad()
    def _outputs(self, generator_fn):

        def run(a, b):
            x = generator_fn(self.noise(a, b).to(self.device), self.labels[a:b].to(self.device)).float()
            d, k, f = judge_both(self.judge, x)
            return d, k, torch.from_numpy(f)
        return sharded(run, len(self.labels), self.dist, self.device)

    def _forget_figures(self, rows, d, k, suffix: str) -> dict:
        """ua / override_rate / other-attribute accuracy on forget rows judged (d, k)."""
        tg = self.targets
        fd, fk = tg.attrs(rows)
        failed, overridden, other_ok, other_n = 0, 0, 0, 0
        hits = {c.name: [0, 0] for c in tg.concepts}       # per concept: (shown, prompts naming it)
        for j, i in enumerate(rows.tolist()):
            text = tg.table[i].text
            shown = {"digit": int(d[j]), "color": int(k[j])}
            true = {"digit": int(fd[j]), "color": int(fk[j])}
            hit, over, touched = False, True, set()
            for c, ((kind, v), (_, ov)) in zip(tg.concepts, tg.forgotten_attrs):
                if contains(text, c.terms):
                    touched.add(kind)
                    hit |= shown[kind] == v
                    hits[c.name][0] += shown[kind] == v
                    hits[c.name][1] += 1
                    over &= shown[kind] == ov
            failed += hit
            overridden += over
            for kind in ("digit", "color"):
                if kind not in touched:
                    other_n += 1
                    other_ok += shown[kind] == true[kind]
        n = len(rows)
        per_target = {name: 1.0 - shown / max(total, 1) for name, (shown, total) in hits.items()}
        out = {f"ua{suffix}": 1.0 - failed / n, f"override_rate{suffix}": overridden / n,
               f"ua{suffix}_per_target": per_target, f"ua{suffix}_worst": min(per_target.values())}
        if other_n:
            out[f"other_attribute_accuracy{suffix}"] = other_ok / other_n
        return out

    @torch.no_grad()
    def __call__(self, generator_fn) -> dict:
        d, k, feats = self._outputs(generator_fn)
        if not self.dist.lead:
            return {}
        feats = feats.numpy()
        nf, nh = len(self.forget_rows), len(self.heldout_rows)
        m = {**self._forget_figures(self.forget_rows, d[:nf], k[:nf], ""),
             **self._forget_figures(self.heldout_rows, d[nf:nf + nh], k[nf:nf + nh], "_heldout")}
        rd, rk = self.targets.attrs(self.remain_rows)
        ok = (d[nf + nh:] == rd) & (k[nf + nh:] == rk)
        m["prompt_accuracy_remaining"] = float(ok.float().mean())
        m["remaining_accuracy"] = m["prompt_accuracy_remaining"]
        if bool(self.leak_mask.any()):
            m["leakage_accuracy"] = float(ok[self.leak_mask].float().mean())
        m["fd_remaining"] = frechet_distance(feats[nf + nh:], self.real.of(self.remain_pairs))
        m["fd_forget_vs_override"] = frechet_distance(feats[:nf], self.real.of(self.override_pairs))
        m.update(self.teacher)
        m["fd_ratio"] = m["fd_remaining"] / max(m["fd_remaining_teacher"], 1e-12)
        m["override_fd_ratio"] = m["fd_forget_vs_override"] / max(m["fd_override_teacher"], 1e-12)
        m.update({"n_forget_samples": nf, "n_heldout_forget_samples": nh, "n_remaining_samples": len(self.remain_rows),
                  "n_leakage_samples": int(self.leak_mask.sum())})
        return m

    def grid_ids(self) -> torch.Tensor:
        """One row per digit, one column per colour, from the first training template ('a red seven')."""
        return torch.tensor(self.targets.train_ids[: 10 * len(cd.COLOR_NAMES)])

    @torch.no_grad()
    def grid_images(self, generator_fn, per_class: int = 5):
        ids = self.grid_ids()
        g = torch.Generator().manual_seed(self.seed)
        z = torch.randn((len(ids), *self.preset.img_shape), generator=g)
        return generator_fn(z.to(self.device), ids.to(self.device)).float().cpu(), per_class

    @torch.no_grad()
    def teacher_grid(self, teacher):
        ids = self.grid_ids()
        return heun_samples(teacher, ids, self.seed), 5
