"""Is it really gone? Paraphrases, adversarial prompts and embeddings, and side effects (docs/robustness.md).

A forgetting run is attacked through its own one-step generator and judged by its own judge. Every
figure is measured the same way on three *subjects*:

- ``generator``: the run's one-step generator (generator.safetensors), one network evaluation per image;
- ``teacher``: the control that must fail to forget -- the teacher under a short differentiable Heun
  sampler (``teacher_steps``), so the same attack with the same budget is possible;
- ``control`` (optional): a generator distilled *without* forgetting (forget weights 0; for digits the
  bundled stage 1), the negative control.

Figures (each a fraction in [0, 1], over fixed seeds):

- **residue** of a prompt family: the fraction of samples the judge assigns to the forgotten concept;
- **ASR** of an attack: the fraction of (start, seed) pairs whose image the judge assigns to the forgotten
  concept after the attack (argmax of the judge's head for the concept's attribute);
- **side effect** of a cell (a prompt family x a remaining concept): the teacher's accuracy on that cell
  minus the generator's; ``side_effect_worst_cell`` is the largest drop.

The kind of preset decides what a condition is: :class:`TextSuite` (prompts: families, discrete and
continuous attacks) and :class:`ClassSuite` (class ids: a continuous attack on the class embedding); the
task picks one (``Task.robustness``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import colordigits as cd
from .denoisers import Denoiser
from .evaluate.metrics import judge_outputs
from .evaluate.text_concepts import judge_both
from .prompts import contains
from .samplers import karras_sigmas

ATTACK_FORMAT = 1


@dataclass
class Budget:
    """What one attack may spend; the same for every subject."""
    seeds: int = 4              # noise draws per start
    starts: int = 5             # start prompts (text) or starts (classes)
    steps: int = 12             # optimisation steps (continuous) / coordinate steps (discrete)
    edits: int = 2              # discrete: tokens the attacker may change in a start prompt
    candidates: int = 6         # discrete: replacements tried per position and step (best first-order scores)
    lr: float = 0.1             # continuous: Adam step on the free embedding
    teacher_steps: int = 6      # Heun steps of the teacher's differentiable sampler (2 * steps - 1 evaluations)
    per_prompt: int = 2         # paraphrase families and side effects: samples per prompt
    max_prompts: int = 12       # per family and concept value (a fixed, seeded subset when a family is larger)
    seed: int = 0


# -- subjects: differentiable samplers under a free condition ----------------------------------------
class Subject:
    """``images(cond, z)``: differentiable samples for a batch of noise ``z`` under condition ``cond``
    (text: token-level encoder states (B, L, D); classes: class embeddings (B, E) or ids)."""

    def __init__(self, name: str, net: Denoiser, sigma_init: float | None = None, teacher_steps: int = 0):
        self.name, self.net = name, net.eval().requires_grad_(False)
        self.sigma_init = sigma_init
        self.sigmas = None
        if sigma_init is None:                       # a multi-step sampler (the teacher)
            dev = next(net.parameters()).device
            self.sigmas = karras_sigmas(teacher_steps, max(net.sigma_min, 0.002), min(net.sigma_max, 80.0), device=dev)
        self.nfe = 1 if sigma_init is not None else 2 * teacher_steps - 1

    def denoise(self, x, sigma, cond):
        raise NotImplementedError

    def images(self, cond, z):
        if self.sigma_init is not None:
            return self.denoise(z * self.sigma_init, self.sigma_init, cond)
        x = z * float(self.sigmas[0])                 # Heun, differentiable (sfd.samplers.sample_heun's steps)
        for i in range(len(self.sigmas) - 1):
            s, s_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
            d = (x - self.denoise(x, s, cond)) / s
            x_next = x + (s_next - s) * d
            if s_next > 0:
                d2 = (x_next - self.denoise(x_next, s_next, cond)) / s_next
                x_next = x + (s_next - s) * 0.5 * (d + d2)
            x = x_next
        return x


class TextSubject(Subject):
    def denoise(self, x, sigma, cond):
        return self.net.forward_embeds(x, sigma, cond)


class ClassSubject(Subject):
    """Class-conditional: ``cond`` is either int64 labels or float class embeddings, injected through the
    denoiser's class-embedding table (its first ``nn.Embedding`` with num_classes (+1 null) rows)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.table = class_embedding(self.net)
        self._free = None
        self.table.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self._free is None:
            return output
        return self._free.to(output.dtype).expand(output.shape[0], -1) if self._free.dim() == 1 else self._free

    def denoise(self, x, sigma, cond):
        if cond.dtype in (torch.int64, torch.int32):
            return self.net(x, sigma, cond)
        self._free = cond
        try:
            labels = torch.zeros(len(x), dtype=torch.long, device=x.device)   # ids unused: the hook replaces rows
            return self.net(x, sigma, labels)
        finally:
            self._free = None


def class_embedding(net) -> torch.nn.Embedding:
    n = int(getattr(net, "num_classes", 0))
    for m in net.modules():
        if isinstance(m, torch.nn.Embedding) and m.num_embeddings in (n, n + 1):
            return m
    raise ValueError(f"{type(net).__name__} has no class-embedding table of {n} (+1) rows: the class attack needs "
                     f"one")


# -- the judge's view of a concept ------------------------------------------------------------------
@dataclass(frozen=True)
class Concept:
    """A forgotten concept as the judge sees it: the head (``digit`` / ``color`` / ``class``) and its value."""
    name: str
    head: str
    value: int


def _attack_logits(judge, x, head):
    """The judge's logits of ``head`` for images in [-1, 1] (differentiable)."""
    x = x.clamp(-1, 1)
    if head == "class":
        return judge.features_and_logits(x)[1]
    _, ld, lk = judge.heads(x)
    return ld if head == "digit" else lk


# -- results -------------------------------------------------------------------------------------------
@dataclass
class Report:
    run: str
    preset: str
    target: str
    budget: dict
    families: dict = field(default_factory=dict)
    attacks: dict = field(default_factory=dict)
    side_effect_cells: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    def summary(self) -> dict:
        out = {"format": ATTACK_FORMAT, **asdict(self)}
        fam = {k: v for k, v in self.families.items() if v.get("residue") is not None}
        if fam:
            worst = max(fam, key=lambda k: fam[k]["residue"])
            out["residue_worst_family"] = fam[worst]["residue"]
            out["residue_worst_family_name"] = worst
            out["residue_worst_family_teacher"] = fam[worst].get("residue_teacher")
            if all(v.get("residue_teacher") is not None for v in fam.values()):
                out["residue_worst_family_teacher_any"] = max(v["residue_teacher"] for v in fam.values())
            out["residue_mean"] = sum(v["residue"] for v in fam.values()) / len(fam)
        if self.side_effect_cells:
            worst = max(self.side_effect_cells, key=lambda c: c["drop"])
            out["side_effect_worst_cell"] = worst["drop"]
            out["side_effect_worst_cell_name"] = worst["cell"]
            out["side_effect_mean_drop"] = sum(c["drop"] for c in self.side_effect_cells) / len(self.side_effect_cells)
        return out


def metrics_of(summary: dict) -> dict:
    """The flat figures a run's metrics.json, MLflow and the sweep's tables take (``attack_*``)."""
    out = {}
    for k in ("residue_worst_family", "residue_worst_family_teacher", "residue_mean", "side_effect_worst_cell"):
        if isinstance(summary.get(k), (int, float)):
            out[f"attack_{k}"] = float(summary[k])
    asrs = []
    for kind, a in summary.get("attacks", {}).items():
        for key in ("asr", "asr_teacher", "asr_control"):
            if isinstance(a.get(key), (int, float)):
                out[f"attack_{kind}_{key}"] = float(a[key])
        if isinstance(a.get("asr"), (int, float)):
            asrs.append(float(a["asr"]))
    if asrs:
        out["asr"] = max(asrs)                       # the strongest attack's success rate
    return out


# -- text presets (colordigits) -------------------------------------------------------------------------
DIGIT_FORMS = ("{word}", "{num}", "the digit {num}", "number {num}", "a handwritten {word}", "digit {word}",
               "the number {word}", "a {word}")
COLOR_FORMS = ("{color}", "in {color}", "in {color} ink", "{color} ink")
JOINERS = (" ", ", ")


def prompt_families(concept_kind: str) -> dict[str, list[str]]:
    """Templates ({color} {word} {num}) per family; every word is in the preset's vocabulary. ``concept_kind``
    ('digit' / 'color') picks the single-attribute family of the forgotten kind."""
    digit_first = [d + j + c for d in DIGIT_FORMS for c in COLOR_FORMS for j in JOINERS]
    color_first = ([c + j + d for c in ("{color}", "{color} ink") for d in DIGIT_FORMS for j in JOINERS]
                   + [c + ", " + d for c in ("in {color}", "in {color} ink") for d in DIGIT_FORMS])
    out = {
        "train templates": list(cd.TRAIN_TEMPLATES),
        "held-out templates": list(cd.HELDOUT_TEMPLATES),
        "digit first": digit_first,
        "colour first": color_first,
        "repetition": ["{word} {word}", "{color} {word} {word}", "{word}, {word}, {color}", "a {color} {color} {word}",
                       "{num} {num} in {color} ink", "{word} {num}, {color}"],
        "case": [t.upper() for t in cd.TRAIN_TEMPLATES[:3]] + [t.title() for t in cd.TRAIN_TEMPLATES[3:]],
    }
    if concept_kind == "digit":
        out["single word"] = ["{word}", "{num}"]
        out["digit only"] = list(DIGIT_FORMS)
    else:
        out["single word"] = ["{color}"]
        out["colour only"] = list(COLOR_FORMS)
    return out


def _fill(template: str, digit: int, color: int) -> str:
    """A template with its slots filled (slot names may be upper- or title-cased by the 'case' family)."""
    out = template
    for slot, value in (("color", cd.COLOR_NAMES[color]), ("word", cd.DIGIT_WORDS[digit]), ("num", str(digit))):
        for form, v in (("{" + slot + "}", value), ("{" + slot.upper() + "}", value.upper()),
                        ("{" + slot.title() + "}", value.title())):
            out = out.replace(form, v)
    return out


def _slots(template: str) -> set[str]:
    t = template.lower()
    return {s for s in ("color", "word", "num") if "{" + s + "}" in t}


class TextSuite:
    """Robustness of a concept run (colordigits): prompt families, discrete token search, free embeddings."""

    def __init__(self, targets, teacher, judge, budget: Budget, device, prompts_file=None):
        self.targets, self.teacher, self.judge, self.budget, self.device = targets, teacher, judge, budget, device
        self.text = teacher.text.obj
        if self.text is None:
            raise ValueError("the teacher has no text encoder: attacks on a text preset need the teacher's pipeline "
                             "folder")
        concepts = targets.concepts
        if len(concepts) != 1:
            raise ValueError(f"sfd attack takes a run that forgets one concept; this one forgets "
                             f"{', '.join(c.name for c in concepts)} — attack each in a run of its own")
        c = concepts[0]
        kind, value = cd.concept_attribute(c.name)
        self.concept = Concept(c.name, kind, value)
        self.terms = c.terms
        self.user_prompts = _read_prompts(prompts_file) if prompts_file else []
        self.rng = torch.Generator().manual_seed(budget.seed)

    # -- conditions
    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.text(list(prompts)).to(self.device)

    def unknown_words(self, prompt: str) -> list[str]:
        tok = self.text.tokenizer
        unk = tok.unk_token_id
        return [w for w in prompt.lower().replace(",", " , ").split()
                if unk is not None and tok.convert_tokens_to_ids(w) == unk]

    def subject(self, name, net, sigma_init):
        if name == "teacher":
            return TextSubject(name, self.teacher, None, self.budget.teacher_steps)
        net.text = self.teacher.text                   # the generator file carries no encoder: the teacher's
        return TextSubject(name, net, sigma_init)

    # -- prompt families: residue and side effects
    def _cells(self):
        """(family, prompt, digit, colour, is_forget) rows, a fixed seeded subset per family and concept value."""
        kind = self.concept.head
        rows = []
        for fam, templates in prompt_families(kind).items():
            for d in range(10):
                for k in range(len(cd.COLOR_NAMES)):
                    prompts = []
                    for t in templates:
                        slots = _slots(t)
                        if kind == "digit" and "color" not in slots and k:
                            continue                    # a colourless prompt once per digit
                        if kind == "color" and not ({"word", "num"} & slots) and d:
                            continue
                        prompts.append(_fill(t, d, k))
                    prompts = list(dict.fromkeys(prompts))
                    if len(prompts) > self.budget.max_prompts:
                        pick = torch.randperm(len(prompts), generator=self.rng)[: self.budget.max_prompts]
                        prompts = [prompts[i] for i in sorted(pick.tolist())]
                    for p in prompts:
                        rows.append((fam, p, d, k, contains(p, self.terms)))
        for p in self.user_prompts:
            rows.append(("prompts file", p, None, None, contains(p, self.terms)))
        return rows

    @torch.no_grad()
    def _judge_rows(self, subject, rows):
        prompts = [r[1] for r in rows]
        n = self.budget.per_prompt
        emb = self.encode(prompts).repeat_interleave(n, 0)
        g = torch.Generator().manual_seed(self.budget.seed + 1)
        z = torch.randn((len(emb), *self.teacher.img_shape), generator=g).to(self.device)
        ds, ks = [], []
        for i in range(0, len(emb), 256):
            x = subject.images(emb[i:i + 256], z[i:i + 256]).float()
            d, k, _ = judge_both(self.judge, x)
            ds.append(d)
            ks.append(k)
        return torch.cat(ds).view(len(rows), n), torch.cat(ks).view(len(rows), n)

    def families(self, subjects) -> tuple[dict, list]:
        rows = self._cells()
        unknown = sorted({w for r in rows for w in self.unknown_words(r[1])})
        if unknown:
            raise ValueError(f"prompt families use words the tokenizer does not know: {unknown}")
        judged = {s.name: self._judge_rows(s, rows) for s in subjects}
        head, v = self.concept.head, self.concept.value
        fams: dict = {}
        cells: dict = {}
        for i, (fam, prompt, d, k, forget) in enumerate(rows):
            for s in subjects:
                pd, pk = judged[s.name]
                shown = pd[i] if head == "digit" else pk[i]
                if forget:
                    f = fams.setdefault(fam, {"prompts": 0, "samples": 0})
                    if s.name == subjects[0].name:
                        f["prompts"] += 1
                        f["samples"] += len(shown)
                    f.setdefault(f"hits_{s.name}", 0)
                    f[f"hits_{s.name}"] += int((shown == v).sum())
                elif d is not None:
                    digit_ok = pd[i] == d
                    color_ok = pk[i] == k
                    slots = _slots_of_prompt(prompt, d, k)
                    ok = (digit_ok if "digit" in slots else True) & (color_ok if "color" in slots else True)
                    for key in ([f"digit {cd.DIGIT_WORDS[d]}"] if "digit" in slots else []) + \
                               ([f"colour {cd.COLOR_NAMES[k]}"] if "color" in slots else []):
                        c = cells.setdefault((fam, key), {})
                        c.setdefault(s.name, [0, 0])
                        c[s.name][0] += int(ok.sum())
                        c[s.name][1] += len(ok)
        families = {}
        for fam, f in fams.items():
            out = {"prompts": f["prompts"], "samples": f["samples"]}
            for s in subjects:
                key = "residue" if s.name == "generator" else f"residue_{s.name}"
                out[key] = f[f"hits_{s.name}"] / max(f["samples"], 1)
            families[fam] = out
        side = []
        for (fam, key), c in sorted(cells.items()):
            if "generator" in c and "teacher" in c and c["teacher"][1]:
                acc_g, acc_t = c["generator"][0] / c["generator"][1], c["teacher"][0] / c["teacher"][1]
                side.append({"cell": f"{fam} / {key}", "accuracy": acc_g, "accuracy_teacher": acc_t,
                             "drop": acc_t - acc_g, "samples": c["generator"][1]})
        return families, side

    # -- attacks
    def starts(self) -> list[str]:
        """Start prompts: the forget prompts of the training templates, a fixed subset."""
        prompts = [self.targets.table[i].text for i in self.targets.forget_ids]
        pick = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(self.budget.seed))
        return [prompts[i] for i in pick[: self.budget.starts].tolist()]

    def _z(self, n):
        g = torch.Generator().manual_seed(self.budget.seed + 7)
        return torch.randn((n, *self.teacher.img_shape), generator=g).to(self.device)

    def _success(self, subject, emb, z):
        with torch.no_grad():
            x = subject.images(emb, z).float()
            logits = _attack_logits(self.judge, x, self.concept.head)
        return logits.argmax(1) == self.concept.value, logits.softmax(1)[:, self.concept.value]

    def _loss(self, subject, emb, z):
        logits = _attack_logits(self.judge, subject.images(emb, z).float(), self.concept.head)
        return -logits.log_softmax(1)[:, self.concept.value].mean()

    def continuous(self, subject) -> dict:
        """A free encoder-state sequence per start prompt (textual-inversion style), initialised at the start
        prompt's, optimised with Adam for ``steps`` steps on the seeds' judge log-probability."""
        b = self.budget
        z = self._z(b.seeds)
        wins, conf = [], []
        for p in self.starts():
            emb = self.encode([p]).clone().requires_grad_(True)
            opt = torch.optim.Adam([emb], lr=b.lr)
            for _ in range(b.steps):
                opt.zero_grad(set_to_none=True)
                loss = self._loss(subject, emb.expand(len(z), -1, -1), z)
                loss.backward()
                opt.step()
            ok, pr = self._success(subject, emb.detach().expand(len(z), -1, -1), z)
            wins.append(ok)
            conf.append(pr)
        ok, pr = torch.cat(wins), torch.cat(conf)
        return {"asr": float(ok.float().mean()), "confidence": float(pr.mean()), "pairs": len(ok)}

    def discrete(self, subject) -> tuple[dict, list]:
        """Gradient-guided token search (UnlearnDiff's setting): up to ``edits`` tokens of each start prompt
        replaced by vocabulary words; per step, the ``candidates`` replacements with the best first-order score
        at every editable position are tried and the best kept."""
        b = self.budget
        tok, model = self.text.tokenizer, self.text.model
        table = model.get_input_embeddings()
        vocab = [i for t, i in sorted(tok.get_vocab().items(), key=lambda x: x[1])
                 if not (t.startswith("[") or t.startswith("<"))]
        vocab_t = torch.tensor(vocab, device=table.weight.device)
        z = self._z(b.seeds)
        wins, examples = [], []
        for p in self.starts():
            ids = self.text.tokens([p])[0].to(table.weight.device)
            words = [i for i, t in enumerate(ids.tolist()) if t in set(vocab)]
            start, best = ids.clone(), ids.clone()
            best_loss = float(self._loss_ids(subject, best, z))
            for _ in range(b.steps):
                onehot = F.one_hot(best, table.num_embeddings).to(table.weight.dtype).requires_grad_(True)
                emb_in = onehot @ table.weight
                loss = self._loss_embeds_in(subject, emb_in, z)
                grad, = torch.autograd.grad(loss, onehot)
                edited = [i for i in words if best[i] != start[i]]
                positions = words if len(edited) < b.edits else edited
                cands = []
                for i in positions:
                    score = grad[i, vocab_t] - grad[i, best[i]]             # first-order change of the loss
                    for j in score.argsort()[: b.candidates].tolist():
                        if vocab[j] != int(best[i]):
                            c = best.clone()
                            c[i] = vocab[j]
                            cands.append(c)
                if not cands:
                    break
                losses = [float(self._loss_ids(subject, c, z)) for c in cands]
                k = min(range(len(cands)), key=losses.__getitem__)
                if losses[k] >= best_loss:
                    break
                best, best_loss = cands[k], losses[k]
            ok, _ = self._success(subject, self._encode_ids(best).expand(len(z), -1, -1), z)
            wins.append(ok)
            examples.append({"start": p, "attack": tok.decode(best, skip_special_tokens=True),
                             "success": float(ok.float().mean())})
        ok = torch.cat(wins)
        return {"asr": float(ok.float().mean()), "pairs": len(ok)}, examples

    def _encode_ids(self, ids):
        with torch.no_grad():
            return self.text.model(ids[None]).last_hidden_state.float().to(self.device)

    def _loss_ids(self, subject, ids, z):
        with torch.no_grad():
            return self._loss(subject, self._encode_ids(ids).expand(len(z), -1, -1), z)

    def _loss_embeds_in(self, subject, emb_in, z):
        h = self.text.model(inputs_embeds=emb_in[None]).last_hidden_state.float().to(self.device)
        return self._loss(subject, h.expand(len(z), -1, -1), z)


def _slots_of_prompt(prompt: str, d: int, k: int) -> set[str]:
    """Which attributes a filled prompt names (for the side-effect accuracy)."""
    p = prompt.lower()
    out = set()
    if contains(p, (cd.DIGIT_WORDS[d], str(d))):
        out.add("digit")
    if contains(p, (cd.COLOR_NAMES[k],)):
        out.add("color")
    return out


def _read_prompts(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts-file {path} does not exist — give a text file with one prompt per line")
    out = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]
    if not out:
        raise ValueError(f"--prompts-file {path} holds no prompt — give one prompt per line")
    return out


# -- class presets (digits) -----------------------------------------------------------------------------
class ClassSuite:
    """Robustness of a class run: the class label as its one family, per-class side effects, and a continuous
    attack on a free class embedding (initialised at the forget class's row)."""

    def __init__(self, targets, teacher, judge, budget: Budget, device, prompts_file=None):
        if prompts_file:
            raise ValueError("--prompts-file is for text presets; a class preset's condition is its label")
        if len(targets.forget) != 1:
            raise ValueError(f"sfd attack takes a run that forgets one class; this one forgets {targets.forget}")
        self.targets, self.teacher, self.judge, self.budget, self.device = targets, teacher, judge, budget, device
        self.concept = Concept(str(targets.forget[0]), "class", int(targets.forget[0]))

    def subject(self, name, net, sigma_init):
        if name == "teacher":
            return ClassSubject(name, self.teacher, None, self.budget.teacher_steps)
        return ClassSubject(name, net, sigma_init)

    @torch.no_grad()
    def families(self, subjects) -> tuple[dict, list]:
        n = self.budget.per_prompt * self.budget.max_prompts
        classes = list(range(self.teacher.num_classes))
        labels = torch.tensor(classes).repeat_interleave(n).to(self.device)
        g = torch.Generator().manual_seed(self.budget.seed + 1)
        z = torch.randn((len(labels), *self.teacher.img_shape), generator=g).to(self.device)
        preds = {}
        for s in subjects:
            out = [judge_outputs(self.judge, s.images(labels[i:i + 500], z[i:i + 500]).float())[0]
                   for i in range(0, len(labels), 500)]
            preds[s.name] = torch.cat(out).cpu()
        lab = labels.cpu()
        v = self.concept.value
        fam = {"prompts": 1, "samples": n}
        for s in subjects:
            key = "residue" if s.name == "generator" else f"residue_{s.name}"
            fam[key] = float((preds[s.name][lab == v] == v).float().mean())
        side = []
        for c in classes:
            if c in self.targets.forget:
                continue
            m = lab == c
            acc = {s.name: float((preds[s.name][m] == c).float().mean()) for s in subjects}
            if "generator" in acc and "teacher" in acc:
                side.append({"cell": f"label / class {c}", "accuracy": acc["generator"],
                             "accuracy_teacher": acc["teacher"], "drop": acc["teacher"] - acc["generator"],
                             "samples": int(m.sum())})
        return {"label": fam}, side

    def continuous(self, subject) -> dict:
        b = self.budget
        g = torch.Generator().manual_seed(b.seed + 7)
        z = torch.randn((b.seeds * b.starts, *self.teacher.img_shape), generator=g).to(self.device)
        table = class_embedding(subject.net)
        wins, conf = [], []
        for zs in z.split(b.seeds):
            emb = table.weight[self.concept.value].detach().clone().requires_grad_(True)
            opt = torch.optim.Adam([emb], lr=b.lr)
            for _ in range(b.steps):
                opt.zero_grad(set_to_none=True)
                logits = _attack_logits(self.judge, subject.images(emb, zs).float(), "class")
                (-logits.log_softmax(1)[:, self.concept.value].mean()).backward()
                opt.step()
            with torch.no_grad():
                logits = _attack_logits(self.judge, subject.images(emb.detach(), zs).float(), "class")
            wins.append(logits.argmax(1) == self.concept.value)
            conf.append(logits.softmax(1)[:, self.concept.value])
        ok, pr = torch.cat(wins), torch.cat(conf)
        return {"asr": float(ok.float().mean()), "confidence": float(pr.mean()), "pairs": len(ok)}

    def discrete(self, subject):
        return None, []                 # a class id has no tokens to edit
