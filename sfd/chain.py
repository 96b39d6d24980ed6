"""Chained forgetting: forget, then forget again (`sfd forget --init-from RUN`, RUN an earlier forgetting run).

Removal requests arrive one after another. A stage of a chain starts from the earlier run's generator
(EMA) and fake score, as any ``--init-from`` does, and also *keeps its forgotten set*: its targets are
the earlier ones (with their overrides, unchanged) plus its own, so the forget branch keeps pulling the
earlier targets onto their overrides while the new one is learnt. Its evaluation reports every target
(``ua_per_target``, ``ua_worst``) and how far each earlier target fell back since the earlier stage
(``rebound_per_target`` = max(0, UA at the end of the earlier stage - UA now), ``rebound_max``).

The run folder's ``chain.json`` records the chain: every stage in order (run folder, targets, the settings
it ran with, its figures) and the teacher's fingerprint. A chain refuses what cannot work: another preset
or teacher, forgetting every class, an override an earlier stage forgot, forgetting an earlier override,
changing an earlier override (the task's ``chain_settings`` says why, naming the values).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import SFDConfig
from .errors import CheckpointError
from .evaluate.forgetting import teacher_fingerprint
from .io import read_json, write_json
from .presets import get_preset
from .stage1 import is_stage1
from .tasks import get_task

CHAIN_FILE = "chain.json"
# settings that define what the targets mean: a stage left without them takes the earlier stage's
KEPT = ("concept_synonyms", "prompt_templates", "forget_prompts", "remain_prompts")
# figures of each stage kept in chain.json
STAGE_FIGURES = ("ua", "ua_worst", "ua_per_target", "ua_heldout", "ua_heldout_per_target", "rebound_per_target",
                 "rebound_max", "fd_ratio", "remaining_accuracy", "override_fd_ratio", "kimg", "train_seconds")


def forgetting_run(path) -> dict | None:
    """The metrics.json of the finished forgetting run at ``path``; None when ``path`` is not a run folder
    that forgot something (a stage-1 folder, a checkpoint, an official SFD checkpoint, stage 1's own run)."""
    path = Path(path)
    if not path.is_dir() or is_stage1(path):
        return None
    if not (path / "metrics.json").is_file():
        if (path / "run.json").is_file():
            raise ValueError(f"--init-from {path}: this run has not finished (no metrics.json) — finish it first "
                             f"(sfd forget --resume --out {path} ...), or start from one of its checkpoints "
                             f"(--init-from {path}/checkpoints/<step>: generator and fake score only)")
        return None
    m = read_json(path / "metrics.json")
    cfg = m.get("config") if isinstance(m, dict) else None
    if not isinstance(cfg, dict):
        return None
    forgot = (cfg.get("lambda_gen_forget", 1.0) > 0 or cfg.get("lambda_fake_forget", 1.0) > 0) and \
        cfg.get("stage1_kimg", 0.0) < cfg.get("budget_kimg", 1.0)
    return m if forgot else None


def rebound(ua_before: dict, metrics: dict, key: str = "ua_per_target") -> dict:
    """How far each earlier target's UA fell since its stage ended: max(0, before - now)."""
    now = metrics.get(key)
    if not isinstance(now, dict) or not ua_before:
        return {}
    per = {t: max(0.0, float(ua_before[t]) - float(now[t])) for t in ua_before if t in now}
    return {"rebound_per_target": per, "rebound_max": max(per.values(), default=0.0)}


def _ua_of(metrics: dict, pairs) -> dict:
    """Each target's UA at the end of a run (a single-target run older than ua_per_target: its ua)."""
    per = metrics.get("ua_per_target")
    if isinstance(per, dict):
        return {str(k): float(v) for k, v in per.items()}
    if len(pairs) == 1 and isinstance(metrics.get("ua"), (int, float)):
        return {pairs[0][0]: float(metrics["ua"])}
    return {}


def _stage(path: Path, metrics: dict, pairs, fingerprint: str | None) -> dict:
    run = read_json(path / "run.json") if (path / "run.json").is_file() else {}
    return {"run": str(path.resolve()), "run_id": run.get("run_id"), "targets": [list(p) for p in pairs],
            "teacher_fingerprint": fingerprint, "config": metrics.get("config", {}),
            "figures": {k: metrics[k] for k in STAGE_FIGURES if k in metrics}}


@dataclass
class Chain:
    """The earlier stages of a run that continues a chain."""
    run: Path                                   # the stage this run continues
    earlier: list[tuple[str, str]]              # its (target, override) pairs, in order
    ua_before: dict[str, float]                 # each earlier target's UA when that stage ended
    stages: list[dict] = field(default_factory=list)
    teacher_fingerprint: str | None = None      # the chain's teacher, when an earlier stage recorded it
    earlier_teacher: str | None = None          # else: the earlier stage's teacher setting

    def check_teacher(self, teacher, task, teacher_setting) -> str:
        """Every stage of a chain distils one teacher: its weights' fingerprint must match."""
        mine = teacher_fingerprint(teacher)
        theirs = self.teacher_fingerprint
        if theirs is None:                      # a first stage from before metrics.json recorded it
            if self.earlier_teacher == teacher_setting:
                theirs = mine
            else:
                try:
                    theirs = teacher_fingerprint(task.load_teacher(self.earlier_teacher, "cpu"))
                except (OSError, ValueError, CheckpointError) as e:
                    raise ValueError(f"--init-from {self.run}: its teacher {self.earlier_teacher!r} cannot be read "
                                     f"to check it is this run's ({e}) — a chain uses one teacher") from None
        if theirs != mine:
            raise ValueError(f"--init-from {self.run}: that chain distilled another teacher (weights {theirs}, this "
                             f"run's {mine}; teacher setting {self.earlier_teacher!r} vs {teacher_setting!r}) — "
                             f"every stage of a chain uses one teacher: give --teacher as the earlier stage did, "
                             f"or start a new chain")
        self.teacher_fingerprint = mine
        return mine

    def rebound(self, metrics: dict) -> dict:
        return rebound(self.ua_before, metrics)

    def record(self, out_dir: Path, cfg: SFDConfig, metrics: dict, pairs) -> dict:
        """chain.json: the stages in order, this one last."""
        me = _stage(Path(out_dir), {**metrics, "config": cfg.to_dict()}, pairs, self.teacher_fingerprint)
        rec = {"stages": [*self.stages, me], "order": [t for t, _ in pairs],
               "targets": [list(p) for p in pairs], "continues": str(self.run.resolve()),
               "ua_before": self.ua_before, "teacher_fingerprint": self.teacher_fingerprint}
        write_json(Path(out_dir) / CHAIN_FILE, rec)
        return rec


def extend(cfg: SFDConfig, preset=None) -> tuple[SFDConfig, Chain | None]:
    """``cfg`` with the forgotten set of the run it starts from (``init_from``), and that chain; ``cfg`` and
    None when ``init_from`` is no earlier forgetting run. The same on every call (resume, N workers)."""
    if cfg.init_from in (None, "", "none", "teacher", "stage1"):
        return cfg, None
    path = Path(cfg.init_from)
    metrics = forgetting_run(path)
    if metrics is None:
        return cfg, None
    preset = preset or get_preset(cfg.preset)
    task = get_task(preset)
    old = SFDConfig.from_dict(metrics["config"])
    if old.preset != cfg.preset:
        raise ValueError(f"--init-from {path}: that run forgot on preset '{old.preset}', this one is '{cfg.preset}' "
                         f"— a chain stays on one preset (and teacher)")
    old.validate(preset)
    earlier = task.chain_pairs(old)
    kept = {}
    for k in KEPT:
        mine, theirs = getattr(cfg, k), getattr(old, k)
        if mine and theirs and mine != theirs:
            raise ValueError(f"{k} {mine!r}: {path} forgot with {theirs!r}; a chain keeps what its targets mean — "
                             f"drop the setting (it is inherited) or start a new chain")
        if not mine and theirs:
            kept[k] = theirs
    changes = task.chain_settings(earlier, cfg, str(path))
    merged = cfg.replace(**kept, **changes)
    try:
        merged.validate(preset)
    except ValueError as e:
        raise ValueError(f"--init-from {path} forgot {', '.join(f'{t}->{o}' for t, o in earlier)}; with this "
                         f"stage's targets: {e}") from None
    pairs = task.chain_pairs(merged)
    if pairs[:len(earlier)] != earlier:          # the tasks keep the earlier pairs first and unchanged
        raise ValueError(f"--init-from {path}: the chain's earlier targets {earlier} would change to "
                         f"{pairs[:len(earlier)]} — keep the earlier overrides")
    prior = read_json(path / CHAIN_FILE) if (path / CHAIN_FILE).is_file() else {}
    fingerprint = metrics.get("teacher_fingerprint") or prior.get("teacher_fingerprint")
    stages = prior.get("stages") or [_stage(path, metrics, earlier, fingerprint)]
    chain = Chain(run=path, earlier=earlier, ua_before=_ua_of(metrics, earlier), stages=stages,
                  teacher_fingerprint=fingerprint, earlier_teacher=old.teacher)
    return merged, chain
