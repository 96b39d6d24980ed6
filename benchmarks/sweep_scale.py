#!/usr/bin/env python
"""Scale benchmark: the real sweep with many cheap targets, and what its driver and stores cost per size.

    python benchmarks/sweep_scale.py --sizes 10,100 --out runs/scale --report runs/scale/report.json
    python benchmarks/sweep_scale.py --sizes 300 --kill-resume --out runs/scale
    python benchmarks/sweep_scale.py --dry-run-sizes 1000 --sizes ''
    python benchmarks/sweep_scale.py --main-job --out runs/scale-main

Each size N runs ``orchestration/sweep.py`` on N distinct digits targets ('digits:a->b', then
'digits:a+b->c', then 'digits:a+b+c->d': up to 1,290) with a tiny search space (0.05 kimg per
trial, 20 forget and 10-per-class evaluation samples, no stage 1), so the sweep's own machinery,
not training, is what grows. Per size it records: wall time, the driver's CPU seconds (all of
them, and Tune's loop per trial), its peak RSS, the MLflow callback's write time per trial, the
tables and summary time, the fresh re-evaluation's driver CPU, and the sizes of the MLflow store
(database + artifacts), the Optuna storage, Tune's experiment folder and the trial folders. The
driver's figures come from the sweep's own ``OUT/driver_costs.json`` (orchestration/costs.py).
Across sizes it fits each figure's growth exponent k (figure ~ N^k, least squares in log-log):
k ~ 1 is linear in the targets, k ~ 2 quadratic.

``--kill-resume`` sends SIGTERM to the sweep's process group (what a pod eviction sends) once half
of its trials ended, runs the same command with ``--resume``, and checks the stores: every planned
trial once in trials.parquet, MLflow and Optuna, none RUNNING (``resume_ok``). ``--dry-run-sizes``
times ``--dry-run`` (wall, peak RSS). ``--main-job`` runs the digits main job's targets and
evaluation sizes (all_digits_classes, the digits search space) with the training budget cut to
``--main-budget-kimg`` and reports the driver CPU seconds of the fresh re-evaluations.
``--repo`` runs another checkout's sweep (a before/after pair in one report). Exit 1 when a sweep
failed or a resume check did not hold.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from orchestration.space import space_path  # noqa: E402  (the repo on sys.path first)

# a trial that costs next to nothing, so the sweep's own machinery is what is measured
TINY = {"budget_kimg": 0.05, "eval_every_kimg": 0.05, "checkpoint_every_kimg": 0.05, "eval_forget_samples": 20,
        "eval_remain_per_class": 10, "batch_remain": 16, "batch_forget": 16}
MAX_TARGETS = 90 + 360 + 840
# the figures fitted for growth, and how each is read from a size's record
FIGURES = ("wall_s", "driver_cpu_s", "driver_fit_cpu_per_trial_s", "driver_peak_rss_mib", "mlflow_write_s_per_trial",
           "tables_s", "make_tuner_s", "mlflow_mib", "optuna_mib", "tune_state_mib", "trials_mib")
PROGRESS = re.compile(r"\] trial (\d+)/(\d+),")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/sweep_scale.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--sizes", default="10,100,300",
                   help=f"numbers of targets, comma-separated, each a full sweep (at most {MAX_TARGETS}; '' none; "
                        f"default: 10,100,300)")
    p.add_argument("--out", default="runs/scale", help="work folder: <out>/n<N>/ per size (default: runs/scale)")
    p.add_argument("--trials-per-target", type=int, default=2, help="trials per target (default: 2)")
    p.add_argument("--max-concurrent", type=int, default=2, help="the sweep's --max-concurrent (default: 2)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the sweep's local Ray (default: 2)")
    p.add_argument("--fresh-seed", type=int, default=4242,
                   help="the sweep's --fresh-seed (-1: no fresh re-evaluation; default: 4242)")
    p.add_argument("--kill-resume", action="store_true",
                   help="every size: SIGTERM the sweep's process group once half its trials ended, then --resume, "
                        "and check the stores (nothing lost or duplicated)")
    p.add_argument("--dry-run-sizes", default="",
                   help="numbers of targets for a timed --dry-run each, comma-separated (e.g. 1000; default: none)")
    p.add_argument("--partial", default=None, metavar="N:SECONDS",
                   help="a sweep of N targets stopped (SIGTERM) after SECONDS: its trials done and driver costs")
    p.add_argument("--main-job", action="store_true",
                   help="the digits main job's targets and evaluation sizes with a cut training budget: the driver "
                        "CPU seconds of its fresh re-evaluations")
    p.add_argument("--main-budget-kimg", type=float, default=0.1,
                   help="training kimg per trial of --main-job (default: 0.1)")
    p.add_argument("--repo", default=str(REPO),
                   help="the checkout whose orchestration/sweep.py runs (default: this one); its driver must write "
                        "driver_costs.json")
    p.add_argument("--label", default="", help="a name for this run in the report (e.g. before, after)")
    p.add_argument("--report", help="write every figure as JSON here")
    p.add_argument("--plot", help="a PNG of each figure against the number of targets (log-log)")
    p.add_argument("--replot", metavar="REPORT",
                   help="run nothing: print the tables and draw --plot from this saved --report (and --compare)")
    p.add_argument("--compare", help="a report JSON of an earlier run (e.g. before the fixes): printed beside this one "
                                     "and drawn dashed in --plot")
    return p


def sizes_of(spec: str, flag: str) -> list[int]:
    out = []
    for part in filter(None, (x.strip() for x in spec.split(","))):
        if not part.isdigit() or not 1 <= int(part) <= MAX_TARGETS:
            raise SystemExit(f"sweep_scale.py: error: {flag} {part!r} — give numbers of targets from 1 to {MAX_TARGETS}")
        out.append(int(part))
    return out


def target_specs(n: int) -> list[str]:
    """``n`` distinct digits targets: single classes with an explicit override, then pairs, then triples."""
    specs = [f"digits:{a}->{b}" for a in range(10) for b in range(10) if a != b]
    for k in (2, 3):
        for forget in itertools.combinations(range(10), k):
            specs += [f"digits:{'+'.join(map(str, forget))}->{o}" for o in range(10) if o not in forget]
    if n > len(specs):
        raise SystemExit(f"sweep_scale.py: error: {n} targets asked, {len(specs)} distinct ones exist")
    return specs[:n]


def write_space(path: Path, main_job: bool = False) -> Path:
    doc = yaml.safe_load(space_path("digits").read_text())
    if not main_job:
        doc["defaults"].update(TINY)
        doc["search"].pop("batch_remain", None)      # the tiny batch is not among its choices
        doc.pop("trial", None)
    doc["stage1_kimg"] = 0 if not main_job else doc["stage1_kimg"]
    path.write_text(yaml.safe_dump(doc))
    return path


def sweep_cmd(a, repo: Path, out: Path, space: Path, targets: list[str], *extra) -> list[str]:
    return [sys.executable, str(repo / "orchestration" / "sweep.py"), "--targets", *targets,
            "--trials-per-target", str(a.trials_per_target), "--space", str(space), "--out", str(out),
            "--num-cpus", str(a.num_cpus), "--max-concurrent", str(a.max_concurrent), "--ua-threshold", "0",
            "--fresh-seed", str(a.fresh_seed), *extra]


def run(cmd: list[str], env: dict, log: Path, stop=None) -> dict:
    """Run ``cmd`` in its own process group; ``stop(log_text)`` true -> SIGTERM to the group. Returns exit, wall,
    peak RSS of the driver process (wait4: the process itself and the children it waited for)."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        signalled = None
        while proc.poll() is None:
            if stop is not None and signalled is None and stop(log.read_text(errors="replace")):
                os.killpg(proc.pid, signal.SIGTERM)
                signalled = round(time.time() - t0, 1)
            time.sleep(0.5)
        wall = time.time() - t0
    return {"exit": proc.returncode, "wall_s": round(wall, 2), "signalled_at_s": signalled}


def mib(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20 if path.is_dir() else 0.0


def store_sizes(out: Path) -> dict:
    tune = [d for d in (out / "ray").glob("tune-*") if d.is_dir()]
    state = sum(mib(p) for d in tune for p in d.iterdir() if p.is_file())
    return {"mlflow_mib": round(mib(out / "mlflow.db") + mib(out / "mlartifacts"), 3),
            "mlflow_db_mib": round(mib(out / "mlflow.db"), 3), "optuna_mib": round(mib(out / "optuna.db"), 3),
            "tune_state_mib": round(state, 3), "tune_dir_mib": round(sum(mib(d) for d in tune), 3),
            "trials_mib": round(mib(out / "trials"), 3)}


def driver_figures(out: Path) -> dict:
    f = out / "driver_costs.json"
    if not f.is_file():
        return {}
    c = json.loads(f.read_text())
    ph = c.get("phases", {})
    trials = max(int(c.get("trials", 0)), 1)

    def p(name, key="wall_s"):
        return ph.get(name, {}).get(key, 0.0)
    return {"driver_cpu_s": c["cpu_s"], "driver_wall_s": c["wall_s"], "driver_peak_rss_mib": c["peak_rss_mib"],
            "trials": c.get("trials"), "driver_cpu_per_trial_s": round(c["cpu_s"] / trials, 4),
            "driver_fit_cpu_per_trial_s": round(p("fit", "cpu_s") / trials, 4),
            "mlflow_write_s_per_trial": round(p("mlflow_callback") / trials, 4),
            "make_tuner_s": round(p("make_tuner"), 2),
            "summary_s": round(sum(p(k) for k in ("trial_owners", "trial_rows", "fresh_wait", "summarise",
                                                  "log_summary")), 2),
            "fresh_driver_cpu_s": round(p("fresh_on_driver", "cpu_s") + p("fresh_wait", "cpu_s"), 2),
            "fresh_driver_wall_s": round(p("fresh_on_driver") + p("fresh_wait"), 2),
            "phases": ph, **derived(ph)}


def derived(ph: dict) -> dict:
    """From a sweep's driver phases: ``tables_s``, the tables and summary without the fresh re-evaluations
    (before: evaluated inside the summary, on the driver; after: waited for as Ray tasks), so both compare."""
    def p(name, key="wall_s"):
        return ph.get(name, {}).get(key, 0.0)
    return {"tables_s": round(sum(p(k) for k in ("trial_owners", "trial_rows", "summarise", "log_summary"))
                              - p("fresh_on_driver"), 2)}


def resume_checks(out: Path, n_targets: int, per_target: int) -> dict:
    from chaos import count_stores
    c = count_stores(out)
    planned = n_targets * per_target
    optuna = c.get("optuna", {})
    checks = {
        "table_rows": c.get("table_rows"), "table_unique_trials": c.get("table_unique_trials"),
        "table_status": c.get("table_status"),
        "mlflow_trial_runs": c.get("mlflow_runs", {}).get("trial"), "mlflow_trial_ids_unique": c.get("mlflow_trial_ids_unique"),
        "mlflow_target_runs": c.get("mlflow_runs", {}).get("target"), "mlflow_status": c.get("mlflow_status"),
        "optuna_studies": len(optuna), "optuna_complete": sum(s.get("COMPLETE", 0) for s in optuna.values()),
        "optuna_other_states": {k: sum(s.get(k, 0) for s in optuna.values())
                                for k in {k for s in optuna.values() for k in s} - {"COMPLETE"}},
        "planned_trials": planned}
    checks["resume_ok"] = bool(
        checks["table_rows"] == checks["table_unique_trials"] == planned
        and set(checks["table_status"] or {}) == {"finished"}
        and checks["mlflow_trial_runs"] == checks["mlflow_trial_ids_unique"] == planned
        and checks["mlflow_target_runs"] == n_targets and set(checks["mlflow_status"] or {}) == {"FINISHED"}
        and checks["optuna_studies"] == n_targets and checks["optuna_complete"] == planned
        and all(s.get("COMPLETE", 0) == per_target and "RUNNING" not in s for s in optuna.values()))
    return checks


def one_size(a, n: int, root: Path, env: dict, space: Path) -> dict:
    out = root / f"n{n}"
    for p in (out, out.with_suffix(".log")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    targets = target_specs(n)
    log = out.with_suffix(".log")
    planned = n * a.trials_per_target
    rec = {"targets": n, "planned_trials": planned}
    if not a.kill_resume:
        r = run(sweep_cmd(a, Path(a.repo), out, space, targets), env, log)
        rec.update(exit=r["exit"], wall_s=r["wall_s"])
    else:
        def half(text):
            done = [int(m.group(1)) for m in PROGRESS.finditer(text)]
            return bool(done) and max(done) >= planned // 2
        r1 = run(sweep_cmd(a, Path(a.repo), out, space, targets), env, log, stop=half)
        done_before = max([int(m.group(1)) for m in PROGRESS.finditer(log.read_text(errors="replace"))] or [0])
        first = driver_figures(out)
        r2 = run(sweep_cmd(a, Path(a.repo), out, space, targets, "--resume"), env, log)
        rec.update(exit=r2["exit"], first_exit=r1["exit"], signalled_at_s=r1["signalled_at_s"],
                   trials_before_kill=done_before, first_wall_s=r1["wall_s"], resume_wall_s=r2["wall_s"],
                   wall_s=round(r1["wall_s"] + r2["wall_s"], 2),
                   first_driver={k: v for k, v in first.items() if k != "phases"})
    rec.update(store_sizes(out))
    rec.update(driver_figures(out))
    if a.kill_resume:
        rec["restore_s"] = rec.get("make_tuner_s")
        rec["resume"] = resume_checks(out, n, a.trials_per_target)
    return rec


def dry_run(a, n: int, root: Path, env: dict, space: Path) -> dict:
    out = root / f"dry{n}"
    cmd = sweep_cmd(a, Path(a.repo), out, space, target_specs(n), "--dry-run")
    t0 = time.time()
    with open(root / f"dry{n}.log", "w") as f:
        proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    # a dry run starts no Ray: the driver's own peak RSS (ru_maxrss, KiB on Linux)
    return {"targets": n, "exit": os.waitstatus_to_exitcode(status), "wall_s": round(time.time() - t0, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def growth(records: list[dict]) -> dict:
    """Each figure's exponent k in figure ~ N^k (least squares over log N, log figure); None with < 2 sizes."""
    import numpy as np
    out = {}
    for key in FIGURES:
        pts = [(r["targets"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and r[key] > 0]
        if len({n for n, _ in pts}) < 2:
            out[key] = None
            continue
        x, y = np.log([n for n, _ in pts]), np.log([v for _, v in pts])
        out[key] = round(float(np.polyfit(x, y, 1)[0]), 2)
    return out


def table(records: list[dict], exps: dict, label: str) -> str:
    cols = ["targets", "planned_trials", *FIGURES, "fresh_driver_cpu_s", "fresh_driver_wall_s"]
    lines = [f"{label}", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        lines.append("| " + " | ".join(f"{r.get(c, '-')}" for c in cols) + " |")
    lines.append("| growth exponent k | - | " + " | ".join(f"{exps.get(c)}" for c in FIGURES) + " | - | - |")
    return "\n".join(lines)


def plot(records: list[dict], exps: dict, png: Path, before: dict | None = None, label: str = "this run") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in FIGURES if any(isinstance(r.get(k), (int, float)) and r[k] > 0 for r in records)]
    cols = 4
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for recs, ex, style, name in ((records, exps, "o-", label),
                                      *(((before["sizes"], before["growth"], "s--", before.get("label") or "compared"),)
                                        if before else ())):
            pts = [(r["targets"], r[key]) for r in recs if isinstance(r.get(key), (int, float)) and r[key] > 0]
            if pts:
                ax.loglog(*zip(*pts), style, label=f"{name}: k={ex.get(key)}")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("targets")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle("sweep cost against the number of targets (log-log; k: growth exponent)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


def load_report(path) -> dict:
    rep = json.loads(Path(path).read_text())
    for r in rep.get("sizes", []):
        r.update(derived(r.get("phases", {})))        # figures added since the report was written
    rep["growth"] = growth(rep.get("sizes", []))
    return rep


def replot(a) -> int:
    rep = load_report(a.replot)
    before = load_report(a.compare) if a.compare else None
    print(table(rep["sizes"], rep["growth"], f"[scale] {rep.get('label')} ({rep.get('repo')})"))
    if before:
        print(table(before["sizes"], before["growth"], f"[scale] compared: {before.get('label')} ({before.get('repo')})"))
    if a.plot:
        plot(rep["sizes"], rep["growth"], Path(a.plot), before, rep.get("label") or "this run")
        print(f"[scale] plot: {a.plot}")
    return 0


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    sizes, dry = sizes_of(a.sizes, "--sizes"), sizes_of(a.dry_run_sizes, "--dry-run-sizes")
    if a.trials_per_target < 1:
        raise SystemExit(f"sweep_scale.py: error: --trials-per-target {a.trials_per_target} — give at least 1")
    if not (Path(a.repo) / "orchestration" / "sweep.py").is_file():
        raise SystemExit(f"sweep_scale.py: error: --repo {a.repo} has no orchestration/sweep.py — give a checkout of sfd")
    if a.replot:
        return replot(a)
    root = Path(a.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    space = write_space(root / "space.yaml")
    env = {**os.environ, "PYTHONPATH": str(Path(a.repo).resolve()), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "SFD_CACHE": os.environ.get("SFD_CACHE", str(root / "cache"))}
    report: dict = {"label": a.label, "repo": str(a.repo), "args": vars(a), "sizes": [], "dry_runs": []}
    ok = True
    for n in sizes:
        print(f"[scale] {n} targets x {a.trials_per_target} trials ...", flush=True)
        rec = one_size(a, n, root, env, space)
        report["sizes"].append(rec)
        ok &= rec["exit"] == 0 and rec.get("resume", {}).get("resume_ok", True)
        print(f"[scale]   {json.dumps({k: v for k, v in rec.items() if k != 'phases'})}", flush=True)
    for n in dry:
        rec = dry_run(a, n, root, env, space)
        report["dry_runs"].append(rec)
        ok &= rec["exit"] == 0
        print(f"[scale] --dry-run with {n} targets: {rec['wall_s']} s, driver peak RSS {rec['peak_rss_mib']} MiB "
              f"(exit {rec['exit']})", flush=True)
    if a.partial:
        n, _, secs = a.partial.partition(":")
        n, secs = sizes_of(n, "--partial")[0], float(secs or 120)
        out = root / f"partial{n}"
        shutil.rmtree(out, ignore_errors=True)
        t_end = time.time() + secs
        r = run(sweep_cmd(a, Path(a.repo), out, space, target_specs(n)), env, out.with_suffix(".log"),
                stop=lambda _: time.time() > t_end)
        done = max([int(m.group(1)) for m in PROGRESS.finditer(out.with_suffix(".log").read_text(errors="replace"))] or [0])
        rec = {"targets": n, **r, "trials_ended": done, **store_sizes(out),
               **{k: v for k, v in driver_figures(out).items() if k != "phases"}}
        report["partial"] = rec
        print(f"[scale] partial {n} targets, stopped after {secs:g} s: {json.dumps(rec)}", flush=True)
    if a.main_job:
        out = root / "main-job"
        shutil.rmtree(out, ignore_errors=True)
        main_space = write_space(root / "main-space.yaml", main_job=True)
        r = run(sweep_cmd(a, Path(a.repo), out, main_space, ["all_digits_classes"], "--budget-kimg",
                          str(a.main_budget_kimg)), env, out.with_suffix(".log"))
        rec = {**r, **{k: v for k, v in driver_figures(out).items()}}
        # the same re-evaluations on one process, as the driver made them before they became Ray tasks:
        # --summarize-only (no Ray) on the same sweep, its fresh caches removed first
        for f in out.glob("trials/*/*/evaluation_fresh_seed*.json"):
            f.unlink()
        s = run([sys.executable, str(Path(a.repo) / "orchestration" / "sweep.py"), "--summarize-only", "--out", str(out),
                 "--ua-threshold", "0", "--fresh-seed", str(a.fresh_seed)], env, out.with_suffix(".log"))
        one = json.loads((out / "driver_costs_summarize_only.json").read_text()) if \
            (out / "driver_costs_summarize_only.json").is_file() else {}
        ph = one.get("phases", {}).get("fresh_on_driver", {})
        rec.update(one_process_exit=s["exit"], one_process_fresh_cpu_s=ph.get("cpu_s"), one_process_fresh_wall_s=ph.get("wall_s"),
                   one_process_evaluations=len(list(out.glob("trials/*/*/evaluation_fresh_seed*.json"))))
        report["main_job"] = rec
        ok &= r["exit"] == 0 and s["exit"] == 0
        print(f"[scale] main job (all_digits_classes, {a.main_budget_kimg} kimg/trial): exit {r['exit']}, {r['wall_s']} s; "
              f"driver CPU on fresh re-evaluations as Ray tasks {rec.get('fresh_driver_cpu_s')} s (wall "
              f"{rec.get('fresh_driver_wall_s')} s); the same {rec['one_process_evaluations']} re-evaluations on one "
              f"process (--summarize-only): CPU {rec['one_process_fresh_cpu_s']} s, wall {rec['one_process_fresh_wall_s']} s",
              flush=True)
    if report["sizes"]:
        report["growth"] = growth(report["sizes"])
        print(table(report["sizes"], report["growth"], f"[scale] {a.label or 'this run'} ({a.repo})"))
    before = load_report(a.compare) if a.compare else None
    if before and before.get("sizes"):
        print(table(before["sizes"], before["growth"],
                    f"[scale] compared: {before.get('label')} ({before.get('repo')})"))
    if a.plot and report["sizes"]:
        plot(report["sizes"], report["growth"], Path(a.plot), before, a.label or "this run")
        print(f"[scale] plot: {a.plot}")
    if a.report:
        from sfd.io import write_json
        write_json(Path(a.report), report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
