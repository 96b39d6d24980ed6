#!/usr/bin/env python
"""Chaos run: a small sweep interrupted at random moments by the faults the world sends, then checked
store by store against the same sweep run undisturbed.

    python benchmarks/chaos.py --out runs/chaos
    python benchmarks/chaos.py --kills worker=2,group_term=1,driver_int=1 --seed 3
    python benchmarks/chaos.py --nodes 2 --kills worker=3,node=1 --out runs/chaos2

``--nodes 2`` runs both sweeps on a 2-node Ray cluster on loopback (a head and a worker node, each a
``ray start --block`` in a process session of its own, 127.0.0.1, a private temp folder; a fresh cluster for
each sweep), the sweep joining it with ``--address``; trials run on both nodes at once.

Kinds of kill (each at a random moment while a trial trains):

- ``worker``: SIGKILL of the process training a trial (the Tune trial's own process, or a Ray Train
  worker); the sweep goes on, ``--max-failures`` restarts the trial from its last checkpoint.
- ``group_term``: SIGTERM to the sweep's whole process group (driver, GCS, raylet: what ``timeout``, a
  container stop or a batch scheduler sends); the sweep must exit 143 within seconds, then
  ``--resume`` continues it.
- ``driver_int``: SIGINT to the driver alone (Tune's graceful stop); exit 130, then ``--resume``.
- ``node`` (``--nodes 2``): the worker node killed whole while a trial trains on it -- SIGKILL to its
  ``ray start`` process group and every process under it (raylet, agents, the trial workers, which Ray puts
  in process groups of their own); ``--new-node-after`` seconds later a new worker node joins, so the
  sweep can finish. The trial on it fails (``ActorDiedError`` once Ray sees the node gone) and
  ``--max-failures`` retries it from its last checkpoint in storage.

Afterwards both sweeps' stores are counted -- trials.parquet rows and statuses, MLflow runs per kind
and per target with their statuses and logged checkpoint models, Optuna trials per study and state,
each trial's final checkpoint -- and compared: the chaos run must hold exactly what the undisturbed one
holds, with nothing RUNNING; and every planned trial must be in the table once, finished or failed with
its cause, with one MLflow run and one Optuna trial. Prints kills per kind, seconds to exit after each
signal, the counts and both wall times; ``--report`` writes them as JSON. Exit 0 when the stores agree
and every trial is accounted for, 1 when not.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from orchestration.space import space_path  # noqa: E402  (the repo on sys.path first)
from sfd.checkpoint import latest_checkpoint  # noqa: E402

KINDS = ("worker", "group_term", "driver_int", "node")
DEFAULT_KILLS = {1: "worker=2,group_term=1,driver_int=1", 2: "worker=2,node=1"}
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
    p.add_argument("--kills", default=None,
                   help="kills per kind, kind=count,... of worker, group_term, driver_int, node (default: "
                        f"{DEFAULT_KILLS[1]}; with --nodes 2: {DEFAULT_KILLS[2]})")
    p.add_argument("--in-order", action="store_true",
                   help="make the kills in the order --kills lists them (default: shuffled by --seed)")
    p.add_argument("--nodes", type=int, choices=(1, 2), default=1,
                   help="1: the sweep starts its own local Ray; 2: a head and a worker node on loopback, joined "
                        "with --address (default: 1)")
    p.add_argument("--node-cpus", type=int, default=1, help="--nodes 2: CPUs of each node (default: 1)")
    p.add_argument("--new-node-after", type=float, default=5.0,
                   help="--nodes 2: a new worker node joins this many seconds after a node kill; -1: none "
                        "(default: 5)")
    p.add_argument("--max-failures", type=int, default=3, help="the sweep's --max-failures (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill order and moments (default: 0)")
    p.add_argument("--max-delay", type=float, default=20.0,
                   help="a kill comes 0..this many seconds after a trial is seen training (default: 20)")
    p.add_argument("--reuse-calm", action="store_true",
                   help="keep the undisturbed sweep of an earlier chaos run in the same --out (same settings)")
    p.add_argument("--report", help="write the figures as JSON here")
    return p


def parse_kills(spec: str, nodes: int = 1) -> list[str]:
    kills = []
    for part in filter(None, spec.split(",")):
        kind, _, n = part.partition("=")
        if kind not in KINDS or not n.isdigit():
            raise SystemExit(f"chaos.py: error: --kills {part!r} — give kind=count with kind one of {', '.join(KINDS)}")
        if kind == "node" and nodes < 2:
            raise SystemExit(f"chaos.py: error: --kills {part!r} kills a worker node, but --nodes is 1 (the sweep's "
                             f"own local Ray has none) — add --nodes 2")
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


def training_processes(*roots: int) -> list[int]:
    return [p for r in roots for p in descendants(r) if any(k in cmdline(p) for k in TRAINING_PROCESS)]


def kill_everything(proc) -> int:
    """SIGKILL to ``proc``, every process under it (collected first: Ray puts its workers in process groups
    of their own) and its process group. Returns how many processes were signalled."""
    pids, n = [proc.pid, *descendants(proc.pid)], 0
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
            n += 1
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    """A real multi-node Ray cluster on this machine: a head and worker nodes, each a ``ray start --block``
    in a process session of its own on 127.0.0.1, with a private temp folder (a plain ``ray.init()`` elsewhere
    on the machine never finds it). The head runs trials too. Token authentication is off
    (``RAY_AUTH_MODE=disabled``): ``ray start --head`` turns it on, and a worker node would need the token."""

    def __init__(self, root: Path, cpus: int, env: dict):
        self.root, self.cpus = root, cpus
        self.env = {**env, "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_V2_ENABLED": "1"}
        self.tmp = tempfile.mkdtemp(prefix="chaos-ray-", dir="/tmp")        # short: socket paths <= 107 chars
        self.address = f"127.0.0.1:{free_port()}"
        self.head = self._start("head", ["--head", "--port", self.address.split(":")[1], "--include-dashboard", "false",
                                         "--temp-dir", self.tmp])
        self.workers: list = []
        self.add_worker()

    def _start(self, name: str, args: list[str]):
        log = self.root / f"node-{name}.log"
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", *args, "--num-cpus", str(self.cpus),
               "--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--block"]
        f = open(log, "a")
        proc = subprocess.Popen(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.time()
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.time() - t0 > 120:
                kill_everything(proc)
                raise RuntimeError(f"the Ray {name} node did not start (see {log})")
            time.sleep(0.5)
        return proc

    def add_worker(self):
        self.workers.append(self._start(f"worker{len(self.workers) + 1}", ["--address", self.address]))
        return self.workers[-1]

    @property
    def worker(self):
        return self.workers[-1]

    def kill_worker(self) -> int:
        """The current worker node killed whole, as a lost machine is: returns how many processes."""
        return kill_everything(self.worker)

    def roots(self) -> list[int]:
        return [self.head.pid, *(w.pid for w in self.workers)]

    def shutdown(self) -> None:
        for proc in [*self.workers, self.head]:
            kill_everything(proc)
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- the sweep -----------------------------------------------------------------------------------------

def write_space(path: Path) -> Path:
    doc = yaml.safe_load(space_path("digits").read_text())
    doc["defaults"].update(TINY)
    doc["search"].pop("batch_remain", None)      # the tiny batch is not among its choices
    doc.pop("trial", None)
    doc["stage1_kimg"] = 0
    path.write_text(yaml.safe_dump(doc))
    return path


def sweep_args(a, out: Path, space: Path, cluster: LoopbackCluster | None = None) -> list[str]:
    where = ["--address", cluster.address, "--max-concurrent", str(2 * a.node_cpus)] if cluster else \
        ["--num-cpus", "2", "--max-concurrent", "1"]
    return [sys.executable, str(REPO / "orchestration" / "sweep.py"), "--targets", *a.targets.split(),
            "--trials-per-target", str(a.trials_per_target), "--budget-kimg", str(a.budget_kimg), "--space", str(space),
            "--out", str(out), *where, "--ua-threshold", "0", "--fresh-seed", "-1",
            "--max-failures", str(a.max_failures)]


def start(cmd: list[str], env: dict, log: Path):
    f = open(log, "a")
    f.write(f"\n$ {' '.join(cmd)}\n")
    f.flush()
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True), f


def sweep_key(a) -> list:
    """What makes two undisturbed runs the same sweep."""
    return [a.targets, a.trials_per_target, a.budget_kimg, a.max_failures, a.nodes, a.node_cpus]


def calm_run(a, out: Path, space: Path, env: dict, cluster: LoopbackCluster | None = None) -> dict:
    t0 = time.time()
    proc, f = start(sweep_args(a, out, space, cluster), env, out.with_suffix(".log"))
    rc = proc.wait()
    f.close()
    return {"exit": rc, "wall_s": round(time.time() - t0, 1)}


def chaos_run(a, out: Path, space: Path, env: dict, kills: list[str], rng: random.Random,
              cluster: LoopbackCluster | None = None) -> dict:
    """Segments of the sweep: each is started (the first fresh, then --resume), gets kills until one ends
    it, and is resumed until the sweep finishes."""
    log = out.with_suffix(".log")
    events, todo, t0, segment = [], list(kills), time.time(), 0
    while True:
        cmd = sweep_args(a, out, space, cluster) + (["--resume"] if segment else [])
        proc, f = start(cmd, env, log)
        segment += 1
        try:
            while todo and proc.poll() is None:
                kind = todo[0]
                # Ray's processes: the driver's own (one node) or the cluster's nodes'
                roots = cluster.roots() if cluster else [proc.pid]
                if kind == "node":       # a trial training on the worker node
                    roots = [cluster.worker.pid]
                # a trial training in this segment, then a random moment
                while proc.poll() is None and not training_processes(*roots):
                    time.sleep(0.2)
                time.sleep(rng.uniform(0, a.max_delay))
                if proc.poll() is not None:
                    break
                todo.pop(0)
                ev = {"kind": kind, "segment": segment, "at_s": round(time.time() - t0, 1)}
                if kind == "worker":
                    workers = training_processes(*roots)
                    if not workers:
                        ev["note"] = "no trial training at that moment: retried"
                        todo.insert(0, kind)
                        continue
                    os.kill(workers[0], signal.SIGKILL)
                    ev["pid"] = workers[0]
                    if cluster:
                        ev["on"] = "head" if workers[0] in descendants(cluster.head.pid) else "worker node"
                    events.append(ev)
                    time.sleep(3)                      # let Tune notice before the next kill
                    continue
                if kind == "node":
                    ev["trials_training_there"] = len(training_processes(*roots))
                    ev["processes_killed"] = cluster.kill_worker()
                    events.append(ev)
                    if a.new_node_after >= 0:
                        time.sleep(a.new_node_after)
                        cluster.add_worker()
                        ev["new_node_at_s"] = round(time.time() - t0, 1)
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
    # what Tune saw: each kill that hit a trial is one failed trial task (retried up to --max-failures)
    failures = log.read_text(errors="replace").count("Trial task failed for trial")
    return {"exit": rc, "wall_s": round(time.time() - t0, 1), "segments": segment, "kills": events,
            "missed": todo, "tune_trial_task_failures": failures}


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
        failed = trials[trials["status"] == "failed"]
        c["failed_without_cause"] = int((failed["error"].fillna("").str.strip() == "").sum()) if len(failed) else 0
        c["failed_causes"] = [str(e).splitlines()[0][:200] for e in failed.get("error", [])]
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


def accounted(c: dict, planned: int) -> list[str]:
    """What is wrong with one sweep's stores on their own: every planned trial once in the table, finished
    (or stopped) or failed with its cause, with one MLflow trial run and one Optuna trial, nothing RUNNING."""
    bad = []
    if c.get("table_rows") != planned or c.get("table_unique_trials") != planned:
        bad.append(f"trials.parquet holds {c.get('table_rows')} rows ({c.get('table_unique_trials')} unique), "
                   f"planned {planned}")
    if set(c.get("table_status", {})) - {"finished", "stopped", "failed"}:
        bad.append(f"trials.parquet statuses {c.get('table_status')}")
    if c.get("failed_without_cause"):
        bad.append(f"{c['failed_without_cause']} failed trial(s) without a cause")
    if c["mlflow_runs"].get("trial") != planned or c["mlflow_trial_ids_unique"] != planned:
        bad.append(f"MLflow holds {c['mlflow_runs'].get('trial')} trial runs ({c['mlflow_trial_ids_unique']} ids)")
    if c["mlflow_status"].get("RUNNING"):
        bad.append(f"{c['mlflow_status']['RUNNING']} MLflow run(s) RUNNING")
    optuna_trials = sum(sum(v.values()) for v in c["optuna"].values())
    if optuna_trials != planned or any("RUNNING" in v for v in c["optuna"].values()):
        bad.append(f"Optuna studies {c['optuna']}")
    return bad


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    kills = parse_kills(a.kills or DEFAULT_KILLS[a.nodes], a.nodes)
    rng = random.Random(a.seed)
    if not a.in_order:
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
    def on_cluster(what):
        """``what(cluster)`` on a fresh 2-node cluster (--nodes 2), stopped afterwards; else ``what(None)``."""
        if a.nodes == 1:
            return what(None)
        cluster = LoopbackCluster(root, a.node_cpus, env)
        print(f"[chaos]   2-node Ray cluster on {cluster.address}: head pid {cluster.head.pid}, worker node pid "
              f"{cluster.worker.pid}, {a.node_cpus} CPU(s) each", flush=True)
        try:
            return what(cluster)
        finally:
            cluster.shutdown()

    if reuse:
        calm = json.loads(calm_file.read_text())
        print(f"[chaos] undisturbed sweep: reused {root / 'calm'} ({calm['wall_s']} s)", flush=True)
    else:
        print(f"[chaos] undisturbed sweep -> {root / 'calm'}", flush=True)
        calm = {**on_cluster(lambda c: calm_run(a, root / "calm", space, env, c)), "args": sweep_key(a)}
        calm_file.write_text(json.dumps(calm))
        print(f"[chaos]   exit {calm['exit']}, {calm['wall_s']} s", flush=True)
    print(f"[chaos] sweep under {len(kills)} kills ({', '.join(kills)}) -> {root / 'chaos'}", flush=True)
    chaos = on_cluster(lambda c: chaos_run(a, root / "chaos", space, env, kills, rng, c))
    for ev in chaos["kills"]:
        print(f"[chaos]   {json.dumps(ev)}", flush=True)
    print(f"[chaos]   exit {chaos['exit']}, {chaos['wall_s']} s over {chaos['segments']} segment(s)", flush=True)
    counts = {"calm": count_stores(root / "calm"), "chaos": count_stores(root / "chaos")}
    diff = {k: {"calm": counts["calm"].get(k), "chaos": counts["chaos"].get(k)} for k in COMPARED
            if counts["calm"].get(k) != counts["chaos"].get(k)}
    running = counts["chaos"]["mlflow_status"].get("RUNNING", 0)
    planned = len(a.targets.split()) * a.trials_per_target
    problems = {k: accounted(counts[k], planned) for k in counts}
    landed = Counter(ev["kind"] for ev in chaos["kills"] if ev["kind"] in KINDS)
    print(f"[chaos] kills landed per kind: {dict(landed)}; missed (the sweep ended first): {chaos['missed']}; "
          f"trial task failures Tune logged: {chaos['tune_trial_task_failures']}")
    for k in COMPARED + ("mlflow_checkpoint_models",):
        print(f"[chaos] {k:34s} calm {json.dumps(counts['calm'].get(k))}   chaos {json.dumps(counts['chaos'].get(k))}")
    print(f"[chaos] wall time: undisturbed {calm['wall_s']} s, chaos {chaos['wall_s']} s "
          f"({chaos['wall_s'] / max(calm['wall_s'], 1e-9):.2f}x)")
    for k in ("failed_causes",):
        print(f"[chaos] {k:34s} calm {json.dumps(counts['calm'].get(k))}   chaos {json.dumps(counts['chaos'].get(k))}")
    for k, bad in problems.items():
        print(f"[chaos] {k} sweep: " + ("every trial accounted for (once in the table, finished or failed with its "
                                        "cause, one MLflow run, one Optuna trial; nothing RUNNING)" if not bad else
                                        "NOT ACCOUNTED: " + "; ".join(bad)))
    ok = calm["exit"] == 0 and chaos["exit"] == 0 and not diff and not running and not any(problems.values())
    print(f"[chaos] {'every store agrees with the undisturbed run' if not diff else 'MISMATCH: ' + json.dumps(diff)}")
    if a.report:
        Path(a.report).write_text(json.dumps({"calm": calm, "chaos": chaos, "counts": counts, "diff": diff,
                                              "problems": problems, "ok": ok}, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
