"""Text concepts over a preset's own vocabulary (colordigits): targets, prompt table, judge, export.

A target forgets a *concept* (a digit word or a colour, with its synonyms) from every prompt of the
preset's templates; the teacher is asked about the same prompt with the concept rewritten to the
override (sfd.prompts). Conditions stay integers: :class:`ConceptTargets` builds the run's finite
prompt table (index 0 is the empty prompt, classifier-free guidance's null condition) and samples ids
into it; the text-conditioned teacher caches one embedding per id (sfd.denoisers.text_unet).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import colordigits as cd
from ..evaluate.text_concepts import ConceptEvaluator, judge_both
from ..pretrain_text import train_colordigits_judge, train_text_teacher
from ..prompts import NEXT, Concept, contains, forgets, rewrite
from ..robustness import ConceptSuite, TextSide
from .base import PromptTask


def canonical(term: str, extra_synonyms: dict | None = None) -> str:
    """A concept name for ``term``: itself, or the concept it is a synonym of ('7' -> 'seven')."""
    t = str(term).strip().lower()
    names, syn = cd.concept_names(), dict(cd.BUILTIN_SYNONYMS)
    syn = {**syn, **{k.lower(): tuple(v) for k, v in (extra_synonyms or {}).items()}}
    if t in names or t in syn:
        return t
    for k, vs in syn.items():
        if t in (v.lower() for v in vs):
            return k
    return t


def _templates(cfg):
    train = tuple(cfg.prompt_templates) if cfg.prompt_templates else cd.TRAIN_TEMPLATES
    return train, cd.HELDOUT_TEMPLATES


def _fmt(names) -> str:
    return ", ".join(names)


def resolve_concepts(cfg, preset) -> list[Concept]:
    """The concepts of ``cfg`` (forget_concepts, override, concept_synonyms), validated against the
    preset's prompts; raises ValueError naming the bad value and the fix."""
    names, builtin, attribute = cd.concept_names(), dict(cd.BUILTIN_SYNONYMS), cd.concept_attribute
    user_syn = {str(k).strip().lower(): tuple(str(v).strip().lower() for v in vs)
                for k, vs in (cfg.concept_synonyms or {}).items()}
    synonyms = {**{k: tuple(v) for k, v in builtin.items()}, **{k: builtin.get(k, ()) + v for k, v in user_syn.items()}}
    forget = [canonical(c, user_syn) for c in cfg.forget_concepts]
    if not forget or not all(forget):
        raise ValueError("forget: no concept given — give a word or phrase to forget, e.g. --forget seven "
                         f"(concepts of '{preset.name}': {_fmt(names)})")
    if len(set(forget)) != len(forget):
        raise ValueError(f"forget {cfg.forget_concepts}: a concept is listed twice — list each concept once")
    train_t, _ = _templates(cfg)
    train_prompts = [c.text for c in cd.captions(train_t)]
    for f in forget:
        terms = (f, *synonyms.get(f, ()))
        if not any(contains(p, terms) for p in train_prompts):
            raise ValueError(f"forget concept {f!r} is in none of preset '{preset.name}''s prompts — give one of: "
                             f"{_fmt(names)} (or add prompt templates containing it in a --targets-file)")
        if attribute(f) is None:
            raise ValueError(f"forget concept {f!r} is neither a digit nor a colour, so the judge cannot tell "
                             f"whether it was forgotten — give one of: {_fmt(names)}")
    items = [s.strip() for s in str(cfg.override).split(",")]
    if len(items) not in (1, len(forget)) or not all(items):
        raise ValueError(f"override {cfg.override!r}: give one override concept, or one per forget concept "
                         f"({len(forget)}, comma-separated), or '{NEXT}'")
    if len(items) == 1:
        items = items * len(forget)
    overrides = []
    for f, o in zip(forget, items):
        kind = attribute(f)[0]
        if o.lower() == NEXT:
            pool = [n for n in names if attribute(n)[0] == kind]
            i = pool.index(f)
            o = next((pool[(i + j) % len(pool)] for j in range(1, len(pool)) if pool[(i + j) % len(pool)] not in forget),
                     None)
            if o is None:
                raise ValueError(f"override '{NEXT}' for {f!r}: every {kind} concept is forgotten — forget fewer")
        o = canonical(o, user_syn)
        if o == f:
            raise ValueError(f"override {o!r} is the concept being forgotten — give another concept to replace {f!r} "
                             f"with (e.g. --forget seven --override one)")
        if o in forget:
            raise ValueError(f"override {o!r} (for {f!r}) is itself forgotten ({', '.join(forget)}) — choose a "
                             f"concept that remains")
        oa = attribute(o)
        if oa is None:
            raise ValueError(f"override {o!r} is not a concept of preset '{preset.name}' — give one of: {_fmt(names)}")
        if oa[0] != kind:
            raise ValueError(f"override {o!r} is a {oa[0]} but {f!r} is a {kind} — replace a {kind} with a {kind} "
                             f"(e.g. seven->one, red->blue)")
        overrides.append(o)
    concepts = [Concept(f, o, synonyms.get(f, ()), synonyms.get(o, ())) for f, o in zip(forget, overrides)]
    remain = [p for p in train_prompts if not forgets(p, concepts)]
    if not remain:
        raise ValueError(f"forget {', '.join(forget)}: every prompt of preset '{preset.name}' contains a forgotten "
                         f"concept, so nothing would remain (e.g. all colours forgotten) — forget fewer concepts")
    return concepts


@dataclass
class PromptInfo:
    text: str
    digit: int | None = None
    color: int | None = None
    split: str = "null"                # train / heldout / override / anchor / null


class ConceptTargets:
    """Forget / override / remain conditions as ids into one prompt table (the teacher's, the fake
    score's and the generator's: they all cache its embeddings)."""

    policy = "fixed"
    latent_draw = False                  # override concepts are fixed per prompt
    teacher_null = None                  # the teacher's guidance branch: the empty prompt

    def __init__(self, cfg, preset):
        self.preset = preset
        self.concepts = resolve_concepts(cfg, preset)
        train_t, held_t = _templates(cfg)
        self.table: list[PromptInfo] = [PromptInfo("")]
        index: dict[str, int] = {"": 0}

        def add(text, digit, color, split) -> int:
            if text not in index:
                index[text] = len(self.table)
                self.table.append(PromptInfo(text, digit, color, split))
            return index[text]

        self.train_ids = [add(c.text, c.digit, c.color, "train") for c in cd.captions(train_t)]
        self.heldout_ids = [add(c.text, c.digit, c.color, "heldout") for c in cd.captions(held_t)]
        attribute = cd.concept_attribute
        self.forget_ids, self.override_ids, self.heldout_forget_ids, self.heldout_override_ids = [], [], [], []
        for ids, f_out, o_out in ((self.train_ids, self.forget_ids, self.override_ids),
                                  (self.heldout_ids, self.heldout_forget_ids, self.heldout_override_ids)):
            for i in ids:
                p = self.table[i]
                if not forgets(p.text, self.concepts):
                    continue
                digit, color = p.digit, p.color
                for c in self.concepts:
                    if contains(p.text, c.terms):
                        kind, v = attribute(c.override)
                        digit, color = (v, color) if kind == "digit" else (digit, v)
                f_out.append(i)
                o_out.append(add(rewrite(p.text, self.concepts), digit, color, "override"))
        self.remain_ids = [i for i in self.train_ids if not forgets(self.table[i].text, self.concepts)]
        # the anchor term's prompts (lambda_anchor > 0 only: the table keys the teacher's caches): every concept
        # named alone -- its word and its synonyms ('two', '2', 'red'; no template holds them) -- and the prompt
        # the teacher is asked about for it: itself, or for a forgotten one its override alone ('seven' -> 'one')
        self.anchor_ids, self.anchor_teacher_ids = [], []
        if cfg.lambda_anchor > 0 and cfg.method == "sfd":       # a baseline (--method esd|sa|salun) has no such term
            def alone(term: str, split: str) -> int:
                kind, v = attribute(term)
                return add(term, v if kind == "digit" else None, v if kind == "color" else None, split)
            for name in cd.concept_names():
                for term in (name, *cd.BUILTIN_SYNONYMS.get(name, ())):
                    forgotten = forgets(term, self.concepts)
                    self.anchor_ids.append(alone(term, "anchor"))
                    self.anchor_teacher_ids.append(alone(rewrite(term, self.concepts), "anchor") if forgotten
                                                   else self.anchor_ids[-1])
        self.heldout_remain_ids = [i for i in self.heldout_ids if not forgets(self.table[i].text, self.concepts)]
        self.prompts = [p.text for p in self.table]
        # forgotten and override attribute values per forget prompt: {("digit", 7): ("digit", 1), ...}
        self.forgotten_attrs = [(attribute(c.name), attribute(c.override)) for c in self.concepts]
        self._remain_t = torch.tensor(self.remain_ids)
        self._all_t = torch.tensor(self.train_ids)
        self._forget_t = torch.tensor(self.forget_ids)
        self._override_t = torch.tensor(self.override_ids)
        # class-style fields some callers read
        self.forget = [c.name for c in self.concepts]
        self.override = [c.override for c in self.concepts]
        self.remain = list(self.remain_ids)

    def describe(self) -> str:
        return ", ".join(f"{c.name}->{c.override}" for c in self.concepts)

    def install(self, teacher) -> None:
        """Give the teacher this run's prompt table (before the fake score and generator are cloned)."""
        if not hasattr(teacher, "set_prompts"):
            raise ValueError(f"preset '{self.preset.name}' forgets concepts from prompts, but the teacher "
                             f"({type(teacher).__name__}) is not text-conditioned — pass a text-to-image pipeline "
                             f"folder as --teacher")
        teacher.set_prompts(self.prompts)

    def sample_remain(self, n: int, gen: torch.Generator, all_classes: bool = False) -> torch.Tensor:
        pool = self._all_t if all_classes else self._remain_t
        return pool[torch.randint(0, len(pool), (n,), generator=gen)]

    def sample_forget(self, n: int, gen: torch.Generator):
        pick = torch.randint(0, len(self.forget_ids), (n,), generator=gen)
        return self._forget_t[pick], self._override_t[pick]

    def anchor_keep(self, judge, x: torch.Tensor) -> torch.Tensor:
        """Which of the teacher's anchor samples ``x`` the judge reads as none of the forgotten concepts: a pair
        that shows one (a bare 'three' drawn red under red -> blue) is not anchored, or the term would teach the
        generator to draw the concept where the teacher happens to."""
        digit, color, _ = judge_both(judge, x)
        keep = torch.ones(len(x), dtype=torch.bool)
        for (kind, v), _ in self.forgotten_attrs:
            keep &= (digit if kind == "digit" else color) != v
        return keep

    def classifier_override(self, judge, y_fake):
        raise ValueError("the 'classifier' override policy is for class presets; give an override concept")

    def attrs(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.as_tensor(ids).tolist()
        return (torch.tensor([self.table[i].digit for i in ids]), torch.tensor([self.table[i].color for i in ids]))

    def contains_override(self, i: int) -> bool:
        return contains(self.table[i].text, [t for c in self.concepts for t in (c.override, *c.override_synonyms)])


SD_ONLY = ("forget_prompts", "remain_prompts")


class ConceptTask(PromptTask):
    """Conditions are prompts of the preset's templates; the judge names digit and colour; ``--forget`` takes
    concepts ('seven', 'seven,red')."""

    kind = "concepts"
    anchors = True
    pretrain_steps = 4000
    attacks = ConceptSuite.attacks

    def robustness_suite(self, targets, judge, budget, teacher, extra_prompts=None, *, cfg=None, neighbors=None):
        if neighbors:
            raise ValueError(f"--neighbor-prompts is for Stable Diffusion runs; preset '{self.preset.name}' reports every "
                             f"remaining digit and colour as side-effect cells — drop it")
        return ConceptSuite(targets, judge, TextSide(teacher.text.obj), budget, extra_prompts)

    def validate(self, cfg) -> None:
        self.refuse_class_only(cfg)
        for key in SD_ONLY:
            if getattr(cfg, key):
                raise ValueError(f"{key} (--{key.replace('_', '-')}) is for preset sd (prompt files); preset "
                                 f"'{self.preset.name}' builds its prompts from templates — drop it")
        concepts = resolve_concepts(cfg, self.preset)      # raises on unknown / self-overriding / all forgotten
        cfg.forget = []                                     # class ids do not apply to prompts
        cfg.forget_concepts = [c.name for c in concepts]
        cfg.override = ",".join(c.override for c in concepts)

    def targets(self, cfg, teacher):
        t = ConceptTargets(cfg, self.preset)
        t.install(teacher)
        return t

    # -- chained forgetting (sfd.chain) ----------------------------------------------------------------------
    def chain_pairs(self, cfg) -> list[tuple[str, str]]:
        """(concept, override concept) of a validated configuration."""
        return list(zip(cfg.forget_concepts, str(cfg.override).split(",")))

    def chain_settings(self, earlier: list[tuple[str, str]], cfg, run: str) -> dict:
        """The settings that forget ``earlier`` (the pairs of run ``run``) and this stage's concepts of ``cfg``
        ('next' resolved by :func:`resolve_concepts` against every forgotten concept). Raises ValueError for
        what a chain cannot do."""
        syn = cfg.concept_synonyms or {}
        before = dict(earlier)
        new = [canonical(c, syn) for c in cfg.forget_concepts]
        items = [s.strip() for s in str(cfg.override).split(",")]
        if len(items) not in (1, len(new)):
            raise ValueError(f"override {cfg.override!r}: give one override concept, or one per forget concept "
                             f"({len(new)}), or '{NEXT}'")
        overrides = [o if o.lower() == NEXT else canonical(o, syn) for o in items * (len(new) // len(items))]
        kept = []
        for c, o in zip(new, overrides):
            if c in before:
                if o.lower() != NEXT and o != before[c]:
                    raise ValueError(f"forget {c!r}: {run} already forgot it with override {before[c]!r}; a chain "
                                     f"cannot change an earlier override — give --override {before[c]} or leave "
                                     f"{c!r} out")
                continue
            if o in before:
                raise ValueError(f"override {o!r} (for {c!r}) was forgotten by an earlier stage ({run} forgot "
                                 f"{', '.join(before)}) — choose a concept that remains, or --override {NEXT}")
            if c in before.values():
                olds = [t for t, v in before.items() if v == c]
                raise ValueError(f"forget {c!r}: it is the override of {', '.join(olds)} forgotten by {run}; "
                                 f"forgetting it would undo that — forget another concept, or start a new chain")
            kept.append((c, o))
        pairs = list(before.items()) + kept
        return {"forget_concepts": [c for c, _ in pairs], "override": ",".join(o for _, o in pairs)}

    def evaluator(self, cfg, judge, teacher, targets, *, seed: int = 777, progress: bool = False, dist=None,
                  device=None):
        return ConceptEvaluator(self.preset, judge, teacher, targets, cfg.eval_forget_samples,
                                cfg.eval_remain_per_class, seed=seed, progress=progress, dist=dist, device=device)

    # -- the sweep ---------------------------------------------------------------------------------------
    def all_forget(self) -> list:
        return cd.concept_names()

    def check_template(self, template: str) -> None:
        try:
            template.format(color="red", word="seven", num="7")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"template {template!r} has an unknown slot ({err}) — use {{color}}, {{word}}, "
                             f"{{num}}") from None

    def stand_in_target(self) -> dict:
        return {"forget_concepts": cd.concept_names()[:1], "override": NEXT}

    # -- the bundled models ------------------------------------------------------------------------------
    def train_judge(self, out, *, steps: int, batch: int, lr: float, seed: int, device, progress: bool) -> str:
        m = train_colordigits_judge(self.preset, out, steps=steps, batch=batch, lr=lr, seed=seed, device=device,
                                    progress=progress)
        mm = m["metrics"]
        return (f"classifier: held-out digit accuracy {mm['digit_accuracy']:.4f}, colour {mm['color_accuracy']:.4f}, "
                f"both {mm['both_accuracy']:.4f} ({mm['n_test']} images), {m['wall_seconds']} s -> {out}")

    def pretrain(self, out, *, steps: int, batch: int, lr: float, seed: int, channels: int, device, progress: bool,
                 eval_per_class: int) -> str:
        m = train_text_teacher(self.preset, out, steps=steps, batch=batch, lr=lr, seed=seed, device=device,
                               progress=progress, eval_per_prompt=max(1, eval_per_class // 100))
        mm = m["metrics"]
        return (f"teacher: {mm['sampler']}: prompt accuracy (digit and colour) training templates "
                f"{mm['prompt_accuracy_train_templates']:.4f}, held-out templates "
                f"{mm['prompt_accuracy_heldout_templates']:.4f}; FD per colour {mm['fd_per_color']}; "
                f"{m['wall_seconds']} s -> {out}/teacher (+ teacher.json)")
