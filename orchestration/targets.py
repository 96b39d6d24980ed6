"""Forget targets of a sweep: `all_<preset>_classes`, `<preset>:3,7`, `<preset>:3->5`, `<preset>:0+3->1,2`.

Stable Diffusion (sd): `sd:nudity`, `'sd:brad pitt->a middle aged man'`, `'sd:brad pitt+angelina jolie->a man,a woman'`
(one quoted argument per target: phrases have spaces), or a --targets-file with ``preset: sd``.

Text-to-image presets (colordigits) forget *concepts*: `colordigits:seven->one`, `colordigits:red->blue`,
`colordigits:seven+red->one,blue` (several concepts in one generator), `colordigits:seven,red` (each in
turn, default override), `all_colordigits_concepts`, and a concept-list file (:func:`load_targets_file`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from sfd import yamlfile
from sfd.config import SFDConfig
from sfd.methods import METHODS
from sfd.presets import PRESETS, get_preset
from sfd.tasks import get_task


@dataclass(frozen=True)
class Target:
    preset: str
    forget: tuple                # class ids; concepts (str) for text presets
    override: str                # class ids "5" / "1,2", or a policy: random / classifier; concepts "one,blue"
    synonyms: tuple = ()         # text presets: ((concept, (synonym, ...)), ...) forgotten with the concept
    templates: tuple = ()        # text presets: training prompt templates (default: the preset's)
    remain_prompts: str | None = None   # sd: prompt files (one prompt per line), absolute paths
    forget_prompts: str | None = None
    method: str = "sfd"          # the unlearning method its trials run (sweep.py --methods; sfd/methods/)

    def config_overrides(self) -> dict:
        """The SFD settings that make a run forget this target (with its method, for a baseline)."""
        out = get_task(self.preset).target_settings(
            self.forget, self.override, self.synonyms, self.templates,
            {"remain_prompts": self.remain_prompts, "forget_prompts": self.forget_prompts})
        return out if self.method == "sfd" else {**out, "method": self.method}

    @property
    def target_name(self) -> str:
        """The forget target itself, whatever the method (the ``target`` column of the tables)."""
        f = "+".join(map(str, self.forget))
        return f"{self.preset}:{f}->{self.override}"

    @property
    def name(self) -> str:
        """What the sweep keys a study, its trials and its MLflow runs by: the target, and for a baseline
        its method (``digits:3->4 [esd]``); an SFD target is named as before methods existed."""
        return unit_name(self.target_name, self.method)

    @property
    def slug(self) -> str:
        """File- and run-name-safe form (a baseline's ends in _<method>)."""
        tail = "" if self.method == "sfd" else f"_{self.method}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_",
                      f"{self.preset}_forget{'+'.join(map(str, self.forget))}_to_{self.override}{tail}")


def unit_name(target_name: str, method: str = "sfd") -> str:
    """:attr:`Target.name` from the target's own name and its method."""
    return target_name if method == "sfd" else f"{target_name} [{method}]"


def with_methods(targets: list[Target], methods) -> list[Target]:
    """Every target once per method, methods in the order given, each target's methods together."""
    return [replace(t, method=m) for t in targets for m in methods]


def parse_methods(spec: str | None) -> list[str]:
    """``--methods sfd,esd,sa,salun`` -> the list, checked: an unknown or repeated method is refused
    naming it and the choices."""
    items = [m.strip() for m in (spec or "sfd").split(",")]
    for m in items:
        if m not in METHODS:
            raise ValueError(f"--methods: unknown method {m!r} — give a comma-separated list of "
                             f"{', '.join(METHODS)} (e.g. --methods sfd,esd,sa,salun)")
    dup = sorted({m for m in items if items.count(m) > 1})
    if dup:
        raise ValueError(f"--methods: {', '.join(dup)} listed twice — list each method once")
    return items


def preset_of(spec: str) -> str:
    """The preset a target spec names (before validating the rest)."""
    m = re.fullmatch(r"all_(\w+?)_(?:classes|concepts)", spec)
    if m:
        return m.group(1)
    if ":" not in spec:
        raise ValueError(f"--targets: target {_short(spec)!r} is not understood; use all_<preset>_classes, <preset>:3,7, "
                         f"<preset>:3->5 or <preset>:0+3->1,2 (presets: {', '.join(sorted(PRESETS))})")
    return spec.split(":", 1)[0]


def _free_text(spec: str) -> bool:
    name = spec.strip().split(":", 1)[0] if ":" in spec else ""
    return name in PRESETS and get_task(name).free_text_targets


MAX_TARGETS = 1000       # a sweep of more targets is a mistake (a pasted list) or several sweeps


def _short(spec: str, n: int = 80) -> str:
    """A target spec as a message shows it: a 100 kB list pasted by mistake is not echoed whole."""
    return spec if len(spec) <= n else f"{spec[:n]}... ({len(spec)} characters)"


def parse_targets(specs: list[str], default_override: str = "next", flag: str = "--targets") -> list[Target]:
    """Parse and validate every target before anything starts (in one pass: time linear in the list, at
    most :data:`MAX_TARGETS`); errors name ``flag``, the bad target and the valid choices."""
    out: list[Target] = []
    seen: dict[str, str] = {}
    for spec in specs:
        # free-text targets are phrases ('sd:brad pitt->a middle aged man'): one target per argument
        parts = [spec] if _free_text(spec) else spec.split()
        for part in parts:
            try:
                made = _parse_one(part.strip(), default_override)
            except ValueError as e:
                raise ValueError(f"{flag}: {e}") from None
            for t in made:
                if t.name in seen:
                    was = f" (as {_short(seen[t.name], 40)!r})" if seen[t.name] != part else f" (in {_short(part, 40)!r})"
                    raise ValueError(f"{flag}: target {t.name} is listed twice{was} — list each target once")
                seen[t.name] = part
                out.append(t)
            if len(out) > MAX_TARGETS:
                raise ValueError(f"{flag}: more than {MAX_TARGETS} targets — a sweep takes at most {MAX_TARGETS}; "
                                 f"split the list into several sweeps (each with its own --out)")
    if not out:
        raise ValueError(f"no targets given; e.g. {flag} all_digits_classes or digits:3->5")
    return out


def _parse_one(spec: str, default_override: str) -> list[Target]:
    m = re.fullmatch(r"all_(\w+?)_(classes|concepts)", spec)
    if m:
        preset = _preset(m.group(1), spec)
        task = get_task(preset)
        if m.group(2) != task.noun:
            raise ValueError(f"target {spec!r}: preset '{preset.name}' forgets {task.noun}, not {m.group(2)} — use "
                             f"all_{preset.name}_{task.noun}")
        return [_make(task, (c,), task.target_override(default_override), spec) for c in task.all_forget()]
    shown = _short(spec)
    if ":" not in spec:
        raise ValueError(f"target {shown!r} is not understood; use all_<preset>_classes, <preset>:3,7, "
                         f"<preset>:3->5 or <preset>:0+3->1,2 (presets: {', '.join(sorted(PRESETS))})")
    name, rest = spec.split(":", 1)
    task = get_task(_preset(name, shown))
    if "->" in rest:
        forget_s, override = rest.split("->", 1)
        return [_make(task, task.parse_forget(forget_s.split("+"), shown), override.strip(), shown)]
    items = rest.split(",")
    if len(items) > MAX_TARGETS:
        raise ValueError(f"target {shown!r} lists {len(items)} classes — a sweep takes at most {MAX_TARGETS} "
                         f"targets; split the list into several sweeps")
    return [_make(task, task.parse_forget([c], shown), task.target_override(default_override), shown)
            for c in items]


def _preset(name: str, spec: str):
    try:
        return get_preset(name)
    except ValueError:
        raise ValueError(f"target {spec!r}: unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None


def _make(task, forget: tuple, override: str, spec: str, synonyms=(), templates=(),
          prompt_files: dict | None = None) -> Target:
    """A target, validated (concepts and overrides made canonical) as its runs will be; prompt files are read
    now (every forget line must hold the concept), not in a trial."""
    preset = task.preset
    override = task.resolve_override(forget, override)
    files = {k: v for k, v in (prompt_files or {}).items() if v}
    try:
        cfg = SFDConfig(preset=preset.name, **task.target_settings(forget, override, synonyms, templates, files))
        cfg.validate(preset)
        task.check_target(cfg)
    except ValueError as e:
        raise ValueError(task.target_error(spec, forget, override, e)) from None
    forget = tuple(cfg.forget_concepts) if cfg.forget_concepts else tuple(cfg.forget)
    return Target(preset.name, forget, cfg.override, tuple(synonyms), tuple(templates),
                  files.get("remain_prompts"), files.get("forget_prompts"))


def load_targets_file(path) -> list[Target]:
    """Concept targets from a YAML file::

        preset: colordigits
        templates: ["a {color} {word}", "the digit {num} in {color} ink"]   # optional, for every target
        targets:
          - {concept: seven, override: one, synonyms: ["7", "sept"]}
          - {concept: [seven, red], override: [one, blue]}                  # one generator, both concepts
          - {concept: red}                                                  # override: next (red -> green)

    ``synonyms`` is a list (one concept) or a mapping concept -> list; an entry may carry its own
    ``templates``. Every entry is validated before anything starts.

    ``preset: sd`` also takes prompt files, at the top (every target) or per entry, relative to the
    YAML file's folder: ``remain_prompts: coco_captions.txt`` and ``forget_prompts: pitt_prompts.txt``
    (one prompt per line; every forget line must contain the entry's concept).
    """


    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--targets-file {path} does not exist — give a YAML file with a 'targets' list")
    doc = yamlfile.load_file(path, "--targets-file")     # duplicate keys refused, -1e-4 a number
    if not isinstance(doc, dict) or not isinstance(doc.get("targets"), list) or not doc["targets"]:
        raise ValueError(f"--targets-file {path}: expected a mapping with a non-empty 'targets' list "
                         f"(entries: concept, override, optional synonyms and templates)")
    prompt_keys = ("remain_prompts", "forget_prompts")
    unknown = sorted(set(doc) - {"preset", "templates", "targets", *prompt_keys})
    if unknown:
        raise ValueError(f"--targets-file {path}: unknown key(s) {unknown} — use preset, templates, targets "
                         f"(sd: also remain_prompts, forget_prompts)")
    preset = _preset(str(doc.get("preset", "colordigits")), str(path))
    task = get_task(preset)
    if not task.accepts_targets_file:
        raise ValueError(f"--targets-file {path}: preset '{preset.name}' forgets classes; concept files are for "
                         f"text-to-image presets (colordigits) — use --targets {preset.name}:3->5")
    templates = doc.get("templates") or []

    def prompt_file(value, key: str, where: str) -> str | None:
        if value is None:
            return None
        if not task.takes_prompt_files:
            raise ValueError(f"{where}: {key} is for preset sd (prompt files); preset '{preset.name}' builds its "
                             f"prompts from templates — drop {key}")
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: {key} {value!r} must be a path to a text file (one prompt per line)")
        p = Path(value).expanduser()
        p = p if p.is_absolute() else path.parent / p            # relative to the YAML file, not the cwd
        if not p.is_file():
            raise ValueError(f"{where}: {key} {value!r} ({p}) does not exist — give a text file with one prompt "
                             f"per line, relative to {path.parent} or absolute")
        return str(p.resolve())

    top_files = {k: prompt_file(doc.get(k), k, f"--targets-file {path}") for k in prompt_keys}
    out = []
    for i, e in enumerate(doc["targets"]):
        where = f"{path} targets[{i}]"
        if not isinstance(e, dict) or "concept" not in e:
            raise ValueError(f"{where}: each entry needs 'concept' (and optional override, synonyms, templates)")
        bad = sorted(set(e) - {"concept", "override", "synonyms", "templates", *prompt_keys})
        if bad:
            raise ValueError(f"{where}: unknown key(s) {bad} — use concept, override, synonyms, templates "
                             f"(sd: also remain_prompts, forget_prompts)")
        files = {k: prompt_file(e[k], k, where) if k in e else top_files[k] for k in prompt_keys}
        concepts = e["concept"] if isinstance(e["concept"], list) else [e["concept"]]
        override = e.get("override", "next")
        override = ",".join(map(str, override)) if isinstance(override, list) else str(override)
        syn = e.get("synonyms") or {}
        if isinstance(syn, list):
            if len(concepts) != 1:
                raise ValueError(f"{where}: with several concepts give synonyms as a mapping concept -> list")
            syn = {str(concepts[0]): syn}
        if not isinstance(syn, dict) or not all(isinstance(v, list) for v in syn.values()):
            raise ValueError(f"{where}: synonyms must be a list or a mapping concept -> list of strings")
        syn_t = tuple((str(k).lower(), tuple(str(s) for s in v)) for k, v in syn.items())
        tmpl = e.get("templates") or templates
        if not isinstance(tmpl, list) or not all(isinstance(t, str) for t in tmpl):
            raise ValueError(f"{where}: templates must be a list of strings with {{color}} {{word}} {{num}} slots")
        for t in tmpl:
            try:
                task.check_template(t)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        out.append(_make(task, task.parse_forget(concepts, where), override, where, syn_t, tuple(tmpl), files))
    return out
