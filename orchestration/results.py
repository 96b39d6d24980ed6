"""Sweep outputs: the trial table, Pareto fronts, the best trial per target, exports.

Best-trial rule (documented in the README): among a target's finished trials with
UA >= --ua-threshold, prefer those whose overridden outputs stay diverse
(override_fd_ratio <= --max-override-fd-ratio); among those, the lowest FD over the remaining
classes wins. A target with no trial reaching the UA threshold has no best trial.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pandas as pd

from sfd.evaluate.plots import plot_pareto
from sfd.io import atomic_path, read_json, write_json
from sfd.runs import evaluate_run

from .search import METRICS, MODES

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# a line naming an exception, e.g. "ValueError: bad value" or "sfd.io.CheckpointError: ..."
EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Died|Failure)\w*)(: ?(.*))?$")
TRIAL_DIR = re.compile(r"^\w+?_([0-9a-f]{5,}(?:_\d{5})?)_\d+_")
# statuses a trial row can have; only the first two count as results
DONE = ("finished", "stopped")
STATUSES = (*DONE, "failed", "cut_off", "not_started")


def _unwrap(err):
    """The innermost exception of Ray's wrappers: RayTaskError's ``cause``, Ray Train's
    ``worker_failures`` / ``controller_failure``, Tune's ``TuneError`` chaining."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        failures = getattr(err, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            err = failures[sorted(failures)[0]]
            continue
        for attr in ("controller_failure", "cause"):
            inner = getattr(err, attr, None)
            if isinstance(inner, BaseException) and inner is not err:
                err = inner
                break
        else:
            inner = err.__cause__
            if isinstance(inner, BaseException):
                err = inner
                continue
            return err
    return err


def root_cause(err, max_lines: int = 3) -> str:
    """The real cause of a trial's failure in a few plain lines (``Type: message``), not Ray's
    ``ray::ImplicitFunc.train()`` banner: the exception chain is unwrapped and, where only a
    traceback text is left (Ray's error.txt, or a wrapper's message), the last exception line of
    the innermost traceback is taken. ANSI colour codes are removed."""
    if err is None:
        return ""
    if isinstance(err, BaseException):
        inner = _unwrap(err)
        text = ANSI.sub("", str(inner))
        name = type(inner).__name__
        if "Traceback (most recent call last)" not in text and not text.startswith("ray::"):
            lines = [ln for ln in text.strip().splitlines() if ln.strip()][:max_lines]
            return "\n".join([f"{name}: {lines[0]}" if lines else name, *lines[1:]])[:1000]
    else:
        text = ANSI.sub("", str(err))
    lines = text.strip().splitlines()
    # the innermost traceback is the last one printed; its exception line closes it
    for i in range(len(lines) - 1, -1, -1):
        ln = lines[i].strip()
        m = EXC_LINE.match(ln)
        if m and not ln.startswith(("ray::", "ray.exceptions.RayTaskError", "ray.train.", "ray.tune.")) \
                and not m.group(1).split(".")[-1] in ("RayTaskError", "TrainingFailedError", "WorkerGroupError",
                                                       "TuneError", "ControllerError"):
            tail = [x.strip() for x in lines[i + 1:i + max_lines] if x.strip() and not x.startswith(" ")]
            name = m.group(1).split(".")[-1]          # sfd.io.CheckpointError -> CheckpointError
            return "\n".join([name + ln[len(m.group(1)):], *tail])[:1000]
    kept = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith(("ray::", "Traceback", "File "))]
    return "\n".join(kept[:max_lines])[:1000]


def _stored_config(result, owners: dict | None = None, targets: dict | None = None) -> dict:
    """The trial's config from its folder's params.json: a Tune experiment restored with
    ``resume_errored=False`` hands back its failed trials without their config. A trial that failed
    before Tune wrote that file (its process killed as it started) is still a trial of a target: its
    target comes from ``owners`` (Tune trial id -> target, as the Optuna studies record it)."""
    if not result.path:
        return {}
    named = TRIAL_DIR.match(Path(result.path).name)
    owner = (owners or {}).get(named.group(1)) if named else None
    if owner in (targets or {}) and not _has_params(result):
        return {"target": owner, "target_slug": targets[owner].slug, "params": {},
                "baseline": "baseline=True" in Path(result.path).name}
    import pyarrow.fs as pafs
    fs = getattr(result, "filesystem", None) or pafs.LocalFileSystem()
    try:
        with fs.open_input_stream(result.path.rstrip("/") + "/params.json") as f:
            cfg = json.loads(f.read())
    except (OSError, ValueError) as e:
        print(f"[sweep] note: trial folder {result.path} has no readable params.json ({type(e).__name__}: {e}); "
              f"its row is left out of trials.parquet", flush=True)
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _has_params(result) -> bool:
    import pyarrow.fs as pafs
    fs = getattr(result, "filesystem", None) or pafs.LocalFileSystem()
    return fs.get_file_info(result.path.rstrip("/") + "/params.json").type != pafs.FileType.NotFound


def trial_rows(result_grid, targets: dict, out_dir: Path, outcome: dict, errors: dict | None = None,
               notes: dict | None = None, owners: dict | None = None) -> list[dict]:
    """One row per Tune trial with what happened to it: ``outcome`` (trial id -> finished / stopped /
    failed, from the tracking callback) is the record; a trial with results but no outcome was cut
    off by the sweep's interruption, one without any result never started."""
    errors, notes = errors or {}, notes or {}
    rows = []
    for r in result_grid:
        cfg = r.config or _stored_config(r, owners, targets)
        if "target" not in cfg:
            continue
        m = dict(r.metrics or {})
        # a trial that never reported has no metrics: its id is in Tune's folder name
        # (run_trial_<id>_<n>_<params>_<date>)
        named = TRIAL_DIR.match(Path(r.path).name) if r.path else None
        trial_id = m.get("trial_id") or (named.group(1) if named else Path(str(r.path)).name)
        run_dir = Path(out_dir) / "trials" / cfg["target_slug"] / trial_id
        final = {}
        status = outcome.get(trial_id)
        if status is None:
            status = "failed" if r.error else ("cut_off" if m or run_dir.is_dir() else "not_started")
        if status in DONE and (run_dir / "metrics.json").is_file():
            final = json.loads((run_dir / "metrics.json").read_text())
        error = errors.get(trial_id) or (root_cause(r.error) if r.error else "")
        row = {"target": cfg["target"], "trial_id": trial_id, "baseline": bool(cfg["baseline"]), "status": status,
               "error": error if status == "failed" else "", "note": notes.get(trial_id, "")}
        for k, v in cfg["params"].items():
            row[f"param_{k}"] = v
        for k in ("ua", "fd_remaining", "fd_remaining_teacher", "fd_ratio", "fd_forget_vs_override",
                  "fd_override_teacher", "override_fd_ratio", "override_rate", "remaining_accuracy",
                  "remaining_accuracy_teacher", "kimg", "train_seconds", "wall_seconds",
                  "images_per_second_generator", "images_per_second_teacher",
                  # text-to-image (concept) targets; NaN for class targets
                  "ua_heldout", "override_rate_heldout", "leakage_accuracy", "leakage_accuracy_teacher"):
            v = final.get(k, m.get(k))
            row[k] = float(v) if isinstance(v, (int, float)) and v is not None else math.nan
        # the trial's whole wall time (Ray Train start, loading, evaluation, training): what it costs
        row["trial_seconds"] = float(m.get("time_total_s", math.nan))
        row["overhead_seconds"] = row["trial_seconds"] - row["train_seconds"]
        row["run_dir"] = str(run_dir)
        rows.append(row)
    return rows


def target_state(rows: list[dict]) -> str:
    """What happened to a target as a whole: not_started (no trial ran), failed (every trial failed),
    interrupted (some cut off), done."""
    if not rows or all(r["status"] == "not_started" for r in rows):
        return "not_started"
    if any(r["status"] in ("cut_off", "not_started") for r in rows):
        return "interrupted"
    if all(r["status"] == "failed" for r in rows):
        return "failed"
    return "done"


def pareto_front(rows: list[dict]) -> set[str]:
    """Trials no other trial of the same target beats on every objective (UA, FD ratio, override FD)."""
    ok = [r for r in rows if r["status"] in DONE and all(math.isfinite(r[k]) for k in METRICS)]
    sign = {k: (1 if m == "max" else -1) for k, m in zip(METRICS, MODES)}
    front = set()
    for a in ok:
        dominated = any(
            all(sign[k] * b[k] >= sign[k] * a[k] for k in METRICS) and any(sign[k] * b[k] > sign[k] * a[k] for k in METRICS)
            for b in ok if b is not a)
        if not dominated:
            front.add(a["trial_id"])
    return front


def choose_best(rows: list[dict], ua_threshold: float, max_override_fd_ratio: float) -> dict | None:
    eligible = [r for r in rows if r["status"] in DONE and r["ua"] >= ua_threshold
                and math.isfinite(r["fd_remaining"])]
    diverse = [r for r in eligible if r["override_fd_ratio"] <= max_override_fd_ratio]
    pool = diverse or eligible
    return min(pool, key=lambda r: r["fd_remaining"]) if pool else None


def write_table(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


FRESH_KEYS = ("ua", "fd_ratio", "override_fd_ratio", "remaining_accuracy", "fd_remaining")


def fresh_metrics(row: dict | None, seed: int) -> dict:
    """The trial's generator re-evaluated on fresh noise (``seed``), cached in its run folder."""
    if row is None or not (Path(row["run_dir"]) / "generator.safetensors").is_file():
        return {}
    cache = Path(row["run_dir"]) / f"evaluation_fresh_seed{seed}.json"
    if cache.is_file():
        return read_json(cache)
    m = evaluate_run(row["run_dir"], seed=seed)
    write_json(cache, m)
    return m


def summarise(rows: list[dict], targets, out_dir: Path, ua_threshold: float, max_override_fd_ratio: float,
              tracker=None, fresh_seed: int | None = None) -> pd.DataFrame:
    """Per-target summary (Markdown + Parquet), Pareto plots, best-generator exports, table.

    With ``fresh_seed``, the best and the baseline trial of each target are re-evaluated on
    fresh samples: picking the minimum of noisy measurements flatters it, the fresh figure
    does not (columns ``*_fresh``)."""

    out_dir = Path(out_dir)
    summary = []
    for t in targets:
        tr = [r for r in rows if r["target"] == t.name]
        front = pareto_front(tr)
        best = choose_best(tr, ua_threshold, max_override_fd_ratio)
        base = next((r for r in tr if r["baseline"]), None)
        for r in tr:
            r["pareto"] = r["trial_id"] in front
            r["best"] = best is not None and r["trial_id"] == best["trial_id"]
        pts = [{**r, "trial_id": r["trial_id"]} for r in tr if math.isfinite(r["fd_ratio"]) and math.isfinite(r["ua"])]
        png = out_dir / "pareto" / f"{t.slug}.png"
        if pts:
            png.parent.mkdir(parents=True, exist_ok=True)
            plot_pareto(pts, png, title=f"{t.name}: {len(tr)} trials", front_ids=front,
                        best_id=best["trial_id"] if best else None, ua_threshold=ua_threshold)
        export = ""
        if best is not None and (Path(best["run_dir"]) / "generator.safetensors").is_file():
            dst = out_dir / "best" / t.slug
            dst.mkdir(parents=True, exist_ok=True)
            for f in ("generator.safetensors", "metrics.json", "samples_generator.png", "curves.png"):
                if (Path(best["run_dir"]) / f).is_file():
                    shutil.copy2(Path(best["run_dir"]) / f, dst / f)
            export = str(dst / "generator.safetensors")
        row = {"target": t.name, "trials": len(tr), "finished": sum(r["status"] in DONE for r in tr),
               "failed": sum(r["status"] == "failed" for r in tr),
               "cut_off": sum(r["status"] in ("cut_off", "not_started") for r in tr),
               "state": target_state(tr),
               "best_trial": best["trial_id"] if best else "", "best_is_baseline": bool(best and best["baseline"]),
               "ua": best["ua"] if best else math.nan,
               "ua_heldout": best.get("ua_heldout", math.nan) if best else math.nan,
               "fd_remaining": best["fd_remaining"] if best else math.nan,
               "fd_remaining_teacher": best["fd_remaining_teacher"] if best else math.nan,
               "fd_ratio": best["fd_ratio"] if best else math.nan,
               "override_fd_ratio": best["override_fd_ratio"] if best else math.nan,
               "remaining_accuracy": best["remaining_accuracy"] if best else math.nan,
               "train_seconds": best["train_seconds"] if best else math.nan,
               "baseline_ua": base["ua"] if base else math.nan,
               "baseline_fd_remaining": base["fd_remaining"] if base else math.nan,
               "baseline_fd_ratio": base["fd_ratio"] if base else math.nan,
               "pareto_size": len(front), "generator": export,
               "best_config": json.dumps({k[6:]: v for k, v in best.items() if k.startswith("param_")}) if best else ""}
        if fresh_seed is not None:
            fb, fbase = fresh_metrics(best, fresh_seed), fresh_metrics(base, fresh_seed)
            for k in FRESH_KEYS:
                row[f"{k}_fresh"] = float(fb[k]) if k in fb else math.nan
                row[f"baseline_{k}_fresh"] = float(fbase[k]) if k in fbase else math.nan
            # the search helped when its pick beats the baseline on fresh samples, at the UA threshold
            row["search_improved"] = bool(best is not None and not best["baseline"] and fb and fbase
                                          and fb["ua"] >= ua_threshold
                                          and (fbase["ua"] < ua_threshold or fb["fd_ratio"] < fbase["fd_ratio"]))
        summary.append(row)
        if tracker is not None and t.name in tracker.target_runs:
            run_id = tracker.target_runs[t.name]
            tracker.log_metrics(run_id, {k: v for k, v in row.items() if k in (
                "ua", "fd_remaining", "fd_remaining_teacher", "fd_ratio", "override_fd_ratio", "baseline_fd_remaining")
                or k.endswith("_fresh")})
            tracker.client.set_tag(run_id, "best_trial", row["best_trial"])
            tracker.log_artifacts(run_id, [png] + ([export] if export else []))
            state = row["state"]
            tracker.finish(run_id, "interrupted" if state in ("interrupted", "not_started")
                           else "failed" if state == "failed" else "finished" if best else "no_trial_at_ua_threshold")
    df_trials = pd.DataFrame(rows)
    write_table(df_trials, out_dir / "trials.parquet")
    df = pd.DataFrame(summary)
    write_table(df, out_dir / "summary.parquet")
    with atomic_path(out_dir / "summary.md") as tmp:
        tmp.write_text(summary_markdown(df, ua_threshold, max_override_fd_ratio, fresh_seed))
    write_json(out_dir / "summary.json", summary)
    return df


def summary_markdown(df: pd.DataFrame, ua_threshold: float, max_override_fd_ratio: float,
                     fresh_seed: int | None = None) -> str:
    fresh = fresh_seed is not None and "fd_ratio_fresh" in df
    lines = [
        "# SFD sweep summary", "",
        f"Best trial per target: lowest FD over the remaining classes among trials with UA >= {ua_threshold} "
        f"(preferring override FD ratio <= {max_override_fd_ratio}). FD ratio = FD / teacher's FD at equal sample "
        f"count (18-step Heun).", "",
    ]
    if fresh:
        n = int(df["search_improved"].sum())
        med = lambda c: float(df[c].median())   # noqa: E731
        lines += [
            f"Re-evaluated on fresh samples (seed {fresh_seed}): the best and the baseline trial of every target, "
            f"since the minimum of noisy search-time figures flatters the winner. The search beat its baseline "
            f"(UA >= {ua_threshold} and a lower fresh FD ratio) on **{n}/{len(df)}** targets; median fresh FD "
            f"ratio {med('baseline_fd_ratio_fresh'):.2f} (baseline) -> {med('fd_ratio_fresh'):.2f} (best).", ""]
    head = ("| target | trials | best | UA | UA held-out | FD | teacher FD | FD ratio | override FD ratio | "
            "remaining acc | baseline FD | train s |")
    sep = "|---|---|---|---|---|---|---|---|---|---|---|---|"
    if fresh:
        head += " UA fresh | FD ratio fresh | override FD ratio fresh | baseline FD ratio fresh |"
        sep += "---|---|---|---|"
    lines += [head + " config |", sep + "---|"]
    for _, r in df.iterrows():
        best = r["best_trial"] + (" (baseline)" if r["best_is_baseline"] else "") if r["best_trial"] else "none"
        uah = r.get("ua_heldout", math.nan)
        line = (f"| {r['target']} | {r['trials']} | {best} | {r['ua']:.4f} | "
                f"{'-' if uah != uah else f'{uah:.4f}'} | {r['fd_remaining']:.4f} | "
                f"{r['fd_remaining_teacher']:.4f} | {r['fd_ratio']:.2f} | {r['override_fd_ratio']:.2f} | "
                f"{r['remaining_accuracy']:.4f} | {r['baseline_fd_remaining']:.4f} | {r['train_seconds']:.0f} |")
        if fresh:
            line += (f" {r['ua_fresh']:.4f} | {r['fd_ratio_fresh']:.2f} | {r['override_fd_ratio_fresh']:.2f} | "
                     f"{r['baseline_fd_ratio_fresh']:.2f} |")
        lines.append(line + f" `{r['best_config']}` |")
    return "\n".join(lines) + "\n"
