"""Sequential sweeps (`sweep.py --sequential`): forget the targets one after another, each stage searched.

    python orchestration/sweep.py --sequential --targets digits:3,5,8 --trials-per-target 2

Stage k is a sweep of its own (OUT/stage<k>-<slug>/: its Optuna study, Tune experiment and tables) of stage k's
target, every trial starting from stage k-1's best trial (``init_from``), which `sfd.chain` turns into a chain
stage: the trial keeps every earlier target (with its override) in its forget set and reports each one's UA
(``ua_per_target``) and rebound. 'next' overrides are resolved against the whole chain (they skip every class
an earlier stage forgot), as `sfd forget --init-from` resolves them. After the last stage the *joint*
alternative -- every target forgotten at once, from the preset's start -- runs as one more sweep (OUT/joint/)
with the same trials per target and trial budget.

The MLflow store is one (OUT/mlflow.db): a parent run per chain (tag kind=chain) with each stage's sweep run
nested under it. OUT/trials.parquet holds every trial of every stage (columns ``stage``, ``mode``), and
OUT/chain.md / chain.parquet one row per stage and one for the joint sweep: the best trial's UA of every target
forgotten so far, the worst, the largest rebound, the remaining FD ratio and (text presets) held-out UA.
``--resume`` continues at the stage that stopped (a finished stage is kept, not rerun).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from orchestration.lifecycle import folder_record
from orchestration.targets import Target, parse_targets
from sfd.config import SFDConfig
from sfd.evaluate.forgetting import teacher_fingerprint
from sfd.io import atomic_path, read_json, write_json
from sfd.presets import get_preset
from sfd.rundir import aside_path
from sfd.tasks import get_task

RECORD = "sequential.json"
JOINT = "joint"
# flags whose value a resumed chain must share with the chain it continues
PLAN_KEYS = ("trials_per_target", "seed", "budget_kimg", "budget", "joint")


class ChainError(ValueError):
    """A chain that cannot work (printed as one line, exit 2)."""


@dataclass(frozen=True)
class Stage:
    index: int                       # 1..K in the chain's order; 0 for the joint sweep
    target: Target                   # what this stage forgets (overrides resolved against the chain)
    forgotten: tuple                 # every (target, override) pair forgotten once this stage ends

    @property
    def name(self) -> str:
        return JOINT if self.index == 0 else str(self.index)

    @property
    def folder(self) -> str:
        return JOINT if self.index == 0 else f"stage{self.index}-{self.target.slug}"


def _override_of(part: str, default_override: str) -> str:
    """The override a spec gives its classes: the text after '->', else the sweep's default."""
    return part.split("->", 1)[1].strip() if "->" in part else default_override


def _stage_spec(preset: str, pairs) -> str:
    return f"{preset}:{'+'.join(t for t, _ in pairs)}->{','.join(o for _, o in pairs)}"


def plan_chain(specs: list[str], default_override: str, joint: bool = True) -> list[Stage]:
    """The chain's stages in order (and the joint sweep last, index 0), every stage checked as `sfd forget
    --init-from` will check it: one preset that chains (classes or colordigits concepts), no target repeated,
    no override an earlier stage forgot, no earlier override forgotten, never every class. 'next' skips the
    chain's forgotten classes. Errors name the stage, the value and the fix."""
    parsed: list[tuple[Target, str]] = []
    for spec in specs:
        for part in spec.split():
            if part.startswith("all_"):
                raise ChainError(f"--sequential: target {part!r} forgets every class or concept in turn, each from "
                                 f"the start — a chain names its stages, e.g. --targets digits:3,5,8")
            try:
                made = parse_targets([part], default_override)
            except ValueError as e:
                raise ChainError(f"--sequential: {e}") from None
            override = _override_of(part, default_override)
            parsed += [(t, override) for t in made]
    if not parsed:
        raise ChainError("--sequential needs targets in the order to forget them, e.g. --targets digits:3,5,8")
    presets = sorted({t.preset for t, _ in parsed})
    if len(presets) > 1:
        raise ChainError(f"--sequential: the targets mix presets ({', '.join(presets)}); a chain forgets on one "
                         f"teacher — run one chain per preset")
    preset = get_preset(presets[0])
    task = get_task(preset)
    if len(parsed) < 2:
        raise ChainError(f"--sequential: one target ({parsed[0][0].name}) is no chain — give two or more in the "
                         f"order to forget them, or drop --sequential")
    stages, earlier, by = [], [], {}
    for k, (t, override) in enumerate(parsed, start=1):
        cfg = SFDConfig(preset=preset.name, **t.config_overrides())
        if override.strip().lower() == "next":
            cfg = cfg.replace(override="next")
        again = [str(c) for c in t.forget if str(c) in by]
        if again:
            c = again[0]
            raise ChainError(f"--sequential: stage {k} ({t.name}) forgets {c!r} again — stage {by[c]} forgot it "
                             f"already; each stage forgets something new: drop it from stage {k}")
        try:
            if earlier:
                cfg = cfg.replace(**task.chain_settings(earlier, cfg, f"stage {k - 1}"))
            cfg = cfg.validate(preset)
            pairs = task.chain_pairs(cfg)      # a kind of preset that does not chain (sd) says so here
        except ValueError as e:
            raise ChainError(f"--sequential: stage {k} ({t.name}): {e}") from None
        mine = pairs[len(earlier):]
        stage_target = parse_targets([_stage_spec(preset.name, mine)], default_override)[0]
        stages.append(Stage(k, stage_target, tuple(pairs)))
        by.update({c: k for c, _ in mine})
        earlier = pairs
    if joint:
        stages.append(Stage(0, parse_targets([_stage_spec(preset.name, earlier)], default_override)[0], tuple(earlier)))
    return stages


def describe(stages: list[Stage]) -> list[str]:
    lines = []
    for s in stages:
        done = ", ".join(f"{t}->{o}" for t, o in s.forgotten)
        if s.index:
            start = "the preset's start" if s.index == 1 else f"stage {s.index - 1}'s best trial"
            lines.append(f"  stage {s.index}: {s.target.name} (from {start}; forgotten after it: {done})")
        else:
            lines.append(f"  joint: {s.target.name} (all at once, from the preset's start)")
    return lines


# -- the chain's record (OUT/sequential.json) ---------------------------------------------------------------
def plan_key(a, stages: list[Stage]) -> dict:
    return {"targets": [s.target.name for s in stages if s.index], "joint": any(s.index == 0 for s in stages),
            **{k: getattr(a, k, None) for k in PLAN_KEYS if k != "joint"}}


def claim(a, stages: list[Stage]) -> dict:
    """The chain's record: new for an empty --out; the interrupted chain's with --resume (same plan); an --out
    holding anything else refused (--overwrite moves it aside, never deletes it)."""
    out = Path(a.out).resolve()
    key = plan_key(a, stages)
    fresh = {"kind": "sfd-sequential", "chain_id": uuid.uuid4().hex[:12], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             **key, "status": "new", "chain_run_id": None, "teacher_fingerprint": None,
             "stages": [{"stage": s.name, "target": s.target.name, "folder": s.folder, "status": "pending"}
                        for s in stages]}
    if out.exists() and not out.is_dir():
        raise ChainError(f"--out {out} is a file, not a folder — give a folder for the chain")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not held:
        return fresh
    if a.overwrite:
        aside = aside_path(out)
        os.replace(out, aside)
        print(f"[chain] --overwrite: {out} moved aside to {aside}", flush=True)
        return fresh
    try:
        rec = folder_record(out / RECORD, "sfd-sequential")
    except ValueError as e:
        raise ChainError(str(e)) from None
    if not a.resume:
        what = f"chain {rec['chain_id']} ({' -> '.join(rec['targets'])}, {rec.get('status')})" if rec else \
            f"other files ({', '.join(held[:5])})"
        raise ChainError(f"--out {out} already holds {what} — pass --resume to continue it, --overwrite to move it "
                         f"aside, or choose another --out")
    if rec is None:
        raise ChainError(f"--resume: {out} holds no {RECORD} (not a sequential sweep) — choose another --out, or "
                         f"--overwrite to move it aside")
    changed = [f"{k}: {rec.get(k)!r} in {out.name} vs {v!r} now" for k, v in key.items() if rec.get(k) != v]
    if changed:
        raise ChainError(f"--resume: the chain in {out} was planned differently ({'; '.join(changed)}) — resume it with "
                         f"its own --targets/--trials-per-target/--seed/--budget-kimg/--no-joint, or choose another --out")
    return rec


def _check_teacher(rec: dict, stages: list[Stage], teacher: str | None) -> None:
    """One teacher per chain: the weights' fingerprint is recorded at the start and checked on --resume."""
    preset = stages[0].target.preset
    space_teacher = teacher or SFDConfig(preset=preset).teacher
    mine = teacher_fingerprint(get_task(preset).load_teacher(space_teacher, "cpu"))
    theirs = rec.get("teacher_fingerprint")
    if theirs and theirs != mine:
        raise ChainError(f"--resume: the chain's earlier stages distilled another teacher (weights {theirs}, this "
                         f"--teacher {teacher!r}: {mine}) — every stage of a chain uses one teacher: give --teacher as "
                         f"the chain's first run did, or start a new chain in another --out")
    rec["teacher_fingerprint"] = mine


# -- a stage's best trial ----------------------------------------------------------------------------------
def pick(stage_out: Path, ua_threshold: float, joint: bool = False) -> tuple[dict | None, str]:
    """The stage's best trial as its sweep chose it (summary.parquet), else the finished trial with the
    highest UA (then the lowest FD ratio), with a note saying so; None when no trial finished."""
    import pandas as pd
    summary = pd.read_parquet(stage_out / "summary.parquet").to_dict("records")
    trials = pd.read_parquet(stage_out / "trials.parquet").to_dict("records")
    best_id = summary[0]["best_trial"] if summary else ""
    done = [r for r in trials if r["status"] in ("finished", "stopped") and (Path(r["run_dir"]) / "metrics.json").is_file()]
    for r in done:
        if r["trial_id"] == best_id:
            return r, ""
    ok = [r for r in done if math.isfinite(r["ua"])]
    if not ok:
        return None, "no trial finished"
    r = max(ok, key=lambda r: (r["ua"], -(r["fd_ratio"] if math.isfinite(r["fd_ratio"]) else math.inf)))
    return r, f"no trial reached UA >= {ua_threshold}: " + \
        (f"the highest UA ({r['ua']:.3f}) shown" if joint else f"continued from the highest UA ({r['ua']:.3f})")


FIGURES = ("ua", "ua_worst", "rebound_max", "fd_ratio", "override_fd_ratio", "remaining_accuracy", "ua_heldout",
           "ua_heldout_worst", "kimg", "train_seconds")


def figures(run_dir: Path) -> dict:
    """The chain's figures of one trial (its metrics.json): UA of every target forgotten so far, the worst,
    rebounds, remaining quality; held-out UA for text presets."""
    m = read_json(Path(run_dir) / "metrics.json")
    per = {str(k): float(v) for k, v in (m.get("ua_per_target") or {}).items()}
    held = {str(k): float(v) for k, v in (m.get("ua_heldout_per_target") or {}).items()}
    out = {k: m.get(k) for k in FIGURES if isinstance(m.get(k), (int, float))}
    out.update({"ua_per_target": per, "ua_heldout_per_target": held,
                "rebound_per_target": {str(k): float(v) for k, v in (m.get("rebound_per_target") or {}).items()}})
    if per:
        out["ua_worst"] = min(per.values())
    if held:
        out["ua_heldout_worst"] = min(held.values())
    return out


FRESH = ("ua_worst", "fd_ratio", "ua_heldout_worst")


def fresh(sr: dict, seed: int | None) -> dict:
    """The stage's best trial re-evaluated on fresh samples by its sweep (``--fresh-seed``; the search-time figures
    of the pick are flattered by the selection): worst UA, FD ratio, held-out worst; {} where there is none (a
    stage that continued from its highest-UA trial, --fresh-seed -1)."""
    path = Path(sr.get("best_run") or "") / f"evaluation_fresh_seed{seed}.json"
    if seed is None or seed < 0 or not sr.get("best_run") or not path.is_file():
        return {}
    m = read_json(path)
    out = {}
    for key, per in (("ua_worst", "ua_per_target"), ("ua_heldout_worst", "ua_heldout_per_target")):
        if isinstance(m.get(per), dict) and m[per]:
            out[key] = min(float(v) for v in m[per].values())
        elif isinstance(m.get(key.replace("_worst", "")), (int, float)):
            out[key] = float(m[key.replace("_worst", "")])
    if isinstance(m.get("fd_ratio"), (int, float)):
        out["fd_ratio"] = float(m["fd_ratio"])
    return out


# -- the tables ---------------------------------------------------------------------------------------------
def _fmt(v, nd=3) -> str:
    return "–" if not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v:.{nd}f}"


def _per(d: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in d.items()) or "–"


def write_tables(out: Path, rec: dict, stages: list[Stage], fresh_seed: int | None = None):
    """OUT/trials.parquet (every trial, its stage), OUT/chain.parquet and chain.md (a row per stage)."""
    import pandas as pd
    frames = []
    for s, sr in zip(stages, rec["stages"]):
        path = out / s.folder / "trials.parquet"
        if path.is_file():
            df = pd.read_parquet(path)
            df.insert(0, "stage", s.name)
            df.insert(1, "mode", "joint" if s.index == 0 else "sequential")
            df["stage_best"] = df["trial_id"] == sr.get("best_trial", "")
            frames.append(df)
    if frames:
        with atomic_path(out / "trials.parquet") as tmp:
            pd.concat(frames, ignore_index=True).to_parquet(tmp, index=False)
    rows = []
    for s, sr in zip(stages, rec["stages"]):
        f = sr.get("figures") or {}
        rows.append({"stage": s.name, "mode": "joint" if s.index == 0 else "sequential", "target": s.target.name,
                     "forgotten": ", ".join(f"{t}->{o}" for t, o in s.forgotten), "status": sr["status"],
                     "best_trial": sr.get("best_trial", ""), "note": sr.get("note", ""),
                     "ua_per_target": json.dumps(f.get("ua_per_target", {})),
                     "ua_heldout_per_target": json.dumps(f.get("ua_heldout_per_target", {})),
                     "rebound_per_target": json.dumps(f.get("rebound_per_target", {})),
                     **{k: float(f[k]) if isinstance(f.get(k), (int, float)) else math.nan for k in FIGURES},
                     **{f"{k}_fresh": fresh(sr, fresh_seed).get(k, math.nan) for k in FRESH},
                     "kimg_total": float(sr.get("kimg_total", math.nan))})
    table = pd.DataFrame(rows)
    with atomic_path(out / "chain.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    text = ["# Sequential sweep: " + " -> ".join(s.target.name for s in stages if s.index), "",
            "Each stage's best trial (the next stage starts from it); `joint`: every target at once, from the "
            "preset's start. UA per target covers every target forgotten so far; rebound: how far an earlier "
            "target's UA fell since its stage. *fresh*: the best trial re-evaluated on fresh samples (--fresh-seed).", "",
            "| stage | target | status | best trial | UA per target | UA worst (fresh) | held-out UA per target "
            "| held-out worst (fresh) | rebound max | FD ratio (fresh) | override FD ratio | remaining acc. "
            "| kimg (chain total) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s, sr, row in zip(stages, rec["stages"], rows):
        f = sr.get("figures") or {}

        def both(k, nd=3):
            return f"{_fmt(f.get(k), nd)} ({_fmt(row[f'{k}_fresh'], nd)})"
        text.append(f"| {s.name} | {s.target.name} | {sr['status']} | {sr.get('best_trial') or '–'} "
                    f"| {_per(f.get('ua_per_target', {}))} | {both('ua_worst')} "
                    f"| {_per(f.get('ua_heldout_per_target', {}))} | {both('ua_heldout_worst')} "
                    f"| {_fmt(f.get('rebound_max'))} | {both('fd_ratio', 2)} | {_fmt(f.get('override_fd_ratio'), 2)} "
                    f"| {_fmt(f.get('remaining_accuracy'))} | {_fmt(sr.get('kimg_total'), 0)} |")
    notes = [f"- stage {sr['stage']}: {sr['note']}" for sr in rec["stages"] if sr.get("note")]
    if notes:
        text += ["", *notes]
    with atomic_path(out / "chain.md") as tmp:
        tmp.write_text("\n".join(text) + "\n")
    return table


# -- the driver ---------------------------------------------------------------------------------------------
def stage_args(a, s: Stage, out: Path, mlflow_uri: str, parent_id: str) -> argparse.Namespace:
    """The flags of stage ``s``'s own sweep: the chain's, with its target, folder and MLflow parent."""
    folder = out / s.folder
    return argparse.Namespace(**{**vars(a), "targets": [s.target.name], "targets_file": None, "sequential": False,
                                 "out": str(folder), "resume": (folder / "sweep.json").is_file(), "overwrite": False,
                                 "mlflow_uri": mlflow_uri, "dry_run": False, "summarize_only": False,
                                 "storage": a.storage and f"{a.storage.rstrip('/')}/{s.folder}",
                                 "mlflow_run_name": f"{'' if s.index == 0 else 'stage'}{s.name} {s.target.name}",
                                 "mlflow_tags": {"mlflow.parentRunId": parent_id, "chain_stage": s.name,
                                                 "chain_mode": "joint" if s.index == 0 else "sequential"}})


def run_chain(a, stages: list[Stage], run_stage) -> int:
    """Every stage in order, then the joint sweep; ``run_stage(args, extra_overrides) -> exit code`` runs one
    stage's sweep (orchestration/sweep.py). Returns the chain's exit code (a stage's, when one stops it)."""
    from orchestration.tracking import MLflowStore

    out = Path(a.out).resolve()
    rec = claim(a, stages)
    out.mkdir(parents=True, exist_ok=True)
    _check_teacher(rec, stages, getattr(a, "teacher", None))
    mlflow_uri = a.mlflow_uri or f"sqlite:///{out / 'mlflow.db'}"
    store = MLflowStore(mlflow_uri, a.experiment, None if a.mlflow_uri else (out / "mlartifacts").as_uri())
    chain_id = rec.get("chain_run_id")
    if not (chain_id and store.reopen(chain_id)):
        run = store.client.create_run(store.experiment_id, run_name=f"chain-{time.strftime('%Y%m%d-%H%M%S')}", tags={
            "kind": "chain", "preset": stages[0].target.preset, "chain_id": rec["chain_id"], "status": "running"})
        chain_id = rec["chain_run_id"] = run.info.run_id
        store.log_params(chain_id, {"targets": " -> ".join(rec["targets"]), "joint": rec["joint"],
                                    "trials_per_stage": a.trials_per_target, "seed": a.seed})
    rec["status"] = "running"
    write_json(out / RECORD, rec)
    status, code, prev = "finished", 0, None
    try:
        for s, sr in zip(stages, rec["stages"]):
            if s.index and s.index > 1 and prev is None:
                prev = rec["stages"][s.index - 2].get("best_run")
            if sr["status"] == "finished":
                prev = sr["best_run"] if s.index else prev
                print(f"[chain] stage {s.name} ({s.target.name}): finished earlier, best trial {sr['best_trial']}",
                      flush=True)
                continue
            extra = {"init_from": prev} if s.index > 1 else {}
            print(f"[chain] stage {s.name}: {s.target.name}" + (f", from {prev}" if extra else ""), flush=True)
            rc = run_stage(stage_args(a, s, out, mlflow_uri, chain_id), extra)
            folder = out / s.folder
            if rc >= 128 or not (folder / "summary.parquet").is_file():
                sr["status"], status, code = "interrupted" if rc >= 128 else "failed", \
                    "interrupted" if rc >= 128 else "failed", rc or 1
                break
            best, note = pick(folder, a.ua_threshold, joint=s.index == 0)
            if best is None:
                sr.update(status="failed", note=note)
                status, code = "failed", 1
                print(f"[chain] stage {s.name} ({s.target.name}): {note} — the chain stops here", flush=True)
                break
            before = rec["stages"][s.index - 2].get("kimg_total", 0.0) if s.index > 1 else 0.0
            f = figures(best["run_dir"])
            sr.update(status="finished", best_trial=best["trial_id"], best_run=str(best["run_dir"]), note=note,
                      figures=f, kimg_total=before + float(f.get("kimg", best.get("kimg", 0.0)) or 0.0))
            if s.index:
                prev = sr["best_run"]
            write_json(out / RECORD, rec)
            print(f"[chain] stage {s.name} ({s.target.name}): best trial {best['trial_id']}, UA per target "
                  f"{_per(f['ua_per_target'])}, FD ratio {_fmt(f.get('fd_ratio'), 2)}", flush=True)
    except KeyboardInterrupt:          # a signal between two stages' sweeps (each handles its own)
        status, code = "interrupted", 130
    finally:
        rec["status"] = status
        write_json(out / RECORD, rec)
        table = write_tables(out, rec, stages, getattr(a, "fresh_seed", None))
        _log_chain(store, chain_id, table, out)
        store.finish(chain_id, status)
    print((out / "chain.md").read_text())
    if status == "interrupted":
        print(f"[chain] interrupted: continue with the same command and --resume (stage "
              f"{next((sr['stage'] for sr in rec['stages'] if sr['status'] != 'finished'), '?')} goes on)", flush=True)
    print(f"[chain] outputs in {out}: chain.md/.parquet, trials.parquet (column 'stage'), one sweep folder per "
          f"stage; MLflow: {mlflow_uri}", flush=True)
    return code


def _log_chain(store, run_id: str, table, out: Path) -> None:
    """The chain's run: every stage's figures (prefixed stage<k>_ / joint_) and the tables as artifacts."""
    metrics = {}
    for r in table.to_dict("records"):
        pre = "joint" if r["stage"] == JOINT else f"stage{r['stage']}"
        for k in (*FIGURES, *(f"{k}_fresh" for k in FRESH)):
            metrics[f"{pre}_{k}"] = r[k]
        for t, v in json.loads(r["ua_per_target"]).items():
            metrics[f"{pre}_ua_{t}"] = v
        for t, v in json.loads(r["ua_heldout_per_target"]).items():
            metrics[f"{pre}_ua_heldout_{t}"] = v
    seq = [r for r in table.to_dict("records") if r["stage"] != JOINT and r["status"] == "finished"]
    if seq:
        last = seq[-1]
        metrics.update({f"final_{k}": last[k] for k in ("ua_worst", "fd_ratio", "ua_heldout_worst", "rebound_max",
                                                        "ua_worst_fresh", "fd_ratio_fresh")})
    store.log_metrics(run_id, {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)})
    store.log_artifacts(run_id, [out / "chain.md", out / "chain.parquet", out / "trials.parquet", out / RECORD])
    if (out / "chain.md").is_file():
        store.client.set_tag(run_id, "mlflow.note.content", (out / "chain.md").read_text()[:8000])
