"""Run folders with an owner: ``run.json`` says which run a folder holds.

Before any work, :func:`plan_run_dir` decides (without writing) what a run may do with its
``--out`` folder: start fresh, resume the run it holds (same configuration), or refuse. With
``overwrite`` the old run is moved aside to ``<out>.old-<timestamp>``, never deleted.
:meth:`RunPlan.apply` then acts on the plan, once, on the lead rank.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import remove_stray_temporaries, resolve_checkpoint
from .io import CheckpointError, write_json

RUN_FILE = "run.json"
# what marks a folder as holding a run (anything else, e.g. Ray's storage folder, is ignored)
RUN_MARKERS = (RUN_FILE, "checkpoints", "metrics.json", "history.json", "generator.safetensors")
# settings that may change between a run and its resumption: how long and how it is observed
RESUMABLE_CHANGES = {"budget_kimg", "max_seconds", "eval_every_kimg", "checkpoint_every_kimg", "device",
                     "eval_forget_samples", "eval_remain_per_class", "eval_fd_draws"}


def config_changes(saved: dict, now: dict) -> str:
    changed = {k: (saved[k], v) for k, v in now.items()
               if k in saved and k not in RESUMABLE_CHANGES and saved[k] != v}
    return ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(changed.items()))


@dataclass
class RunPlan:
    out: Path
    run_id: str
    fresh: bool                      # no run to continue: write run.json
    checkpoint: Path | None = None   # resume from here
    move_aside: Path | None = None   # --overwrite: the old run goes here
    notes: list[str] = field(default_factory=list)

    def apply(self, cfg_dict: dict) -> None:
        """Act on the plan (lead rank only): move an old run aside, create the folder, remove stray
        temporaries of a killed checkpoint write, record the run."""
        if self.move_aside is not None:
            os.replace(self.out, self.move_aside)
        self.out.mkdir(parents=True, exist_ok=True)
        for p in remove_stray_temporaries(self.out):
            self.notes.append(f"removed {p.name}, left by an interrupted checkpoint write")
        if self.fresh or not (self.out / RUN_FILE).is_file():
            write_json(self.out / RUN_FILE, {"run_id": self.run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                             "config": cfg_dict})


def _probe_writable(out: Path) -> None:
    """--out must be (or become) a writable folder: checked before any work."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder — give a folder path for the run")
    anc = out
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"--out {out}: {anc} is a file, so the folder cannot be created — give another path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".sfd-probe-", dir=anc)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"--out {out} is not writable ({e.strerror or e}) — give a folder you can write to") from None


def holds_run(out: Path) -> bool:
    return out.is_dir() and any((out / m).exists() for m in RUN_MARKERS)


def read_run_record(out: Path) -> dict | None:
    p = out / RUN_FILE
    if not p.exists():
        return None
    try:
        rec = json.loads(p.read_text())
        if not isinstance(rec, dict) or not isinstance(rec.get("run_id"), str):
            raise ValueError("no run_id")
        return rec
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is corrupted ({e}) — restore it, or start over with --overwrite "
                              f"(the run is moved aside, not deleted)") from None


def aside_path(out: Path) -> Path:
    """Where ``--overwrite`` moves a folder: ``<out>.old-<timestamp>`` (``-<n>`` added until it is free)."""
    out = Path(out)
    aside, n = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"), 1
    while aside.exists():
        aside, n = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
    return aside


def plan_run_dir(out, cfg_dict: dict, *, resume: bool, overwrite: bool) -> RunPlan:
    """Decide, without writing anything, what this run does with ``out`` (see the module doc)."""
    out = Path(out)
    _probe_writable(out)
    new_id = uuid.uuid4().hex[:12]
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other — give one of them")
    if not holds_run(out):
        plan = RunPlan(out, new_id, fresh=True)
        if resume:
            plan.notes.append(f"--resume: {out} holds no run yet; starting fresh")
        return plan
    if overwrite:
        aside = aside_path(out)
        return RunPlan(out, new_id, fresh=True, move_aside=aside,
                       notes=[f"--overwrite: the run in {out} is moved aside to {aside}"])
    rec = read_run_record(out)
    if not resume:
        what = f"run {rec['run_id']}" if rec else "an earlier run"
        raise ValueError(f"--out {out} already holds {what} — pass --resume to continue it (same settings), "
                         f"--overwrite to move it aside to {out.name}.old-<timestamp>, or choose another --out")
    if rec is not None:
        desc = config_changes(rec.get("config") or {}, cfg_dict)
        if desc:
            raise ValueError(f"cannot resume {out}: the configuration changed ({desc}) — use the run's settings "
                             f"(see {out / RUN_FILE}) or start a new --out folder")
    ckpt, notes = resolve_checkpoint(out)
    if ckpt is not None:
        try:
            saved = json.loads((ckpt / "state.json").read_text()).get("config", {})
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{ckpt / 'state.json'} is corrupted ({e})") from None
        desc = config_changes(saved, cfg_dict)
        if desc:
            raise ValueError(f"cannot resume {ckpt}: the configuration changed ({desc}). Use the run's settings "
                             f"(see its metrics.json / state.json) or start a new --out folder.")
    else:
        notes.append(f"--resume: {out} has no checkpoint yet; starting from iteration 0")
    run_id = rec["run_id"] if rec else (_ckpt_run_id(ckpt) or new_id)
    if ckpt is not None and notes:
        notes.insert(0, f"--resume: falling back to {ckpt.name}")
    return RunPlan(out, run_id, fresh=False, checkpoint=ckpt, notes=notes)


def _ckpt_run_id(ckpt):
    if ckpt is None:
        return None
    try:
        return json.loads((ckpt / "state.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return None
