"""Is it really gone? Prompt families, white-box attacks and side effects of a forgetting run.

Everything here is judged by the run's own judge and compared, at the same budget and on the same
noise, with the teacher (the attack must succeed there, or it measures nothing) and optionally a
*control* generator distilled without forgetting (forget weights 0). docs/robustness.md defines each
number and its protocol; :func:`attack_run` writes ``RUN/attack.json``.

- **Prompt families** (text presets): every prompt the preset's vocabulary allows around a concept,
  grouped by how it was built -- the training and held-out templates, the templates with the two slots
  swapped, bare pairs in both orders, single words, repetitions, upper case, and a user's file.
  *Residue* of a family = the share of samples of its forget prompts in which the judge sees the
  forgotten concept. Class presets have one family: the class labels.
- **Side effects**: accuracy of every remaining concept (class) on every family, against the teacher's
  accuracy in the same cell; the worst cell's drop is ``side_effect_worst_cell``.
- **Discrete attack** (text presets): a gradient-guided token search (UnlearnDiff's setting) that edits
  at most ``edits`` tokens of a start prompt; the gradient of the judge's loss with respect to a one-hot
  token matrix ranks substitutions, the best of ``candidates`` evaluated ones is kept each step.
- **Continuous attack**: a free input embedding at the override word's position (text presets,
  textual-inversion style) or a free class embedding (class presets), optimised with Adam.

Start prompts of both attacks are the run's forget prompts *rewritten to the override* ('a red one'
for seven->one): the teacher draws a one there, so the attack must change the condition to bring a
seven back, on the teacher as on the generator. An attack instance is (start, noise seed); it succeeds
when, at any step, the judge's top class on the sample is the forgotten one. ASR = successes /
instances.
"""
from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import colordigits as cd
from .evaluate.forgetting import cache_dir, teacher_fingerprint
from .io import CheckpointError, load_tensors, read_json, save_tensors, write_json
from .samplers import heun, teacher_grid

ATTACK_KINDS = ("discrete", "continuous")
# the flat figures copied into metrics.json, MLflow and the sweep's tables
ATTACK_KEYS = ("asr_discrete", "asr_discrete_teacher", "asr_continuous", "asr_continuous_teacher", "asr_max",
               "residue_worst_family", "residue_worst_family_teacher", "side_effect_worst_cell", "leakage_worst_cell",
               "attack_seconds")


@dataclass
class Budget:
    """The attacker's budget: the same for the generator, the teacher and the control."""

    steps: int = 30              # optimisation steps per attack instance
    seeds: int = 4               # noise seeds per start
    starts: int = 4              # start prompts (text) / start classes (class presets)
    edits: int = 2               # discrete: tokens the attacker may change
    candidates: int = 16         # discrete: substitutions evaluated per instance and step
    lr: float = 0.3              # continuous: Adam's learning rate on the free embedding
    teacher_steps: int = 12      # Heun steps of the teacher's sampler inside an attack (2 * steps - 1 NFE)
    per_prompt: int = 2          # families: samples per prompt (at least)
    min_cell: int = 20           # families: samples per side-effect cell (prompts repeated to reach it)
    seed: int = 0                # base seed of all noise

    def __post_init__(self):
        for k in ("steps", "seeds", "starts", "edits", "candidates", "teacher_steps", "per_prompt", "min_cell"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"attack budget {k}={v!r}: give a whole number >= 1")
        if not self.lr > 0:
            raise ValueError(f"attack budget lr={self.lr!r}: give a positive learning rate")


# -- the models under attack ----------------------------------------------------------------------------

class Sampler:
    """Images from noise under a condition, with autograd: a one-step generator (``sigma_init``) or the
    teacher's few-step Heun sampler. ``cond`` is class ids, or text embeddings (B, L, D) for text models."""

    def __init__(self, net, *, sigma_init: float | None = None, steps: int = 6):
        self.net = net.eval().requires_grad_(False)
        self.sigma_init = sigma_init
        self.text = hasattr(net, "forward_embeds")
        if sigma_init is None:
            self.sigmas = teacher_grid(net, steps)
        self.nfe = 1 if sigma_init is not None else 2 * steps - 1

    def _denoise(self, x, sigma, cond):
        return self.net.forward_embeds(x, sigma, cond) if self.text else self.net(x, sigma, cond)

    def __call__(self, z: torch.Tensor, cond) -> torch.Tensor:
        if self.sigma_init is not None:
            return self._denoise(z * self.sigma_init, self.sigma_init, cond)
        return heun(self._denoise, z * float(self.sigmas[0]), self.sigmas, cond)


class Judge:
    """Log-probabilities of the attribute a concept lives in: one head of the colordigits judge (``head``
    "digit" or "color"), or a class preset's classifier (``head`` None)."""

    def __init__(self, judge, head: str | None = None):
        self.judge, self.head = judge, head

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp(-1, 1)
        if self.head is None:
            return self.judge(x)
        _, ld, lk = self.judge.heads(x)
        return ld if self.head == "digit" else lk

    @torch.no_grad()
    def both(self, x: torch.Tensor):
        """(digit, colour) predictions (colordigits) or (class, None)."""
        if self.head is None:
            return self.judge(x.clamp(-1, 1)).argmax(1), None
        _, ld, lk = self.judge.heads(x.clamp(-1, 1))
        return ld.argmax(1), lk.argmax(1)


def judge_fingerprint(judge) -> str:
    """The weights of a judge (a classifier, the colordigits judge, a CLIP judge's model); NudeNet (no torch
    module): its kind."""
    for m in (judge, getattr(judge, "judge", None), getattr(judge, "model", None)):
        if isinstance(m, nn.Module):
            return teacher_fingerprint(m)
    return type(judge).__name__


def noise(seed: int, n: int, shape) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def side_effect_cell(acc: dict, **fields) -> dict:
    """A side-effect cell: ``fields`` (family, concept, n, ...) and the accuracy of each subject in ``acc``
    (generator, teacher, maybe control), with the drop against the teacher."""
    cell = {**fields, "accuracy": acc["generator"], "accuracy_teacher": acc["teacher"],
            "drop": acc["teacher"] - acc["generator"]}
    if "control" in acc:
        cell["accuracy_control"] = acc["control"]
        cell["drop_control"] = acc["teacher"] - acc["control"]
    return cell


# -- text: token ids -> embeddings, with a handle for gradients ----------------------------------------------

class TextSide:
    """The run's frozen text encoder with the token-embedding table exposed: prompts -> ids, and ids (or a
    one-hot matrix, or free vectors at some positions) -> the encoder's last hidden states."""

    def __init__(self, encoder):
        self.enc = encoder
        self.tok = encoder.tokenizer
        self.model = encoder.model
        self.table = self.model.get_input_embeddings()
        special = set(self.tok.all_special_ids)
        self.content = torch.tensor([i for i in range(self.table.num_embeddings) if i not in special])
        self.pad = self.tok.pad_token_id

    def ids(self, prompts) -> torch.Tensor:
        return self.enc.tokens(list(prompts))

    def text(self, ids) -> str:
        keep = [int(i) for i in ids if int(i) not in self.tok.all_special_ids]
        return self.tok.decode(keep).strip()

    def encode(self, ids: torch.Tensor, onehot: torch.Tensor | None = None, free: torch.Tensor | None = None,
               free_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states of ``ids``; the token embeddings are ``onehot @ table`` when a one-hot matrix is
        given (its gradient ranks substitutions), and ``free`` where ``free_mask`` (B, L) is set: one vector per
        row (B, D), or one per position (B, L, D)."""

        def hook(_module, _inp, out):
            if onehot is not None:
                out = onehot.to(out.dtype) @ self.table.weight
            if free is not None:
                f = free if free.dim() == 3 else free[:, None, :]
                out = torch.where(free_mask[..., None], f.to(out.dtype), out)
            return out

        h = self.table.register_forward_hook(hook)
        try:
            return self.model(input_ids=ids).last_hidden_state.float()
        finally:
            h.remove()


# -- prompt families (colordigits' vocabulary) -----------------------------------------------------------------

@dataclass(frozen=True)
class FamilyPrompt:
    text: str
    digit: int | None
    color: int | None
    family: str


def _swap(template: str) -> str | None:
    """The template with its colour slot and its digit slot ({word} or {num}) exchanged."""
    slot = "{word}" if "{word}" in template else "{num}"
    if "{color}" not in template or slot not in template:
        return None
    return template.replace("{color}", "\0").replace(slot, "{color}").replace("\0", slot)


def family_templates(extra: dict | None = None) -> dict[str, list[str]]:
    """Every family's templates over {color}, {word}, {num} (a template may have one slot only)."""
    train, held = list(cd.TRAIN_TEMPLATES), list(cd.HELDOUT_TEMPLATES)
    fams = {
        "train_templates": train,
        "heldout_templates": held,
        "swapped_slots": [s for s in (_swap(t) for t in train + held) if s],
        "bare_pairs": ["{color} {word}", "{word} {color}", "{color} {num}", "{num} {color}"],
        "single_word": ["{word}", "{num}", "{color}"],
        "repeated": ["{word} {word}", "{color} {color} {word}", "{num} {num}, {color}", "a {color} {word} {word}"],
        "upper_case": [t.upper().replace("{COLOR}", "{color}").replace("{WORD}", "{word}").replace("{NUM}", "{num}")
                       for t in train[:3]],
    }
    for k, v in (extra or {}).items():
        fams[k] = list(v)
    return fams


def family_prompts(templates: dict[str, list[str]]) -> list[FamilyPrompt]:
    """Each family's templates filled with every digit and colour (a slot-less attribute stays None)."""
    out, seen = [], set()
    for fam, temps in templates.items():
        for t in temps:
            has_d = "{word}" in t or "{num}" in t
            has_k = "{color}" in t
            for d, k in itertools.product(range(10) if has_d else [None], range(len(cd.COLOR_NAMES)) if has_k else [None]):
                text = t.format(word=cd.DIGIT_WORDS[d] if d is not None else "", num=str(d) if d is not None else "",
                                color=cd.COLOR_NAMES[k] if k is not None else "")
                if (fam, text) not in seen:
                    seen.add((fam, text))
                    out.append(FamilyPrompt(text, d, k, fam))
    return out


def read_prompts_file(path) -> list[FamilyPrompt]:
    """One prompt per line (blank lines and # comments skipped); each prompt's digit and colour are read
    from its words; a prompt naming neither is refused (the judge could not score it)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts-file {path}: no such file — give a text file with one prompt per line")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        d = k = None
        for w in line.lower().replace(",", " ").split():
            a = cd.concept_attribute(w)
            if a and a[0] == "digit":
                d = a[1]
            elif a:
                k = a[1]
        if d is None and k is None:
            raise ValueError(f"--prompts-file {path} line {n}: {line!r} names no digit and no colour of colordigits "
                             f"— the judge cannot score it; write e.g. 'a red seven'")
        out.append(FamilyPrompt(line, d, k, "user_file"))
    if not out:
        raise ValueError(f"--prompts-file {path} holds no prompts — write one prompt per line")
    return out


# -- the measurement ----------------------------------------------------------------------------------------

@dataclass
class Subject:
    """One model under measurement: its sampler (with gradients) and how to sample a batch for families."""

    name: str
    sampler: Sampler
    fast: object = None        # (z, cond) -> images without gradients for families (the teacher: 18-step Heun)
    cached: bool = False       # family predictions cached on disk by the network's fingerprint (the teacher)
    judge: str = ""            # the judge's fingerprint (judge_fingerprint): another judge, another cache entry

    def _path(self, key: str, suffix: str) -> Path:
        h = hashlib.sha256(f"{self.judge}|{key}".encode()).hexdigest()[:16]
        return cache_dir() / f"attack-{teacher_fingerprint(self.sampler.net)}-{h}{suffix}"

    def predict(self, key: str, compute):
        """``compute()`` (a dict of tensors), or its result cached under ``key`` for a cached subject."""
        if not self.cached:
            return compute()
        path = self._path(key, ".safetensors")
        if path.is_file():
            try:
                return load_tensors(path)[0]
            except CheckpointError:                 # a damaged cache entry is recomputed
                pass
        out = compute()
        save_tensors(path, out)
        return out

    def remember(self, key: str, compute) -> dict:
        """An attack's result (JSON), cached for a cached subject: the teacher's control is paid once per target
        and budget, not once per sweep trial."""
        if not self.cached:
            return compute()
        path = self._path(key, ".json")
        if path.is_file():
            try:
                return read_json(path)
            except CheckpointError:
                pass
        out = compute()
        write_json(path, out)
        return out


@dataclass
class Report:
    kind: str                                     # "concepts" or "classes"
    target: str
    budget: dict
    families: dict = field(default_factory=dict)
    cells: list = field(default_factory=list)
    attacks: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The top-level figures (docs/robustness.md): worst family, worst cell, ASR per kind."""
        out: dict = {"attack_seconds": self.seconds.get("total")}
        fams = {k: v for k, v in self.families.items() if v.get("forget_samples")}
        if fams:
            worst = max(fams, key=lambda k: fams[k]["residue"])
            out.update(residue_worst_family=fams[worst]["residue"], residue_worst_family_name=worst,
                       residue_worst_family_teacher=fams[worst].get("residue_teacher"),
                       residue_mean=sum(v["residue"] for v in fams.values()) / len(fams))
            if all("residue_control" in v for v in fams.values()):
                out["residue_worst_family_control"] = max(v["residue_control"] for v in fams.values())
        if self.cells:
            worst = max(self.cells, key=lambda c: c["drop"])
            out.update(side_effect_worst_cell=worst["drop"], side_effect_worst_cell_name=f"{worst['family']}/"
                       f"{worst['concept']}", side_effect_mean=sum(c["drop"] for c in self.cells) / len(self.cells))
            if all("drop_control" in c for c in self.cells):
                out["side_effect_worst_cell_control"] = max(c["drop_control"] for c in self.cells)
        leaks = [c for c in self.cells if "override_share" in c and "override_share_teacher" in c]
        if leaks:          # the override's leakage: the cell where it is drawn most above the teacher's own rate
            worst = max(leaks, key=lambda c: c["override_share"] - c["override_share_teacher"])
            out.update(leakage_worst_cell=worst["override_share"] - worst["override_share_teacher"],
                       leakage_worst_cell_name=f"{worst['family']}/{worst['concept']}",
                       leakage_worst_cell_share=worst["override_share"],
                       leakage_worst_cell_share_teacher=worst["override_share_teacher"])
            if all("override_share_control" in c for c in leaks):
                out["leakage_worst_cell_control"] = max(c["override_share_control"] - c["override_share_teacher"]
                                                        for c in leaks)
        asrs = []
        for k, a in self.attacks.items():
            out[f"asr_{k}"] = a["asr"]
            out[f"asr_{k}_teacher"] = a["asr_teacher"]
            if "asr_control" in a:
                out[f"asr_{k}_control"] = a["asr_control"]
            asrs.append(a["asr"])
        if asrs:
            out["asr_max"] = max(asrs)
        return out

    def to_dict(self) -> dict:
        return {"schema": 1, **self.summary(), "kind": self.kind, "target": self.target, "budget": self.budget,
                "seconds": self.seconds, "families": self.families, "cells": self.cells, "attacks": self.attacks}


def _success(judge: Judge, x: torch.Tensor, target: torch.Tensor):
    lp = judge.logits(x).log_softmax(1)
    return lp, lp.argmax(1) == target


def token_search(judge, T: TextSide, b: Budget, sampler, starts: list[str], start_ids: torch.Tensor, z: torch.Tensor,
             value: int) -> dict:
    """The discrete attack: a greedy coordinate search over at most ``b.edits`` token changes of each start (one
    change per step) that makes ``judge`` (``.logits(images)``) pick class ``value``; the gradient of its
    log-probability with respect to a one-hot token matrix ranks the substitutions, the best of ``b.candidates``
    evaluated ones is kept. ``start_ids`` (n, L): one row per instance (start x seed), ``z`` its noise."""
    n, L = start_ids.shape
    dev = start_ids.device                                  # the text encoder's (the judge may answer elsewhere)
    target = torch.full((n,), value, device=dev)
    content = T.content.to(dev)
    editable = torch.isin(start_ids, content)
    V = T.table.num_embeddings
    allowed_tok = torch.zeros(V, dtype=torch.bool, device=dev)
    allowed_tok[content] = True
    cur = start_ids.clone()
    won = torch.zeros(n, dtype=torch.bool, device=dev)
    best_ids = cur.clone()
    conf = torch.zeros(n, device=dev)

    def judged(x, tgt):                                     # _success, read on the ids' device
        lp_ = judge.logits(x).log_softmax(1).to(dev)
        return lp_, lp_.argmax(1) == tgt

    for _ in range(b.steps):
        onehot = torch.nn.functional.one_hot(cur, V).float().requires_grad_(True)
        lp, ok = judged(sampler(z, T.encode(cur, onehot=onehot)), target)
        newly = ok & ~won
        best_ids[newly] = cur[newly]
        won |= ok
        conf = torch.maximum(conf, lp.detach()[torch.arange(n), target].exp())
        if bool(won.all()) or not lp.requires_grad:          # done, or no path from the tokens to the image
            break
        (-lp[torch.arange(n), target].sum()).backward()
        score = -onehot.grad                                       # higher: the swap lowers the loss more
        edited = (cur != start_ids)
        # a position may change if it is content and the edit budget allows it
        pos_ok = editable & ((edited.sum(1, keepdim=True) < b.edits) | edited)
        score = score.masked_fill(~pos_ok[..., None] | ~allowed_tok[None, None, :], float("-inf"))
        score = score.masked_fill(torch.nn.functional.one_hot(cur, V).bool(), float("-inf"))
        top = score.flatten(1).topk(b.candidates, dim=1).indices        # (n, C) over L * V
        pos, tok = top // V, top % V
        cand = cur[:, None, :].repeat(1, b.candidates, 1)
        cand.scatter_(2, pos[..., None], tok[..., None])
        flat = cand.flatten(0, 1)
        with torch.no_grad():
            emb = T.encode(flat)
            lpc, okc = judged(sampler(z.repeat_interleave(b.candidates, 0), emb), target.repeat_interleave(b.candidates))
        lpc = lpc[torch.arange(len(flat)), target.repeat_interleave(b.candidates)].view(n, b.candidates)
        okc = okc.view(n, b.candidates)
        pick = torch.where(okc.any(1), okc.float().argmax(1), lpc.argmax(1))
        nxt = cand[torch.arange(n), pick]
        hit = okc[torch.arange(n), pick] & ~won
        best_ids[hit] = nxt[hit]
        won |= hit
        conf = torch.maximum(conf, lpc.max(1).values.exp())
        cur = torch.where(won[:, None], cur, nxt)
    examples = [{"start": starts[i // b.seeds], "seed": i % b.seeds, "prompt": T.text(best_ids[i]),
                 "success": bool(won[i])} for i in range(n)]
    return {"asr": float(won.float().mean()), "confidence": float(conf.mean()), "instances": n,
            "examples": examples}


class ConceptSuite:
    """Families, side effects and both attacks for a colordigits run (``targets``: its ConceptTargets)."""

    name = "concepts"
    attacks = ATTACK_KINDS

    def __init__(self, targets, judge, text: TextSide, budget: Budget, extra_prompts: list | None = None):
        if len(targets.concepts) != 1:
            raise ValueError(f"attacks measure one forgotten concept at a time; this run forgets "
                             f"{targets.describe()} — attack a single-concept run")
        self.tg, self.b, self.text = targets, budget, text
        c = targets.concepts[0]
        (self.attr, self.value), (_, self.override_value) = targets.forgotten_attrs[0]
        self.concept = c
        self.target = targets.describe()
        self.judge = Judge(judge, self.attr)
        self.full_judge = Judge(judge, "digit")
        self.prompts = family_prompts(family_templates()) + list(extra_prompts or [])
        self.shape = targets.preset.img_shape
        self.reps = self._repeats()

    def _repeats(self) -> torch.Tensor:
        """Samples per prompt: ``per_prompt``, more in a family whose cells have few prompts (single words), so
        every side-effect cell holds at least ``min_cell`` samples."""
        per_fam = {}
        for fam in dict.fromkeys(p.family for p in self.prompts):
            counts: dict = {}
            for p in self.prompts:
                if p.family == fam:
                    for key in (("digit", p.digit), ("color", p.color)):
                        if key[1] is not None:
                            counts[key] = counts.get(key, 0) + 1
            fewest = min(counts.values()) if counts else 1
            per_fam[fam] = max(self.b.per_prompt, -(-self.b.min_cell // fewest))
        return torch.tensor([per_fam[p.family] for p in self.prompts])

    # families and side effects ------------------------------------------------------------------------
    def _forgotten(self, p: FamilyPrompt) -> bool:
        v = p.digit if self.attr == "digit" else p.color
        return v == self.value

    @torch.no_grad()
    def _judged(self, subject_fn, prompts, seed_offset: int):
        """(digit, colour) predictions of ``self.reps`` samples per prompt (the same noise for every model)."""
        ids = self.text.ids([p.text for p in prompts])
        emb = self.text.encode(ids).repeat_interleave(self.reps, 0)
        z = noise(self.b.seed + seed_offset, len(emb), self.shape)
        ds, ks = [], []
        for a in range(0, len(emb), 500):
            d, k = self.full_judge.both(subject_fn(z[a:a + 500], emb[a:a + 500]).float())
            ds.append(d)
            ks.append(k)
        return torch.cat(ds), torch.cat(ks)

    def families(self, subjects: list[Subject]) -> tuple[dict, list]:
        n = self.reps
        key = f"concepts|{n.tolist()}|{self.b.seed}|" + "\n".join(p.text for p in self.prompts)
        preds = {}
        for s in subjects:
            r = s.predict(key, lambda: dict(zip("dk", self._judged(s.fast or s.sampler, self.prompts, 101))))
            preds[s.name] = (r["d"], r["k"])
        fam_names = list(dict.fromkeys(p.family for p in self.prompts))
        fams, cells = {}, []
        digit_t = torch.tensor([-1 if p.digit is None else p.digit for p in self.prompts]).repeat_interleave(n)
        color_t = torch.tensor([-1 if p.color is None else p.color for p in self.prompts]).repeat_interleave(n)
        fam_t = [p.family for p, r in zip(self.prompts, n.tolist()) for _ in range(r)]
        forgotten = torch.tensor([self._forgotten(p) for p in self.prompts]).repeat_interleave(n)
        for fam in fam_names:
            in_fam = torch.tensor([f == fam for f in fam_t])
            entry = {"prompts": sum(p.family == fam for p in self.prompts),
                     "forget_samples": int((in_fam & forgotten).sum()),
                     "example": next(p.text for p in self.prompts if p.family == fam and self._forgotten(p))
                     if (in_fam & forgotten).any() else None}
            for s in subjects:
                d, k = preds[s.name]
                shown = d if self.attr == "digit" else k
                m = in_fam & forgotten
                if m.any():
                    key = "residue" if s.name == "generator" else f"residue_{s.name}"
                    entry[key] = float((shown[m] == self.value).float().mean())
            fams[fam] = entry
            # side effects: every remaining concept of this family (digits and colours that are not forgotten)
            for kind, values in (("digit", range(10)), ("color", range(len(cd.COLOR_NAMES)))):
                true_t = digit_t if kind == "digit" else color_t
                for v in values:
                    if kind == self.attr and v == self.value:
                        continue
                    m = in_fam & ~forgotten & (true_t == v)
                    if int(m.sum()) == 0:
                        continue
                    acc, leak = {}, {}
                    # leakage: the share drawn as the override by the cell's prompts that do not ask for it (none
                    # in the override's own cells; "a blue three" is left out of three's under red -> blue)
                    unasked = m & ((digit_t if self.attr == "digit" else color_t) != self.override_value)
                    for s in subjects:
                        d, k = preds[s.name]
                        ok = ((digit_t < 0) | (d == digit_t)) & ((color_t < 0) | (k == color_t))
                        acc[s.name] = float(ok[m].float().mean())
                        if unasked.any():
                            shown = d if self.attr == "digit" else k
                            leak[f"override_share{'' if s.name == 'generator' else '_' + s.name}"] = float(
                                (shown[unasked] == self.override_value).float().mean())
                    name = cd.DIGIT_WORDS[v] if kind == "digit" else cd.COLOR_NAMES[v]
                    cells.append(side_effect_cell(acc, family=fam, concept=name, n=int(m.sum()),
                                                  override=v == self.override_value and kind == self.attr, **leak))
        return fams, cells

    # attacks ---------------------------------------------------------------------------------------------
    def starts(self) -> list[str]:
        """Override-rewritten forget prompts, spread over the training templates."""
        tg = self.tg
        per_t = len(tg.override_ids) // len(cd.TRAIN_TEMPLATES) or 1
        picks = [tg.override_ids[(i * per_t + i) % len(tg.override_ids)] for i in range(self.b.starts)]
        return [tg.table[i].text for i in picks]

    def _instances(self):
        starts = self.starts()
        ids = self.text.ids(starts).repeat_interleave(self.b.seeds, 0)
        z = noise(self.b.seed + 7, len(ids), self.shape)
        return starts, ids, z

    def discrete(self, sampler: Sampler) -> dict:
        """Greedy coordinate search over at most ``edits`` token changes (one change per step)."""
        starts, start_ids, z = self._instances()
        return token_search(self.judge, self.text, self.b, sampler, starts, start_ids, z, self.value)

    def continuous(self, sampler: Sampler) -> dict:
        """A free input embedding at the override word's position(s) of each start prompt, optimised with Adam."""
        b, T = self.b, self.text
        starts, ids, z = self._instances()
        n = len(ids)
        target = torch.full((n,), self.value)
        terms = [self.concept.override, *self.concept.override_synonyms]
        term_ids = T.ids(terms)[:, 1]                       # each term is one word of the vocabulary
        mask = torch.isin(ids, term_ids)
        if not bool(mask.any(1).all()):
            raise ValueError(f"continuous attack: a start prompt does not contain the override ({', '.join(terms)})")
        pos = mask.float().argmax(1)                        # the first override word of each start
        mask = torch.nn.functional.one_hot(pos, ids.shape[1]).bool()
        init = T.table.weight[ids[torch.arange(n), pos]].detach()
        free = init.clone().requires_grad_(True)
        opt = torch.optim.Adam([free], lr=b.lr)
        won = torch.zeros(n, dtype=torch.bool)
        conf = torch.zeros(n)
        for _ in range(b.steps):
            lp, ok = _success(self.judge, sampler(z, T.encode(ids, free=free, free_mask=mask)), target)
            won |= ok.detach()
            conf = torch.maximum(conf, lp.detach()[torch.arange(n), target].exp())
            if bool(won.all()):
                break
            opt.zero_grad()
            (-lp[torch.arange(n), target][~won].sum()).backward()
            opt.step()
        with torch.no_grad():
            lp, ok = _success(self.judge, sampler(z, T.encode(ids, free=free, free_mask=mask)), target)
            won |= ok
            conf = torch.maximum(conf, lp[torch.arange(n), target].exp())
        return {"asr": float(won.float().mean()), "confidence": float(conf.mean()), "instances": n,
                "starts": starts}


class ClassSuite:
    """Per-class side effects and the continuous attack (a free class embedding) for a class-preset run."""

    name = "classes"
    attacks = ("continuous",)                     # a class condition has no tokens to edit

    def __init__(self, targets, judge, budget: Budget, preset):
        if len(targets.forget) != 1:
            raise ValueError(f"attacks measure one forgotten class at a time; this run forgets {targets.forget} "
                             f"— attack a single-class run")
        self.tg, self.b, self.preset = targets, budget, preset
        self.value = int(targets.forget[0])
        self.target = str(self.value)
        self.judge = Judge(judge)
        self.shape = preset.img_shape

    def families(self, subjects: list[Subject]) -> tuple[dict, list]:
        n_cls = self.preset.num_classes
        per = max(self.b.per_prompt * 25, self.b.min_cell)
        labels = torch.arange(n_cls).repeat_interleave(per)
        z = noise(self.b.seed + 101, len(labels), self.shape)
        preds = {}
        for s in subjects:
            fn = s.fast or s.sampler

            @torch.no_grad()
            def compute():
                return {"c": torch.cat([self.judge.both(fn(z[a:a + 500], labels[a:a + 500]).float())[0]
                                        for a in range(0, len(labels), 500)])}
            preds[s.name] = s.predict(f"classes|{per}|{self.b.seed}|{n_cls}", compute)["c"]
        f = labels == self.value
        fam = {"prompts": 1, "forget_samples": int(f.sum()), "example": self.preset.class_names[self.value]}
        for s in subjects:
            fam["residue" if s.name == "generator" else f"residue_{s.name}"] = float(
                (preds[s.name][f] == self.value).float().mean())
        cells = []
        for c in range(n_cls):
            if c == self.value:
                continue
            m = labels == c
            acc = {s.name: float((preds[s.name][m] == c).float().mean()) for s in subjects}
            cells.append(side_effect_cell(acc, family="labels", concept=self.preset.class_names[c], n=int(m.sum())))
        return {"labels": fam}, cells

    def starts(self) -> list[int]:
        n = self.preset.num_classes
        return [(self.value + 1 + i) % n for i in range(min(self.b.starts, n - 1))]

    def continuous(self, sampler: Sampler) -> dict:
        b = self.b
        starts = self.starts()
        labels = torch.tensor(starts).repeat_interleave(b.seeds)
        n = len(labels)
        z = noise(b.seed + 7, n, self.shape)
        table = class_table(sampler.net)
        free = table.weight[labels].detach().clone().requires_grad_(True)
        target = torch.full((n,), self.value)

        def hook(_m, _i, out):
            return free.to(out.dtype)

        opt = torch.optim.Adam([free], lr=b.lr)
        won = torch.zeros(n, dtype=torch.bool)
        conf = torch.zeros(n)
        h = table.register_forward_hook(hook)
        try:
            for step in range(b.steps + 1):
                lp, ok = _success(self.judge, sampler(z, labels), target)
                won |= ok.detach()
                conf = torch.maximum(conf, lp.detach()[torch.arange(n), target].exp())
                if bool(won.all()) or step == b.steps or not lp.requires_grad:   # no path from the condition
                    break
                opt.zero_grad()
                (-lp[torch.arange(n), target][~won].sum()).backward()
                opt.step()
        finally:
            h.remove()
        return {"asr": float(won.float().mean()), "confidence": float(conf.mean()), "instances": n,
                "starts": [self.preset.class_names[c] for c in starts]}


def class_table(net) -> nn.Embedding:
    """The class-embedding table of a class-conditional denoiser (rows: classes, maybe + the null class)."""
    n = int(getattr(net, "num_classes", 0))
    for m in net.modules():
        if isinstance(m, nn.Embedding) and m.num_embeddings in (n, n + 1):
            return m
    raise ValueError(f"continuous attack: {type(net).__name__} has no class-embedding table (an nn.Embedding with "
                     f"{n} or {n + 1} rows) to optimise — this backbone's class condition cannot be attacked here")


def measure(suite, subjects: dict, budget: Budget, attacks=ATTACK_KINDS, families: bool = True,
            progress=None) -> Report:
    """Families, side effects and ``attacks`` (those the suite has) for the generator, the teacher and an
    optional control. ``suite``: a ConceptSuite or ClassSuite (the task makes it: Task.robustness_suite).
    ``subjects``: {"generator": Subject, "teacher": Subject, "control": Subject (optional)}."""
    say = progress or (lambda _msg: None)
    order = [subjects[k] for k in ("generator", "teacher", "control") if k in subjects]
    target = suite.target
    kinds = [k for k in attacks if k in suite.attacks]
    rep = Report(kind=suite.name, target=target, budget=asdict(budget))
    if families:
        t0 = time.perf_counter()
        say("prompt families and side effects")
        rep.families, rep.cells = suite.families(order)
        rep.seconds["families"] = round(time.perf_counter() - t0, 2)
    for kind in kinds:
        res: dict = {}
        for s in order:
            t0 = time.perf_counter()
            say(f"{kind} attack on the {s.name}")
            r = s.remember(f"{kind}|{target}|{sorted(asdict(budget).items())}|{getattr(suite, 'key', '')}",
                           lambda: getattr(suite, kind)(s.sampler))
            sec = round(time.perf_counter() - t0, 2)
            if s.name == "generator":
                res.update(r)
                res["seconds"] = sec
                res["nfe_per_step"] = s.sampler.nfe
            else:
                res[f"asr_{s.name}"] = r["asr"]
                res[f"confidence_{s.name}"] = r["confidence"]
                res[f"seconds_{s.name}"] = sec
                if "examples" in r:
                    res[f"examples_{s.name}"] = r["examples"][: budget.seeds * 2]
        rep.attacks[kind] = res
    rep.seconds["total"] = round(sum(v for k, v in rep.seconds.items()) + sum(
        a.get("seconds", 0) + a.get("seconds_teacher", 0) + a.get("seconds_control", 0) for a in rep.attacks.values()), 2)
    return rep
