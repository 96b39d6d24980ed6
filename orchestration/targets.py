"""Forget targets of a sweep: `all_<preset>_classes`, `<preset>:3,7`, `<preset>:3->5`, `<preset>:0+3->1,2`."""
from __future__ import annotations

import re
from dataclasses import dataclass

from sfd.presets import PRESETS, get_preset


@dataclass(frozen=True)
class Target:
    preset: str
    forget: tuple[int, ...]
    override: str                # class ids "5" / "1,2", or a policy: random / classifier

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
    m = re.fullmatch(r"all_(\w+?)_classes", spec)
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
        for part in spec.split():
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
    m = re.fullmatch(r"all_(\w+?)_classes", spec)
    if m:
        preset = _preset(m.group(1), spec)
        return [_make(preset, (c,), default_override) for c in range(preset.num_classes)]
    if ":" not in spec:
        raise ValueError(f"target {spec!r} is not understood; use all_<preset>_classes, <preset>:3,7, "
                         f"<preset>:3->5 or <preset>:0+3->1,2 (presets: {', '.join(sorted(PRESETS))})")
    name, rest = spec.split(":", 1)
    preset = _preset(name, spec)
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
