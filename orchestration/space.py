"""Search spaces as data: `search_spaces/<preset>.yaml`, validated before anything starts."""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from pathlib import Path

from sfd import yamlfile
from sfd.config import DEFAULT_LAYER, SETTINGS, SFDConfig, format_config, layer_sources, layered_config, spaces_dir
from sfd.methods import BASELINES
from sfd.presets import PRESETS
from sfd.tasks import get_task
from sfd.tasks.classes import OVERRIDE_POLICIES

SPACE_DIR = spaces_dir()
TRIAL_KEYS = {"budget_kimg", "max_seconds", "eval_every_kimg", "checkpoint_every_kimg", "eval_forget_samples", "eval_at_start",
              "eval_remain_per_class", "eval_fd_draws"}
OPTUNA_LAYER = "Optuna"           # the layer of a trial's searched values
TYPES = {"loguniform": ("low", "high"), "uniform": ("low", "high"), "int": ("low", "high"), "choice": ("values",)}


@dataclass
class SearchSpace:
    preset: str
    defaults: dict
    params: dict
    override: str = "next"
    stage1_kimg: float = 0.0          # budget of the shared stage 1 (0: trials start from the teacher)
    trials_per_target: int = 3        # the sweep's default --trials-per-target for this preset
    source: str = ""
    extra: dict = field(default_factory=dict)
    # override policy ('random', ...) -> settings its targets default to on top of `defaults`
    by_override: dict = field(default_factory=dict)
    # the YAML's own layers of `defaults`, named: [("search_spaces/<preset>.yaml defaults", {...}), (".. trial", {...})]
    layers: list = field(default_factory=list)
    # the method this space searches ('sfd': the top-level blocks) and, for a baseline, its `methods:` entry's
    # defaults (applied after the policy's override_defaults, as in `sfd forget --method`)
    method: str = "sfd"
    method_defaults: dict = field(default_factory=dict)
    # baseline -> (its `methods:` defaults, its `search` block), validated by load_space
    methods: dict = field(default_factory=dict)
    # the sweep's defaults for its search policy on this preset (flags win): the per-target early stopping
    # ({"grace_kimg", "reduction_factor"}; empty: off) and the warm starts per target
    early_stop: dict = field(default_factory=dict)
    warm_starts: int = 0

    def for_method(self, method: str) -> "SearchSpace":
        """This space as ``method`` searches it: 'sfd' is the space itself; a baseline keeps the preset's
        defaults, trial schedule and policy defaults, adds its ``methods:`` entry's defaults on top and
        searches its own ``search`` block (nothing where it has none: its recipe runs as written)."""
        if method == "sfd":
            return self
        if method not in self.methods:
            raise ValueError(f"method {method!r} has no entry in {self.label}'s methods: block (it has "
                             f"{', '.join(self.methods) or 'none'}) — add methods.{method} with its 'defaults' and "
                             f"'search', or leave {method} out of --methods")
        defaults, params = self.methods[method]
        return SearchSpace(self.preset, self.defaults, params, self.override, self.stage1_kimg, self.trials_per_target,
                           self.source, self.extra, self.by_override, self.layers, method,
                           {**defaults, "method": method}, self.methods, self.early_stop, self.warm_starts)

    def baseline(self, override: str | None = None) -> SFDConfig:
        """The default configuration; for a target of the ``override`` policy, with that policy's
        ``override_defaults`` on top (the same defaults `sfd forget` gives that policy)."""
        return layered_config(self.baseline_layers(override))[0]

    def baseline_layers(self, override: str | None = None) -> list:
        """The named layers of :meth:`baseline`, in order: the YAML's ``defaults`` and ``trial`` blocks,
        what the sweep changed in them since (``--budget long``), the policy's ``override_defaults``."""
        merged = {}
        for _, values in self.layers:
            merged.update(values)
        changed = {k: v for k, v in self.defaults.items() if k not in merged or merged[k] != v}
        out = [*self.layers, ("the sweep's --budget long" if self.layers else "the space's defaults", changed)]
        if override is not None and str(override) in self.by_override:
            out.append((f"{self.label} override_defaults[{override}]", self.by_override[str(override)]))
        if self.method != "sfd":
            out.append((f"{self.label} methods[{self.method}]", self.method_defaults))
        return [*out, (f"{self.label} preset", {"preset": self.preset})]

    @property
    def label(self) -> str:
        """search_spaces/<name>.yaml for a shipped space, else its path."""
        path = Path(self.source) if self.source else None
        if path is not None and path.parent.resolve() == SPACE_DIR.resolve():
            return f"search_spaces/{path.name}"
        return self.source or f"the {self.preset} space"

    def optuna_space(self) -> dict:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
        out = {}
        for k, p in self.params.items():
            t = p["type"]
            if t in ("loguniform", "uniform"):
                out[k] = FloatDistribution(float(p["low"]), float(p["high"]), log=t == "loguniform")
            elif t == "int":
                out[k] = IntDistribution(int(p["low"]), int(p["high"]))
            else:
                out[k] = CategoricalDistribution(list(p["values"]))
        return out

    def baseline_point(self, override: str | None = None) -> dict:
        """The default configuration expressed in the searched parameters (Optuna's first point)."""
        base = self.baseline(override).to_dict()
        return {k: base[k] for k in self.params}


def space_path(preset: str) -> Path:
    return SPACE_DIR / f"{preset}.yaml"


def load_space(path) -> SearchSpace:
    """Read and validate a search-space YAML; errors name the file and the offending key."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"search space {path} does not exist; available: "
                         f"{', '.join(sorted(p.name for p in SPACE_DIR.glob('*.yaml')))}")
    doc = yamlfile.load_file(path, "search space")        # duplicate keys refused, -1e-4 a number
    if not isinstance(doc, dict):
        raise ValueError(f"search space {path}: expected a mapping with 'preset', 'defaults', 'search'")
    unknown = sorted(set(doc) - {"preset", "defaults", "trial", "search", "override", "stage1_kimg", "stage1",
                              "trials_per_target", "early_stop", "warm_starts", "override_defaults", "methods"})
    if unknown:
        raise ValueError(f"search space {path}: unknown top-level key(s) {unknown}; allowed: preset, defaults, "
                         f"trial, search, override, stage1_kimg, stage1, trials_per_target, early_stop, warm_starts, "
                         f"override_defaults, methods")
    stage1_kimg = doc.get("stage1_kimg", 0)
    if not isinstance(stage1_kimg, (int, float)) or isinstance(stage1_kimg, bool) or not stage1_kimg >= 0:
        raise ValueError(f"search space {path}: stage1_kimg must be a number >= 0, got {stage1_kimg!r}")
    trials = doc.get("trials_per_target", 3)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ValueError(f"search space {path}: trials_per_target must be a whole number >= 1, got {trials!r}")
    early_stop, warm_starts = _search_policy(path, doc)
    preset = doc.get("preset")
    if not isinstance(preset, str):
        raise ValueError(f"search space {path}: 'preset' must name a preset")
    stage1 = doc.get("stage1")
    if stage1 is not None:               # the shared stage 1's own settings (sfd.stage1.stage1_config)
        if not isinstance(stage1, dict):
            raise ValueError(f"search space {path}: 'stage1' must be a mapping of SFD settings")
        try:
            SFDConfig.from_dict({**stage1, "preset": preset}).validate()
        except (TypeError, ValueError) as e:
            raise ValueError(f"search space {path}: stage1: {e}") from None
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ValueError(f"search space {path}: 'defaults' must be a mapping of SFD settings")
    # trial: the schedule of a sweep trial (shorter than a single run's), on top of the defaults
    trial = doc.get("trial") or {}
    if not isinstance(trial, dict) or sorted(set(trial) - TRIAL_KEYS):
        raise ValueError(f"search space {path}: 'trial' must be a mapping of schedule settings among "
                         f"{sorted(TRIAL_KEYS)}")
    label = f"search_spaces/{path.name}" if path.parent.resolve() == SPACE_DIR.resolve() else str(path)
    layers = [(f"{label} defaults", dict(defaults)), (f"{label} trial", dict(trial))]
    defaults = {**defaults, **trial}
    try:
        # type, finiteness and range of every default (the targets' forget/override: validate_plan)
        SFDConfig.from_dict({**stand_in_target(preset), **defaults, "preset": preset}).validate()
    except (TypeError, ValueError) as e:
        raise ValueError(f"search space {path}: defaults: {e}") from None
    params = doc.get("search") or {}
    base = SFDConfig.from_dict({**defaults, "preset": preset}).to_dict()
    _check_search(path, "search", params, base)
    by_override = _override_defaults(path, doc, preset, defaults, params)
    methods = _methods(path, doc, preset, defaults)
    return SearchSpace(preset, defaults, params, str(doc.get("override", "next")), float(stage1_kimg), trials,
                       str(path), by_override=by_override, layers=layers, methods=methods, early_stop=early_stop,
                       warm_starts=warm_starts)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _search_policy(path, doc: dict) -> tuple[dict, int]:
    """The space's ``early_stop`` block (``{grace_kimg: > 0, reduction_factor: > 1}``, or ``false`` / absent:
    off) and ``warm_starts`` (a count >= 0, absent: 0): the sweep's defaults for --early-stop, --grace-kimg,
    --reduction-factor and --warm-starts on this preset."""
    block = doc.get("early_stop", False)
    early_stop = {}
    if block is not False and block is not None:
        keys = {"grace_kimg", "reduction_factor"}
        if not isinstance(block, dict) or set(block) != keys:
            raise ValueError(f"search space {path}: early_stop must be false or a mapping with exactly grace_kimg "
                             f"and reduction_factor, got {block!r} — e.g. early_stop: {{grace_kimg: 5, "
                             f"reduction_factor: 1.5}}")
        g, r = block["grace_kimg"], block["reduction_factor"]
        if not (_number(g) and g > 0):
            raise ValueError(f"search space {path}: early_stop.grace_kimg {g!r} is invalid — give a positive number "
                             f"of kimg (the first rung)")
        if not (_number(r) and r > 1):
            raise ValueError(f"search space {path}: early_stop.reduction_factor {r!r} is invalid — give a number > 1 "
                             f"(1.5 keeps the best two thirds of a target's trials at each rung)")
        early_stop = {"grace_kimg": float(g), "reduction_factor": float(r)}
    warm = doc.get("warm_starts", 0)
    if not isinstance(warm, int) or isinstance(warm, bool) or warm < 0:
        raise ValueError(f"search space {path}: warm_starts must be a whole number >= 0 (0: off), got {warm!r}")
    return early_stop, warm


def _check_search(path, block: str, params, base: dict) -> None:
    """A ``search`` block: every key a searchable SFD setting, every range or choice inside the setting's
    declared range, the default (``base``) a point of every range."""
    if not isinstance(params, dict):
        raise ValueError(f"search space {path}: '{block}' must be a mapping")
    for key, p in params.items():
        where = f"search space {path}: {block}.{key}"
        if key not in SETTINGS or not SETTINGS[key].searchable:     # declared searchable=True in sfd/config.py
            tunable = [n for n, s in SETTINGS.items() if s.searchable]
            raise ValueError(f"{where}: not a tunable SFD setting; tunable: {', '.join(tunable)}")
        if not isinstance(p, dict) or p.get("type") not in TYPES:
            raise ValueError(f"{where}: needs 'type' among {sorted(TYPES)}")
        missing = [f for f in TYPES[p["type"]] if f not in p]
        extra = sorted(set(p) - {"type", *TYPES[p["type"]]})
        if missing or extra:
            raise ValueError(f"{where}: type {p['type']} needs exactly {TYPES[p['type']]} (missing {missing}, "
                             f"unexpected {extra})")
        s = SETTINGS[key]
        fits = {"float": ("loguniform", "uniform", "choice"), "int": ("int", "choice")}.get(s.value_type, ("choice",))
        if p["type"] not in fits:
            raise ValueError(f"{where}: type {p['type']} does not fit {key}, a {s.value_type} setting — use "
                             f"{' or '.join(fits)}")
        if p["type"] == "choice":
            if not isinstance(p["values"], list) or not p["values"]:
                raise ValueError(f"{where}: 'values' must be a non-empty list")
            values = [(f"{v!r}", v) for v in p["values"]]
        else:
            lo, hi = p["low"], p["high"]
            if not isinstance(lo, (int, float)) or not isinstance(hi, (int, float)) or not lo < hi:
                raise ValueError(f"{where}: need numbers low < high, got low={lo!r} high={hi!r}")
            if p["type"] == "loguniform" and lo <= 0:
                raise ValueError(f"{where}: loguniform needs low > 0, got {lo}")
            values = [(f"low={lo!r}", lo), (f"high={hi!r}", hi)]
        for what, v in values:            # inside the setting's declared range / choices (sfd.config)
            try:
                s.check(getattr(SFDConfig.from_dict({key: v}), key))     # its type, then its range / choices
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: {what} is not a valid {key}: {e}") from None
        if p["type"] != "choice":
            if not lo <= base[key] <= hi:
                raise ValueError(f"{where}: the default {key}={base[key]} lies outside [{lo}, {hi}]; the baseline "
                                 f"trial must be a point of the space")
        elif base[key] not in p["values"]:
            raise ValueError(f"{where}: the default {key}={base[key]!r} is not one of its values {p['values']}; the "
                             f"baseline trial must be a point of the space — add it to the values, or drop "
                             f"search.{key}")


def _methods(path, doc: dict, preset: str, defaults: dict) -> dict:
    """``methods``: baseline -> (its recipe's settings on top of the defaults, its ``search`` block), each
    checked as the top-level blocks are (a baseline's default is a point of its own search ranges)."""
    block = doc.get("methods") or {}
    if not isinstance(block, dict):
        raise ValueError(f"search space {path}: 'methods' must map a baseline ({', '.join(BASELINES)}) to its "
                         f"'defaults' and 'search'")
    out = {}
    for method, entry in block.items():
        where = f"search space {path}: methods.{method}"
        if method not in BASELINES:
            raise ValueError(f"{where}: not a baseline; give one of {', '.join(BASELINES)} ('sfd' is the top-level "
                             f"blocks)")
        if not isinstance(entry, dict) or sorted(set(entry) - {"defaults", "search"}):
            raise ValueError(f"{where}: must be a mapping with 'defaults' and 'search' (got "
                             f"{sorted(entry) if isinstance(entry, dict) else type(entry).__name__})")
        own = entry.get("defaults") or {}
        if not isinstance(own, dict):
            raise ValueError(f"{where}.defaults must be a mapping of SFD settings")
        bad = sorted(set(own) & (TRIAL_KEYS | {"preset", "forget", "override", "forget_concepts", "method"}))
        if bad:
            raise ValueError(f"{where}.defaults: {bad} cannot differ per method (the target, the method and the "
                             f"trial schedule are the sweep's)")
        try:
            cfg = SFDConfig.from_dict({**stand_in_target(preset), **defaults, **own, "method": method,
                                       "preset": preset}).validate()
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}.defaults: {e}") from None
        params = entry.get("search") or {}
        _check_search(path, f"methods.{method}.search", params, cfg.to_dict())
        out[str(method)] = (dict(own), dict(params))
    return out


def _override_defaults(path, doc: dict, preset: str, defaults: dict, params: dict) -> dict:
    """``override_defaults``: policy -> SFD settings (not the target, not the trial schedule), each
    set valid on top of the defaults and, for a searched setting, inside its range (the policy's
    baseline trial is a point of the space)."""
    block = doc.get("override_defaults") or {}
    if not isinstance(block, dict):
        raise ValueError(f"search space {path}: 'override_defaults' must map an override policy to SFD settings")
    out = {}
    for policy, extra in block.items():
        where = f"search space {path}: override_defaults.{policy}"
        if policy not in OVERRIDE_POLICIES:
            raise ValueError(f"{where}: not an override policy; give one of {', '.join(OVERRIDE_POLICIES)}")
        if not isinstance(extra, dict):
            raise ValueError(f"{where}: must be a mapping of SFD settings")
        bad = sorted(set(extra) & (TRIAL_KEYS | {"preset", "forget", "override", "forget_concepts"}))
        if bad:
            raise ValueError(f"{where}: {bad} cannot differ per policy (the target and the trial schedule)")
        try:
            cfg = SFDConfig.from_dict({**stand_in_target(preset), **defaults, **extra, "preset": preset}).validate()
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
        for key, p in params.items():
            v = getattr(cfg, key)
            if key in extra and p["type"] != "choice" and not p["low"] <= v <= p["high"]:
                raise ValueError(f"{where}: {key}={v} lies outside search.{key} [{p['low']}, {p['high']}]; the "
                                 f"policy's baseline trial must be a point of the space")
            if key in extra and p["type"] == "choice" and v not in p["values"]:
                raise ValueError(f"{where}: {key}={v!r} is not one of search.{key}'s values {p['values']}; the "
                                 f"policy's baseline trial must be a point of the space")
        out[str(policy)] = dict(extra)
    return out


def trial_layers(space: SearchSpace, target, overrides: dict, params: dict, flag_label="the sweep's flags") -> list:
    """The named layers of a sweep trial's configuration, in order (a later one wins): the space's
    baseline layers for the target's override policy, the values Optuna drew, the sweep's flags, the
    target itself. PerTargetSearch builds every trial from them; --dry-run names them."""
    return [*space.baseline_layers(target.override), (OPTUNA_LAYER, params), (flag_label, overrides),
            (f"target {target.name}", target.config_overrides())]


def space_for(spaces: dict, target) -> SearchSpace:
    """The space a target's trials search: its preset's, as the target's method searches it."""
    return spaces[target.preset].for_method(getattr(target, "method", "sfd"))


def trials_for(spaces: dict, target, trials_per_target: int) -> int:
    """Trials a target gets: ``trials_per_target``, or one for a baseline whose ``methods:`` entry searches
    nothing (its recipe runs as written; more trials would repeat it)."""
    space = space_for(spaces, target)
    return trials_per_target if space.method == "sfd" or space.params else 1


def describe_baselines(targets, spaces: dict, overrides: dict, flag_label="the sweep's flags") -> list[str]:
    """--dry-run: each target's baseline trial (Optuna's first point) as it will run: the settings
    that are not SFDConfig's defaults, each with the layer that set it; a searched setting also names
    its search range (trials after the baseline draw it). Targets with equal settings share a listing."""
    listings: dict[tuple, list] = {}
    for t in targets:
        space = space_for(spaces, t)
        layers = trial_layers(space, t, overrides, space.baseline_point(t.override), flag_label)
        cfg = layered_config(layers)[0]
        sources = layer_sources([layer for layer in layers if layer[0] != OPTUNA_LAYER])
        for k, p in space.params.items():
            where = p["values"] if p["type"] == "choice" else f"[{p['low']}, {p['high']}]"
            block = "search" if space.method == "sfd" else f"methods.{space.method}.search"
            sources[k] += f"; Optuna searches it: {block}.{k} {p['type']} {where}"
        lines = format_config(cfg, sources, skip_default=True, skip=set(t.config_overrides()), indent="    ")
        listings.setdefault(tuple(lines), []).append(t.name)
    out = []
    for lines, names in listings.items():
        out.append(f"  baseline trial of {', '.join(names)} (its forget/override: the target; settings not "
                   f"listed: {DEFAULT_LAYER}):")
        out += lines
    return out


def stand_in_target(preset: str) -> dict:
    """A target to check a space's defaults with on their own (each real target: validate_plan): a
    text preset's defaults name no concept, and validate needs one."""
    return get_task(preset).stand_in_target() if preset in PRESETS else {}


def validate_plan(targets, spaces: dict, overrides: dict) -> None:
    """The whole sweep checked through :meth:`SFDConfig.validate` before Ray starts: for every
    target, its space's defaults and, for each searched setting, both bounds of a range and
    every value of a choice (a trial can draw any of them). Errors name the space, the key and
    the value."""
    for t in targets:
        space = space_for(spaces, t)
        where = f"search space {space.source or t.preset}" + ("" if space.method == "sfd" else f" (methods.{space.method})")
        fixed = {**overrides, **t.config_overrides()}
        try:
            base = space.baseline(t.override).replace(**fixed).validate()
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: defaults for target {t.name}: {e}") from None
        for key, p in space.params.items():
            if p["type"] == "choice":
                values = [(f"{key}={v!r}", v) for v in p["values"]]
            else:
                values = [(f"{key} low={p['low']!r}", p["low"]), (f"{key} high={p['high']!r}", p["high"])]
            for what, v in values:
                try:
                    base.replace(**{key: v}).validate()
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{where}: search.{key}: {what} is invalid: {e}") from None
