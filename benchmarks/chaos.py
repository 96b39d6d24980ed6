#!/usr/bin/env python
"""Chaos run: a small sweep interrupted at random moments by the faults the world sends, then checked
store by store against the same sweep run undisturbed.

    python benchmarks/chaos.py --out runs/chaos
    python benchmarks/chaos.py --kills worker=2,group_term=1,driver_int=1 --seed 3

Kinds of kill (each at a random moment while a trial trains):

- ``worker``: SIGKILL of the process training a trial (the Tune trial's own process, or a Ray Train
  worker); the sweep goes on, ``--max-failures`` restarts the trial from its last checkpoint.
- ``group_term``: SIGTERM to the sweep's whole process group (driver, GCS, raylet: what ``timeout``, a
  container stop or a batch scheduler sends); the sweep must exit 143 within seconds, then
  ``--resume`` continues it.
- ``driver_int``: SIGINT to the driver alone (Tune's graceful stop); exit 130, then ``--resume``.

Afterwards both sweeps' stores are counted -- trials.parquet rows and statuses, MLflow runs per kind
and per target with their statuses and logged checkpoint models, Optuna trials per study and state,
each trial's final checkpoint -- and compared: the chaos run must hold exactly what the undisturbed one
holds, with nothing RUNNING. Prints kills per kind, seconds to exit after each signal, the counts and
both wall times; ``--report`` writes them as JSON. Exit 0 when the stores agree, 1 when not.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from orchestration.space import space_path  # noqa: E402  (the repo on sys.path first)
from sfd.checkpoint import latest_checkpoint  # noqa: E402

KINDS = ("worker", "group_term", "driver_int")
# a trial small enough for 2 CPU cores: evaluations and checkpoints every 0.25 kimg
TINY = {"eval_every_kimg": 0.25, "checkpoint_every_kimg": 0.25, "eval_forget_samples": 40,
        "eval_remain_per_class": 20, "batch_remain": 16, "batch_forget": 16}
TRAINING_PROCESS = ("ImplicitFunc", "RayTrainWorker")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/chaos.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--out", default="runs/chaos", help="work folder: <out>/calm and <out>/chaos (default: runs/chaos)")
    p.add_argument("--targets", default="digits:0 digits:1", help="the sweep's targets (default: 'digits:0 digits:1')")
    p.add_argument("--trials-per-target", type=int, default=2, help="trials per target (default: 2)")
    p.add_argument("--budget-kimg", type=float, default=1.0, help="kimg per trial (default: 1.0)")
    p.add_argument("--kills", default="worker=2,group_term=1,driver_int=1",
                   help="kills per kind, kind=count,... of worker, group_term, driver_int "
                        "(default: worker=2,group_term=1,driver_int=1)")
    p.add_argument("--max-failures", type=int, default=3, help="the sweep's --max-failures (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill order and moments (default: 0)")
    p.add_argument("--max-delay", type=float, default=20.0,
                   help="a kill comes 0..this many seconds after a trial is seen training (default: 20)")
    p.add_argument("--reuse-calm", action="store_true",
                   help="keep the undisturbed sweep of an earlier chaos run in the same --out (same settings)")
    p.add_argument("--report", help="write the figures as JSON here")
    return p


def parse_kills(spec: str) -> list[str]:
    kills = []
    for part in filter(None, spec.split(",")):
        kind, _, n = part.partition("=")
        if kind not in KINDS or not n.isdigit():
            raise SystemExit(f"chaos.py: error: --kills {part!r} — give kind=count with kind one of {', '.join(KINDS)}")
        kills += [kind] * int(n)
    return kills


# -- processes ---------------------------------------------------------------------------------------

def _parents() -> dict[int, int]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                out[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def descendants(pid: int) -> list[int]:
    parent, out, todo = _parents(), [], [pid]
    while todo:
        pid = todo.pop()
        kids = [c for c, pp in parent.items() if pp == pid]
        out += kids
        todo += kids
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def training_processes(pid: int) -> list[int]:
    return [p for p in descendants(pid) if any(k in cmdline(p) for k in TRAINING_PROCESS)]


def kill_everything(proc) -> None:
    for p in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- the sweep -----------------------------------------------------------------------------------------

def write_space(path: Path) -> Path:
    doc = yaml.safe_load(space_path("digits").read_text())
    doc["defaults"].update(TINY)
    doc.pop("trial", None)
    doc["stage1_kimg"] = 0
    path.write_text(yaml.safe_dump(doc))
    return path


def sweep_args(a, out: Path, space: Path) -> list[str]:
    return [sys.executable, str(REPO / "orchestration" / "sweep.py"), "--targets", *a.targets.split(),
            "--trials-per-target", str(a.trials_per_target), "--budget-kimg", str(a.budget_kimg), "--space", str(space),
            "--out", str(out), "--num-cpus", "2", "--max-concurrent", "1", "--ua-threshold", "0", "--fresh-seed", "-1",
            "--max-failures", str(a.max_failures)]


def start(cmd: list[str], env: dict, log: Path):
    f = open(log, "a")
    f.write(f"\n$ {' '.join(cmd)}\n")
    f.flush()
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True), f


def sweep_key(a) -> list:
    """What makes two undisturbed runs the same sweep."""
    return [a.targets, a.trials_per_target, a.budget_kimg, a.max_failures]


def calm_run(a, out: Path, space: Path, env: dict) -> dict:
    t0 = time.time()
    proc, f = start(sweep_args(a, out, space), env, out.with_suffix(".log"))
    rc = proc.wait()
    f.close()
    return {"exit": rc, "wall_s": round(time.time() - t0, 1)}


def chaos_run(a, out: Path, space: Path, env: dict, kills: list[str], rng: random.Random) -> dict:
    """Segments of the sweep: each is started (the first fresh, then --resume), gets kills until one ends
    it, and is resumed until the sweep finishes."""
    log = out.with_suffix(".log")
    events, todo, t0, segment = [], list(kills), time.time(), 0
    while True:
        cmd = sweep_args(a, out, space) + (["--resume"] if segment else [])
        proc, f = start(cmd, env, log)
        segment += 1
        try:
            while todo and proc.poll() is None:
                kind = todo[0]
                # a trial training in this segment, then a random moment
                while proc.poll() is None and not training_processes(proc.pid):
                    time.sleep(0.2)
                time.sleep(rng.uniform(0, a.max_delay))
                if proc.poll() is not None:
                    break
                todo.pop(0)
                ev = {"kind": kind, "segment": segment, "at_s": round(time.time() - t0, 1)}
                if kind == "worker":
                    workers = training_processes(proc.pid)
                    if not workers:
                        ev["note"] = "no trial training at that moment: retried"
                        todo.insert(0, kind)
                        continue
                    os.kill(workers[0], signal.SIGKILL)
                    ev["pid"] = workers[0]
                    events.append(ev)
                    time.sleep(3)                      # let Tune notice before the next kill
                    continue
                ts = time.time()
                if kind == "group_term":
                    os.killpg(proc.pid, signal.SIGTERM)
                else:
                    proc.send_signal(signal.SIGINT)
                try:
                    rc = proc.wait(timeout=180)
                except subprocess.TimeoutExpired:
                    rc = "no exit within 180 s"
                ev.update(exit=rc, seconds_to_exit=round(time.time() - ts, 1))
                events.append(ev)
                break
            rc = proc.wait()
        finally:
            kill_everything(proc)
            f.close()
        if rc == 0:
            break
        if not events or events[-1].get("exit") != rc:
            events.append({"kind": "unexpected end", "segment": segment, "exit": rc})
            if segment > len(kills) + 2:
                break
    return {"exit": rc, "wall_s": round(time.time() - t0, 1), "segments": segment, "kills": events,
            "missed": todo}


# -- the stores ------------------------------------------------------------------------------------------

def count_stores(out: Path) -> dict:
    import optuna
    import pandas as pd
    from mlflow.tracking import MlflowClient

    c: dict = {}
    try:
        trials = pd.read_parquet(out / "trials.parquet")
        c["table_rows"] = len(trials)
        c["table_unique_trials"] = int(trials["trial_id"].nunique())
        c["table_status"] = dict(Counter(trials["status"]))
        c["table_per_target"] = dict(Counter(trials["target"]))
    except (OSError, ValueError) as e:
        c["table_error"] = f"{type(e).__name__}: {e}"
        trials = None
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sfd-sweep")
    runs = client.search_runs([exp.experiment_id], max_results=10000)
    c["mlflow_runs"] = dict(Counter(r.data.tags.get("kind") for r in runs))
    c["mlflow_status"] = dict(Counter(r.info.status for r in runs))
    c["mlflow_trial_runs_per_target"] = dict(Counter(r.data.tags.get("target") for r in runs
                                                     if r.data.tags.get("kind") == "trial"))
    c["mlflow_trial_ids_unique"] = len({r.data.tags.get("trial_id") for r in runs if r.data.tags.get("kind") == "trial"})
    models = client.search_logged_models([exp.experiment_id], max_results=10000)
    c["mlflow_checkpoint_models"] = len(models)
    c["mlflow_checkpoint_models_distinct"] = len({(m.source_run_id, m.name) for m in models})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{out / 'optuna.db'}"
    c["optuna"] = {}
    for s in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        c["optuna"][s.study_name] = dict(Counter(t.state.name for t in study.trials))
    final = {}
    for run_dir in sorted((out / "trials").glob("*/*")):
        ckpt = latest_checkpoint(run_dir)
        final[run_dir.name] = int(ckpt.name.split("-")[1]) if ckpt else None
    c["trial_folders"] = len(final)
    c["final_checkpoint_iterations"] = dict(Counter(final.values()))
    c["generators"] = len(list((out / "trials").glob("*/*/generator.safetensors")))
    return c


COMPARED = ("table_rows", "table_unique_trials", "table_status", "table_per_target", "mlflow_runs", "mlflow_status",
            "mlflow_trial_runs_per_target", "mlflow_trial_ids_unique", "mlflow_checkpoint_models_distinct", "optuna",
            "trial_folders", "final_checkpoint_iterations", "generators")


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    kills = parse_kills(a.kills)
    rng = random.Random(a.seed)
    rng.shuffle(kills)
    root = Path(a.out).resolve()
    calm_file = root / "calm.json"
    reuse = a.reuse_calm and calm_file.is_file() and json.loads(calm_file.read_text()).get("args") == sweep_key(a)
    for sub in ("chaos", "chaos.log") if reuse else ("calm", "calm.log", "calm.json", "chaos", "chaos.log"):
        if (root / sub).is_dir():
            shutil.rmtree(root / sub)
        elif (root / sub).exists():
            (root / sub).unlink()
    root.mkdir(parents=True, exist_ok=True)
    space = write_space(root / "space.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "SFD_CACHE": str(root / "cache")}
    if reuse:
        calm = json.loads(calm_file.read_text())
        print(f"[chaos] undisturbed sweep: reused {root / 'calm'} ({calm['wall_s']} s)", flush=True)
    else:
        print(f"[chaos] undisturbed sweep -> {root / 'calm'}", flush=True)
        calm = {**calm_run(a, root / "calm", space, env), "args": sweep_key(a)}
        calm_file.write_text(json.dumps(calm))
        print(f"[chaos]   exit {calm['exit']}, {calm['wall_s']} s", flush=True)
    print(f"[chaos] sweep under {len(kills)} kills ({', '.join(kills)}) -> {root / 'chaos'}", flush=True)
    chaos = chaos_run(a, root / "chaos", space, env, kills, rng)
    for ev in chaos["kills"]:
        print(f"[chaos]   {json.dumps(ev)}", flush=True)
    print(f"[chaos]   exit {chaos['exit']}, {chaos['wall_s']} s over {chaos['segments']} segment(s)", flush=True)
    counts = {"calm": count_stores(root / "calm"), "chaos": count_stores(root / "chaos")}
    diff = {k: {"calm": counts["calm"].get(k), "chaos": counts["chaos"].get(k)} for k in COMPARED
            if counts["calm"].get(k) != counts["chaos"].get(k)}
    running = counts["chaos"]["mlflow_status"].get("RUNNING", 0)
    landed = Counter(ev["kind"] for ev in chaos["kills"] if ev["kind"] in KINDS)
    print(f"[chaos] kills landed per kind: {dict(landed)}; missed (the sweep ended first): {chaos['missed']}")
    for k in COMPARED + ("mlflow_checkpoint_models",):
        print(f"[chaos] {k:34s} calm {json.dumps(counts['calm'].get(k))}   chaos {json.dumps(counts['chaos'].get(k))}")
    print(f"[chaos] wall time: undisturbed {calm['wall_s']} s, chaos {chaos['wall_s']} s "
          f"({chaos['wall_s'] / max(calm['wall_s'], 1e-9):.2f}x)")
    ok = calm["exit"] == 0 and chaos["exit"] == 0 and not diff and not running
    print(f"[chaos] {'every store agrees with the undisturbed run' if ok else 'MISMATCH: ' + json.dumps(diff)}")
    if a.report:
        Path(a.report).write_text(json.dumps({"calm": calm, "chaos": chaos, "counts": counts, "diff": diff,
                                              "ok": ok}, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
