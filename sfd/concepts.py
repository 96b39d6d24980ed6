"""Concept targets for text-to-image models (SFD.md section 5): prompts, rewriting, the prompt table.

A target forgets a *concept* -- a word or phrase -- from every prompt that contains it; the
teacher is asked about the same prompt with the concept replaced by an *override* concept.
Matching is literal (regex-escaped), case-insensitive and whole-word: "red" matches "Red" and
"red," but never the inside of "tired"; a phrase ("brad pitt") matches as a whole. A concept's
synonyms (the numeral "7" for "seven") are forgotten with it, each replaced by the override's
synonym in the same position when it has one ("the digit 7" -> "the digit 1"), else by the
override itself. Remain prompts are the prompts that contain no forgotten concept or synonym.

Conditions stay integers: :class:`ConceptTargets` builds the run's finite prompt table
(index 0 is the empty prompt, classifier-free guidance's null condition) and samples ids into
it; the text-conditioned teacher caches one embedding per id (sfd.denoisers.text_unet).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

NEXT = "next"


def term_pattern(terms) -> re.Pattern:
    """One case-insensitive whole-word pattern for literal ``terms`` (longest first, so a phrase wins
    over a word inside it)."""
    terms = sorted({t.strip().lower() for t in terms if t and t.strip()}, key=len, reverse=True)
    if not terms:
        raise ValueError("no concept terms to match")
    alt = "|".join(re.escape(t) for t in terms)
    return re.compile(rf"(?<!\w)(?:{alt})(?!\w)", re.IGNORECASE)


def contains(prompt: str, terms) -> bool:
    return bool(term_pattern(terms).search(prompt))


@dataclass(frozen=True)
class Concept:
    name: str                          # the forgotten concept (lower case)
    override: str                      # what the teacher is asked about instead
    synonyms: tuple[str, ...] = ()     # forgotten with the concept
    override_synonyms: tuple[str, ...] = ()

    @property
    def terms(self) -> tuple[str, ...]:
        return (self.name, *self.synonyms)

    def replacements(self) -> dict[str, str]:
        out = {self.name: self.override}
        for i, s in enumerate(self.synonyms):
            out[s] = self.override_synonyms[i] if i < len(self.override_synonyms) else self.override
        return out


def rewrite(prompt: str, concepts) -> str:
    """``prompt`` with every forgotten concept (and synonym) replaced by its override, in one pass
    (a replacement is never matched again, so seven->one and one->two do not chain)."""
    table = {}
    for c in concepts:
        table.update({k.lower(): v for k, v in c.replacements().items()})
    if not table:
        return prompt
    return term_pattern(table).sub(lambda m: table[m.group(0).lower()], prompt)


def forgets(prompt: str, concepts) -> bool:
    terms = [t for c in concepts for t in c.terms]
    return bool(terms) and contains(prompt, terms)


# -- the colordigits vocabulary -------------------------------------------------------------
def _preset_vocab(preset):
    """(concept names, built-in synonyms, attribute-of function) of a text preset."""
    if preset.name == "colordigits":
        from . import colordigits as cd
        return cd.concept_names(), dict(cd.BUILTIN_SYNONYMS), cd.concept_attribute
    if preset.extra.get("latent"):                    # sd: one built-in concept; celebrities are named freely
        from .sd import NUDITY
        return [NUDITY], {}, (lambda c: None)
    return [], {}, (lambda c: None)


def canonical(term: str, preset, extra_synonyms: dict | None = None) -> str:
    """A concept name for ``term``: itself, or the concept it is a synonym of ('7' -> 'seven')."""
    t = str(term).strip().lower()
    names, syn, _ = _preset_vocab(preset)
    syn = {**syn, **{k.lower(): tuple(v) for k, v in (extra_synonyms or {}).items()}}
    if t in names or t in syn:
        return t
    for k, vs in syn.items():
        if t in (v.lower() for v in vs):
            return k
    return t


def _templates(cfg, preset):
    from . import colordigits as cd
    train = tuple(cfg.prompt_templates) if cfg.prompt_templates else cd.TRAIN_TEMPLATES
    return train, cd.HELDOUT_TEMPLATES


def _fmt(names) -> str:
    return ", ".join(names)


def resolve_concepts(cfg, preset) -> list[Concept]:
    """The concepts of ``cfg`` (forget_concepts, override, concept_synonyms), validated against the
    preset's prompts; raises ValueError naming the bad value and the fix."""
    if preset.extra.get("latent"):                    # sd: free-form concepts and prompt files
        from .sd import resolve_sd_concepts
        return resolve_sd_concepts(cfg, preset)
    from . import colordigits as cd
    names, builtin, attribute = _preset_vocab(preset)
    user_syn = {str(k).strip().lower(): tuple(str(v).strip().lower() for v in vs)
                for k, vs in (cfg.concept_synonyms or {}).items()}
    synonyms = {**{k: tuple(v) for k, v in builtin.items()}, **{k: builtin.get(k, ()) + v for k, v in user_syn.items()}}
    forget = [canonical(c, preset, user_syn) for c in cfg.forget_concepts]
    if not forget or not all(forget):
        raise ValueError("forget: no concept given — give a word or phrase to forget, e.g. --forget seven "
                         f"(concepts of '{preset.name}': {_fmt(names)})")
    if len(set(forget)) != len(forget):
        raise ValueError(f"forget {cfg.forget_concepts}: a concept is listed twice — list each concept once")
    train_t, _ = _templates(cfg, preset)
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
        o = canonical(o, preset, user_syn)
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
    split: str = "null"                # train / heldout / override / null


class ConceptTargets:
    """Forget / override / remain conditions as ids into one prompt table (the teacher's, the fake
    score's and the generator's: they all cache its embeddings)."""

    policy = "fixed"

    def __init__(self, cfg, preset):
        from . import colordigits as cd
        self.preset = preset
        self.concepts = resolve_concepts(cfg, preset)
        train_t, held_t = _templates(cfg, preset)
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

    def classifier_override(self, judge, y_fake):
        raise ValueError("the 'classifier' override policy is for class presets; give an override concept")

    def attrs(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.as_tensor(ids).tolist()
        return (torch.tensor([self.table[i].digit for i in ids]), torch.tensor([self.table[i].color for i in ids]))

    def contains_override(self, i: int) -> bool:
        return contains(self.table[i].text, [t for c in self.concepts for t in (c.override, *c.override_synonyms)])


def make_targets(cfg, preset, teacher):
    """Class targets for class presets; concept targets (with the teacher's prompt table installed) for text ones."""
    if getattr(preset, "text", False):
        if preset.extra.get("latent"):
            from .sd import SDTargets
            t = SDTargets(cfg, preset)
        else:
            t = ConceptTargets(cfg, preset)
        t.install(teacher)
        return t
    from .targets import ClassTargets
    return ClassTargets(cfg, teacher.num_classes)
