"""Concepts in prompts (SFD.md section 5): literal matching and rewriting, shared by the text tasks.

A target forgets a *concept* -- a word or phrase -- from every prompt that contains it; the
teacher is asked about the same prompt with the concept replaced by an *override* concept.
Matching is literal (regex-escaped), case-insensitive and whole-word: "red" matches "Red" and
"red," but never the inside of "tired"; a phrase ("brad pitt") matches as a whole. A concept's
synonyms (the numeral "7" for "seven") are forgotten with it, each replaced by the override's
synonym in the same position when it has one ("the digit 7" -> "the digit 1"), else by the
override itself. Remain prompts are the prompts that contain no forgotten concept or synonym.

Conditions stay integers: the text tasks (sfd.tasks.concepts, sfd.tasks.stable_diffusion) build
the run's finite prompt table (index 0 is the empty prompt, classifier-free guidance's null
condition) and sample ids into it; the text-conditioned teacher caches one embedding per id
(sfd.denoisers.text_unet).
"""
from __future__ import annotations

import re
from dataclasses import dataclass


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
