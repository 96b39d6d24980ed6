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

from sfd.evaluate.plots import plot_methods, plot_pareto
from sfd.io import atomic_path, read_json, write_json
from sfd.methods.finetune import MODEL_FILE
from sfd.robustness import ATTACK_KEYS
from sfd.runs import evaluate_run

from .costs import COSTS
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
        t = targets.get(cfg["target"])
        # the target itself and its method in two columns (a trial from before --methods: SFD's)
        row = {"target": t.target_name if t is not None else cfg["target"], "method": cfg.get("method", "sfd"),
               "trial_id": trial_id, "baseline": bool(cfg["baseline"]),
               # a warm start: the target and Optuna trial its configuration came from (orchestration/search.py)
               "warm_start_from": str(cfg.get("warm_start_from", "") or ""), "status": status,
               "error": error if status == "failed" else "", "note": notes.get(trial_id, "")}
        for k, v in cfg["params"].items():
            row[f"param_{k}"] = v
        for k in ("ua", "fd_remaining", "fd_remaining_teacher", "fd_ratio", "fd_forget_vs_override",
                  "fd_override_teacher", "override_fd_ratio", "override_rate", "remaining_accuracy",
                  "remaining_accuracy_teacher", "kimg", "selected_kimg", "train_seconds", "wall_seconds",
                  "images_per_second_generator", "images_per_second_teacher", "nfe", "setup_seconds",
                  # text-to-image (concept) targets; NaN for class targets
                  "ua_heldout", "override_rate_heldout", "leakage_accuracy", "leakage_accuracy_teacher"):
            v = final.get(k, m.get(k))
            row[k] = float(v) if isinstance(v, (int, float)) and v is not None else math.nan
        attack = final.get("attack") or {}                       # sfd.robustness figures (the attack setting)
        for k in ATTACK_KEYS:
            v = attack.get(k, m.get(k))
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


def within_asr(row: dict, max_asr: float | None) -> bool:
    """The trial meets --max-asr (its worst attack's success rate); a trial without the figure does not."""
    v = row.get("asr_max", math.nan)
    return max_asr is None or (isinstance(v, (int, float)) and math.isfinite(v) and v <= max_asr)


def choose_best(rows: list[dict], ua_threshold: float, max_override_fd_ratio: float,
                max_asr: float | None = None) -> dict | None:
    """Lowest remaining FD at the UA threshold, preferring trials within --max-asr, then within the override
    FD limit; a target with no trial within --max-asr still gets its best (column meets_max_asr says so).
    A trial stopped early was measured at a lower fidelity (its last rung) and exported no generator: it is
    the best only where no finished trial qualifies."""
    eligible = [r for r in rows if r["status"] in DONE and r["ua"] >= ua_threshold
                and math.isfinite(r["fd_remaining"])]
    eligible = [r for r in eligible if r["status"] == "finished"] or eligible
    eligible = [r for r in eligible if within_asr(r, max_asr)] or eligible
    diverse = [r for r in eligible if r["override_fd_ratio"] <= max_override_fd_ratio]
    pool = diverse or eligible
    return min(pool, key=lambda r: r["fd_remaining"]) if pool else None


def write_table(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


FRESH_KEYS = ("ua", "fd_ratio", "override_fd_ratio", "remaining_accuracy", "fd_remaining")


def model_file(run_dir) -> Path | None:
    """What a finished trial exports: SFD's one-step generator, or a baseline's fine-tuned denoiser."""
    for name in ("generator.safetensors", MODEL_FILE):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    return None


def fresh_metrics(row: dict | None, seed: int) -> dict:
    """The trial's generator (a baseline: its model with the teacher's sampler) re-evaluated on fresh noise
    (``seed``), cached in its run folder."""
    if row is None or model_file(row["run_dir"]) is None:
        return {}
    cache = Path(row["run_dir"]) / f"evaluation_fresh_seed{seed}.json"
    if cache.is_file():
        return read_json(cache)
    m = evaluate_run(row["run_dir"], seed=seed)
    write_json(cache, m)
    return m


def summarise(rows: list[dict], targets, out_dir: Path, ua_threshold: float, max_override_fd_ratio: float,
              tracker=None, fresh_seed: int | None = None, max_asr: float | None = None) -> pd.DataFrame:
    """Per-target summary (Markdown + Parquet), Pareto plots, best-generator exports, table.

    With ``fresh_seed``, the best and the baseline trial of each target are re-evaluated on
    fresh samples: picking the minimum of noisy measurements flatters it, the fresh figure
    does not (columns ``*_fresh``)."""

    out_dir = Path(out_dir)
    summary = []
    # each target's trials in one pass (filtering all rows per target grew with targets x trials)
    by_unit: dict[tuple, list] = {}
    for r in rows:
        by_unit.setdefault((r["target"], r.get("method") or "sfd"), []).append(r)
    for t in targets:
        tr = by_unit.get((t.target_name, t.method), [])
        front = pareto_front(tr)
        best = choose_best(tr, ua_threshold, max_override_fd_ratio, max_asr)
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
        made = model_file(best["run_dir"]) if best is not None else None
        if made is not None:
            dst = out_dir / "best" / t.slug
            dst.mkdir(parents=True, exist_ok=True)
            for f in (made.name, "metrics.json", "samples_generator.png", "curves.png"):
                if (Path(best["run_dir"]) / f).is_file():
                    shutil.copy2(Path(best["run_dir"]) / f, dst / f)
            export = str(dst / made.name)
        early = [r for r in tr if r["status"] == "stopped" and str(r.get("note", "")).startswith("early stop")]
        row = {"target": t.target_name, "method": t.method, "trials": len(tr), "finished": sum(r["status"] in DONE for r in tr),
               # configurations started, and how many the per-target early stopping stopped (orchestration/pruning.py)
               "started": sum(r["status"] not in ("not_started",) for r in tr), "stopped_early": len(early),
               "warm_starts": sum(bool(r.get("warm_start_from")) for r in tr),
               "best_warm_start_from": str(best.get("warm_start_from", "") or "") if best else "",
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
               "nfe": best.get("nfe", math.nan) if best else math.nan,
               "images_per_second": best.get("images_per_second_generator", math.nan) if best else math.nan,
               "baseline_ua": base["ua"] if base else math.nan,
               "baseline_fd_remaining": base["fd_remaining"] if base else math.nan,
               "baseline_fd_ratio": base["fd_ratio"] if base else math.nan,
               **{k: best.get(k, math.nan) if best else math.nan for k in ATTACK_KEYS},
               "meets_max_asr": bool(best is not None and max_asr is not None and within_asr(best, max_asr)),
               "pareto_size": len(front), "generator": export,
               "best_config": json.dumps({k[6:]: v for k, v in best.items() if k.startswith("param_")}) if best else ""}
        if fresh_seed is not None:
            with COSTS.phase("fresh_on_driver"):         # evaluations here, or (the sweep) cached by Ray tasks
                fb, fbase = fresh_metrics(best, fresh_seed), fresh_metrics(base, fresh_seed)
            for k in FRESH_KEYS:
                row[f"{k}_fresh"] = float(fb[k]) if k in fb else math.nan
                row[f"baseline_{k}_fresh"] = float(fbase[k]) if k in fbase else math.nan
            # the search helped when its pick beats the baseline on fresh samples, at the UA threshold
            row["search_improved"] = bool(best is not None and not best["baseline"] and fb and fbase
                                          and fb["ua"] >= ua_threshold
                                          and (fbase["ua"] < ua_threshold or fb["fd_ratio"] < fbase["fd_ratio"]))
            # by how much (fresh remaining FD ratio, baseline minus pick: > 0 when the pick is better)
            row["search_margin_fresh"] = (float(fbase["fd_ratio"]) - float(fb["fd_ratio"])
                                          if fb and fbase and "fd_ratio" in fb and "fd_ratio" in fbase else math.nan)
        summary.append(row)
        if tracker is not None and t.name in tracker.target_runs:
            run_id = tracker.target_runs[t.name]
            tracker.log_metrics(run_id, {k: v for k, v in row.items() if k in (
                "ua", "fd_remaining", "fd_remaining_teacher", "fd_ratio", "override_fd_ratio", "baseline_fd_remaining")
                or k.endswith("_fresh") or (k in ATTACK_KEYS and math.isfinite(v))})
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
        tmp.write_text(summary_markdown(df, ua_threshold, max_override_fd_ratio, fresh_seed, max_asr))
    write_json(out_dir / "summary.json", summary)
    if df_trials.get("method") is not None and set(df_trials["method"]) != {"sfd"}:
        method_table(rows, df, out_dir, ua_threshold)
    return df


def summary_markdown(df: pd.DataFrame, ua_threshold: float, max_override_fd_ratio: float,
                     fresh_seed: int | None = None, max_asr: float | None = None) -> str:
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
            f"ratio {med('baseline_fd_ratio_fresh'):.2f} (baseline) -> {med('fd_ratio_fresh'):.2f} (best)."
            + (" Margins (fresh FD ratio, baseline -> best): " + "; ".join(
                f"{r['target']} {r['baseline_fd_ratio_fresh']:.2f} -> {r['fd_ratio_fresh']:.2f}"
                for _, r in df[df["search_improved"]].iterrows()) + "." if n else ""), ""]
    if "started" in df and len(df):
        lines += [f"Configurations started per target: {int(df['started'].min())}–{int(df['started'].max())} "
                  f"(stopped early, per target: {int(df['stopped_early'].sum())} in all); warm starts: "
                  f"{int(df['warm_starts'].sum())}" + (", best trials that came from one: " + "; ".join(
                      f"{r['target']} from {r['best_warm_start_from']}" for _, r in df.iterrows()
                      if r["best_warm_start_from"]) if (df["best_warm_start_from"] != "").any() else "") + ".", ""]
    attacked = "asr_max" in df and bool(df["asr_max"].notna().any())
    if attacked:
        worst = df.loc[df["asr_max"].idxmax()] if df["asr_max"].notna().any() else None
        lines += [f"Robustness (docs/robustness.md), the best trial's generator: ASR (worst attack) median "
                  f"{float(df['asr_max'].median()):.3f}, worst {float(worst['asr_max']):.3f} ({worst['target']}); "
                  f"worst-cell side effect worst {float(df['side_effect_worst_cell'].max()):.3f}"
                  + (f"; override leakage (worst cell above the teacher's share) worst "
                     f"{float(df['leakage_worst_cell'].max()):.3f}" if "leakage_worst_cell" in df
                     and df["leakage_worst_cell"].notna().any() else "")
                  + (f"; **{int(df['meets_max_asr'].sum())}/{len(df)}** targets meet --max-asr {max_asr}"
                     if max_asr is not None else "") + ".", ""]
    # several methods: the method beside the target (an SFD-only sweep's table is as before)
    methods = "method" in df and set(df["method"]) != {"sfd"}
    head = ("| target |" + (" method |" if methods else "") + " trials | best | UA | UA held-out | FD | teacher FD | "
            "FD ratio | override FD ratio | remaining acc | baseline FD | train s |")
    sep = "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if methods else "")
    if fresh:
        head += " UA fresh | FD ratio fresh | override FD ratio fresh | baseline FD ratio fresh |"
        sep += "---|---|---|---|"
    if attacked:
        head += " ASR max | residue worst family | side effect worst cell | leakage worst cell |"
        sep += "---|---|---|---|"
    lines += [head + " config |", sep + "---|"]
    for _, r in df.iterrows():
        best = r["best_trial"] + (" (baseline)" if r["best_is_baseline"] else "") if r["best_trial"] else "none"
        if r.get("best_warm_start_from"):
            best += f" (warm start from {r['best_warm_start_from']})"
        uah = r.get("ua_heldout", math.nan)
        line = (f"| {r['target']} |" + (f" {r['method']} |" if methods else "") + f" {r['trials']} | {best} |"
                f" {r['ua']:.4f} | "
                f"{'-' if uah != uah else f'{uah:.4f}'} | {r['fd_remaining']:.4f} | "
                f"{r['fd_remaining_teacher']:.4f} | {r['fd_ratio']:.2f} | {r['override_fd_ratio']:.2f} | "
                f"{r['remaining_accuracy']:.4f} | {r['baseline_fd_remaining']:.4f} | {r['train_seconds']:.0f} |")
        if fresh:
            line += (f" {r['ua_fresh']:.4f} | {r['fd_ratio_fresh']:.2f} | {r['override_fd_ratio_fresh']:.2f} | "
                     f"{r['baseline_fd_ratio_fresh']:.2f} |")
        if attacked:
            figures = [r.get(k, math.nan) for k in ("asr_max", "residue_worst_family", "side_effect_worst_cell",
                                                    "leakage_worst_cell")]
            line += " " + " | ".join("-" if v != v else f"{v:.3f}" for v in figures) + " |"
        lines.append(line + f" `{r['best_config']}` |")
    return "\n".join(lines) + "\n"


# the per-method table: each figure's median over targets and its worst (the direction that hurts)
METHOD_FIGURES = (("ua", "min", "UA"), ("fd_ratio", "max", "FD ratio"), ("override_fd_ratio", "max", "override FD ratio"),
                  ("remaining_accuracy", "min", "remaining acc."), ("nfe", "max", "NFE"),
                  ("images_per_second_generator", "min", "images/s"), ("train_seconds", "max", "train s"),
                  ("asr_max", "max", "ASR (worst attack; --attack)"))


def method_picks(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """(target, method) -> the trial that stands for it: its best trial (:func:`choose_best`, flagged by
    :func:`summarise`) or, where no trial reached the UA threshold, its finished trial with the highest UA."""
    out: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r["status"] not in DONE or not math.isfinite(r["ua"]):
            continue
        key = (r["target"], r.get("method") or "sfd")
        have = out.get(key)
        if have is None or (r.get("best") and not have.get("best")) or \
                (not have.get("best") and not r.get("best") and r["ua"] > have["ua"]):
            out[key] = r
    return out


def method_table(rows: list[dict], summary: pd.DataFrame, out_dir: Path, ua_threshold: float) -> pd.DataFrame:
    """Per method, over the targets: how many targets reached UA >= ``ua_threshold`` (have a best trial),
    and the median and the worst of UA, FD ratio, override FD ratio, remaining accuracy, NFE, images/s
    and train seconds of each target's pick (:func:`method_picks`). Written as methods.parquet and
    methods.md, with a plot per preset (methods-<preset>.png: UA against FD ratio and against images/s);
    returned."""
    picks = method_picks(rows)
    table = []
    for method in dict.fromkeys(summary["method"]):
        mine = summary[summary["method"] == method]
        chosen = [picks[(t, method)] for t in mine["target"] if (t, method) in picks]
        row = {"method": method, "targets": len(mine), "targets_at_ua_threshold": int((mine["best_trial"] != "").sum()),
               "trials": int(mine["trials"].sum())}
        for key, worst, _ in METHOD_FIGURES:
            vals = [float(r[key]) for r in chosen if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            row[f"{key}_median"] = float(pd.Series(vals).median()) if vals else math.nan
            row[f"{key}_worst"] = (min(vals) if worst == "min" else max(vals)) if vals else math.nan
        table.append(row)
    df = pd.DataFrame(table)
    write_table(df, Path(out_dir) / "methods.parquet")
    for preset in dict.fromkeys(t.split(":")[0] for t, _ in picks):     # forgetting vs quality vs cost, per preset
        mine = [r for (t, _), r in picks.items() if t.split(":")[0] == preset]
        plot_methods(mine, Path(out_dir) / f"methods-{preset}.png", ua_threshold=ua_threshold,
                     title=f"{preset}: each target's pick per method ({len(mine)} points)")
    with atomic_path(Path(out_dir) / "methods.md") as tmp:
        tmp.write_text(methods_markdown(df, ua_threshold))
    return df


def methods_markdown(df: pd.DataFrame, ua_threshold: float) -> str:
    def fmt(v, key):
        if not math.isfinite(v):
            return "-"
        if key in ("nfe", "train_seconds", "images_per_second_generator"):
            return f"{v:,.0f}"
        return f"{v:.3f}" if key in ("ua", "remaining_accuracy", "asr_max") else f"{v:.2f}"

    lines = ["# Methods side by side", "",
             f"Per method over its targets: each target's best trial (UA >= {ua_threshold}, the sweep's rule) or, where "
             f"none reached it, its trial with the highest UA. Each cell: median / worst over the targets (worst: the "
             f"lowest UA, accuracy and images/s; the highest FD ratios, NFE and train seconds). images/s: the "
             f"method's sampler at the training batch (SFD: one step; ESD, SA and SalUn, which fine-tune the teacher: its 18-step Heun).", ""]
    head = "| method | targets at UA threshold | " + " | ".join(label for _, _, label in METHOD_FIGURES) + " |"
    lines += [head, "|" + "---|" * (2 + len(METHOD_FIGURES))]
    for _, r in df.iterrows():
        cells = [f"{fmt(r[f'{k}_median'], k)} / {fmt(r[f'{k}_worst'], k)}" for k, _, _ in METHOD_FIGURES]
        lines.append(f"| {r['method']} | {r['targets_at_ua_threshold']}/{r['targets']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
