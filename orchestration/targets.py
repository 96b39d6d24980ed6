"""Forget targets of a sweep: `all_<preset>_classes`, `<preset>:3,7`, `<preset>:3->5`, `<preset>:0+3->1,2`.

Stable Diffusion (sd): `sd:nudity`, `'sd:brad pitt->a middle aged man'`, `'sd:brad pitt+angelina jolie->a man,a woman'`
(one quoted argument per target: phrases have spaces), or a --targets-file with ``preset: sd``.

Text-to-image presets (colordigits) forget *concepts*: `colordigits:seven->one`, `colordigits:red->blue`,
`colordigits:seven+red->one,blue` (several concepts in one generator), `colordigits:seven,red` (each in
turn, default override), `all_colordigits_concepts`, and a concept-list file (:func:`load_targets_file`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from sfd.presets import PRESETS, get_preset


@dataclass(frozen=True)
class Target:
    preset: str
    forget: tuple                # class ids; concepts (str) for text presets
    override: str                # class ids "5" / "1,2", or a policy: random / classifier; concepts "one,blue"
    synonyms: tuple = ()         # text presets: ((concept, (synonym, ...)), ...) forgotten with the concept
    templates: tuple = ()        # text presets: training prompt templates (default: the preset's)
    remain_prompts: str | None = None   # sd: prompt files (one prompt per line), absolute paths
    forget_prompts: str | None = None

    @property
    def concepts(self) -> bool:
        return bool(self.forget) and isinstance(self.forget[0], str)

    def config_overrides(self) -> dict:
        """The SFD settings that make a run forget this target."""
        if not self.concepts:
            return {"forget": list(self.forget), "override": self.override}
        out = {"forget_concepts": list(self.forget), "override": self.override,
               "concept_synonyms": {k: list(v) for k, v in self.synonyms}, "prompt_templates": list(self.templates)}
        for key in ("remain_prompts", "forget_prompts"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out

    @property
    def name(self) -> str:
        f = "+".join(map(str, self.forget))
        return f"{self.preset}:{f}->{self.override}"

    @property
    def slug(self) -> str:
        """File- and run-name-safe form."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.preset}_forget{'+'.join(map(str, self.forget))}_to_{self.override}")


def _resolve_override(preset, forget: tuple[int, ...], override: str) -> str:
    """'next' -> c + 1; class names ('dog', 'cat,dog') -> ids; policies and ids as given."""
    if override not in ("next", "random", "classifier"):
        items = [s.strip() for s in override.split(",")]
        return ",".join(str(preset.class_names.index(s)) if s in preset.class_names and not s.isdigit() else s
                        for s in items)
    if override == "next":
        nxt = []
        for c in forget:
            o = (c + 1) % preset.num_classes
            while o in forget:
                o = (o + 1) % preset.num_classes
            nxt.append(str(o))
        return ",".join(nxt)
    return override


def preset_of(spec: str) -> str:
    """The preset a target spec names (before validating the rest)."""
    m = re.fullmatch(r"all_(\w+?)_(?:classes|concepts)", spec)
    if m:
        return m.group(1)
    if ":" not in spec:
        raise ValueError(f"target {spec!r} is not understood; use all_<preset>_classes, <preset>:3,7, "
                         f"<preset>:3->5 or <preset>:0+3->1,2 (presets: {', '.join(sorted(PRESETS))})")
    return spec.split(":", 1)[0]


def parse_targets(specs: list[str], default_override: str = "next") -> list[Target]:
    """Parse and validate every target before anything starts; errors list the valid choices."""
    out: list[Target] = []
    for spec in specs:
        # sd targets are phrases ('sd:brad pitt->a middle aged man'): one target per argument
        parts = [spec] if spec.strip().startswith("sd:") else spec.split()
        for part in parts:
            out.extend(_parse_one(part.strip(), default_override))
    if not out:
        raise ValueError("no targets given; e.g. --targets all_digits_classes or digits:3->5")
    seen = set()
    for t in out:
        if t.name in seen:
            raise ValueError(f"target {t.name} is listed twice")
        seen.add(t.name)
    return out


def _parse_one(spec: str, default_override: str) -> list[Target]:
    m = re.fullmatch(r"all_(\w+?)_concepts", spec)
    if m:
        preset = _preset(m.group(1), spec)
        if not preset.text:
            raise ValueError(f"target {spec!r}: preset '{preset.name}' has classes, not concepts — use "
                             f"all_{preset.name}_classes")
        from sfd.concepts import _preset_vocab
        return [_make_concepts(preset, (c,), _concept_default(default_override), spec)
                for c in _preset_vocab(preset)[0]]
    m = re.fullmatch(r"all_(\w+?)_classes", spec)
    if m:
        preset = _preset(m.group(1), spec)
        if preset.text:
            raise ValueError(f"target {spec!r}: preset '{preset.name}' forgets concepts — use "
                             f"all_{preset.name}_concepts or {preset.name}:seven->one")
        return [_make(preset, (c,), default_override) for c in range(preset.num_classes)]
    if ":" not in spec:
        raise ValueError(f"target {spec!r} is not understood; use all_<preset>_classes, <preset>:3,7, "
                         f"<preset>:3->5 or <preset>:0+3->1,2 (presets: {', '.join(sorted(PRESETS))})")
    name, rest = spec.split(":", 1)
    preset = _preset(name, spec)
    if preset.text:
        if "->" in rest:
            forget_s, override = rest.split("->", 1)
            return [_make_concepts(preset, tuple(forget_s.split("+")), override.strip(), spec)]
        return [_make_concepts(preset, (c,), _concept_default(default_override), spec) for c in rest.split(",")]
    if "->" in rest:
        forget_s, override = rest.split("->", 1)
        return [_make(preset, _classes(preset, forget_s.split("+"), spec), override.strip())]
    return [_make(preset, _classes(preset, [c], spec), default_override) for c in rest.split(",")]


def _preset(name: str, spec: str):
    try:
        return get_preset(name)
    except ValueError:
        raise ValueError(f"target {spec!r}: unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None


def _classes(preset, items, spec) -> tuple[int, ...]:
    out = []
    for s in items:
        s = s.strip()
        if s.isdigit():
            c = int(s)
        elif s in preset.class_names:
            c = preset.class_names.index(s)
        else:
            c = s
        try:
            out.append(preset.check_class(c, "class"))
        except ValueError as e:
            raise ValueError(f"target {spec!r}: {e}") from None
    return tuple(out)


def _make(preset, forget: tuple[int, ...], override: str) -> Target:
    override = _resolve_override(preset, forget, override)
    from sfd.config import SFDConfig
    try:
        SFDConfig(preset=preset.name, forget=list(forget), override=override).validate(preset)
    except ValueError as e:
        valid = ", ".join(f"{i}={n}" for i, n in enumerate(preset.class_names))
        raise ValueError(f"target {preset.name}:{'+'.join(map(str, forget))}->{override}: {e} "
                         f"(classes of '{preset.name}' by id or name: {valid})") from None
    return Target(preset.name, forget, override)


def _concept_default(override: str) -> str:
    """Concept targets take 'next' (the next concept of the same kind) unless a concept is given."""
    return "next" if override in ("random", "classifier") or override.isdigit() else override


def _make_concepts(preset, forget: tuple, override: str, spec: str, synonyms=(), templates=(),
                   prompt_files: dict | None = None) -> Target:
    """A concept target, validated (and its concepts and overrides canonical) like the run will be;
    sd prompt files are read now (every forget line must hold the concept), not in a trial."""
    from sfd.config import SFDConfig
    forget = tuple(str(c).strip() for c in forget)
    files = {k: v for k, v in (prompt_files or {}).items() if v}
    try:
        cfg = SFDConfig(preset=preset.name, forget_concepts=list(forget), override=str(override),
                        concept_synonyms={k: list(v) for k, v in synonyms},
                        prompt_templates=list(templates), **files).validate(preset)
        if preset.extra.get("latent"):
            from sfd.sd import SDTargets
            SDTargets(cfg, preset)
    except ValueError as e:
        raise ValueError(f"target {spec!r}: {e}") from None
    return Target(preset.name, tuple(cfg.forget_concepts), cfg.override, tuple(synonyms), tuple(templates),
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
    from pathlib import Path

    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--targets-file {path} does not exist — give a YAML file with a 'targets' list")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"--targets-file {path} is not valid YAML ({e}) — fix the file") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("targets"), list) or not doc["targets"]:
        raise ValueError(f"--targets-file {path}: expected a mapping with a non-empty 'targets' list "
                         f"(entries: concept, override, optional synonyms and templates)")
    prompt_keys = ("remain_prompts", "forget_prompts")
    unknown = sorted(set(doc) - {"preset", "templates", "targets", *prompt_keys})
    if unknown:
        raise ValueError(f"--targets-file {path}: unknown key(s) {unknown} — use preset, templates, targets "
                         f"(sd: also remain_prompts, forget_prompts)")
    preset = _preset(str(doc.get("preset", "colordigits")), str(path))
    if not preset.text:
        raise ValueError(f"--targets-file {path}: preset '{preset.name}' forgets classes; concept files are for "
                         f"text-to-image presets (colordigits) — use --targets {preset.name}:3->5")
    templates = doc.get("templates") or []

    def prompt_file(value, key: str, where: str) -> str | None:
        if value is None:
            return None
        if not preset.extra.get("latent"):
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
                t.format(concept="x") if preset.extra.get("latent") else t.format(color="red", word="seven", num="7")
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(f"{where}: template {t!r} has an unknown slot ({err}) — use {{color}}, {{word}}, "
                                 f"{{num}}") from None
        out.append(_make_concepts(preset, tuple(map(str, concepts)), override, where, syn_t, tuple(tmpl), files))
    return out
