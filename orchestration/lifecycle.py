"""What a sweep's driver holds open while it runs, each as a context manager of its own: the
signal handlers (SIGINT/SIGTERM end the sweep cleanly), the sweep's record file (``OUT/sweep.json``)
and the Ray instance. Each one leaves things as the sweep ended: ``Outcome`` says how.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from sfd.io import write_json

SWEEP_FILE = "sweep.json"


class Interrupted(BaseException):
    """SIGINT / SIGTERM outside Ray Tune's loop (or a second one inside it). A BaseException, as
    KeyboardInterrupt is: Tune's and Ray's ``except Exception`` must not wrap or swallow it."""


def interrupted_inside(e: BaseException) -> bool:
    """An error that an :class:`Interrupted` raised inside Ray's compiled code turned into: the handler
    runs in ``ray.wait``'s signal check, and CPython reports the call as ``SystemError: ... returned a
    result with an exception set``, the Interrupted as its cause."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, Interrupted):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


class Outcome:
    """How the sweep ended: ``finished`` or ``interrupted`` as the driver sets it; ``failed`` until
    then, and whenever an exception other than :class:`Interrupted` ends it."""

    def __init__(self):
        self.status = "failed"

    def settle(self, exc: BaseException | None) -> str:
        if isinstance(exc, Interrupted):
            self.status = "interrupted"
        elif exc is not None:
            self.status = "failed"
        return self.status


class SignalGuard:
    """SIGINT and SIGTERM end the sweep cleanly. Inside Tune's loop (:meth:`tune_loop`) the first one
    asks Tune to stop (SIGUSR1, Tune's own graceful stop: it saves the experiment state, then stops
    the trials); elsewhere :class:`Interrupted` unwinds the driver through its clean-up.
    :attr:`signum` is the signal that came (exit code 128 + signum), None if none.

    A graceful stop needs Ray. A signal sent to the sweep's whole process group (``timeout``, a batch
    scheduler, a container stop) stops Ray's own processes too, and the driver's next call to Ray
    waits for a GCS that will not answer (Ray gives up after 60 s and exits 1, leaving every MLflow
    run RUNNING). So after the first signal a watch thread follows Ray's processes: once one of them
    has ended (or Tune has not stopped within :attr:`GRACE_S`), the sweep is *abandoned*: the
    :attr:`abandon` hook writes what the driver knows without Ray (tables, MLflow runs KILLED, the
    record), Ray's processes are stopped, and the process exits 128 + signum.

    A second signal inside Tune's loop stops waiting for Tune (:class:`Interrupted`: the driver
    writes the tables from what it holds and ends its runs); elsewhere the clean-up under way is
    finished. A third signal, or one while the sweep is being abandoned, exits at once: every file
    the sweep writes is written atomically, so each is whole, old or new."""

    GRACE_S = 60.0        # a graceful stop still going after this long (Ray alive but stuck) is abandoned
    ABANDON_S = 60.0      # the abandoning's own bound: past it the process exits regardless

    def __init__(self):
        self.signum: int | None = None
        self.in_tune = False
        self.abandon: Callable[[int], None] | None = None     # the Ray-free clean-up (run_sweep sets it)
        self.ray_down: Callable[[], list[str]] = list          # Ray's own processes that ended (ray_session)
        self.ray_stop: Callable[[], None] = lambda: None       # stop them, without the GCS (ray_session)
        self.count = 0                 # signals so far
        self._abandoning = threading.Lock()
        self._watching = False

    @property
    def caught(self) -> bool:
        return self.signum is not None

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        self.count += 1
        if self.signum is None:
            self.signum = signum
            if self.in_tune:
                print(f"\n[sweep] {name}: stopping the sweep (running trials are cut off; finished ones are kept; "
                      f"continue with --resume)", file=sys.stderr, flush=True)
                self._watch()
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            self._watch()
            raise Interrupted(name)
        if self.count >= 3 or self._abandoning.locked():
            self._exit_now(name)
        if self.in_tune or self.abandon is None:
            print(f"\n[sweep] {name} again: not waiting for Tune; writing the tables from what finished "
                  f"(another signal exits at once)", file=sys.stderr, flush=True)
            raise Interrupted(name)
        print(f"\n[sweep] {name} again: finishing the tables and MLflow runs (seconds; another signal exits at once)",
              file=sys.stderr, flush=True)

    def _exit_now(self, name: str) -> None:
        print(f"\n[sweep] {name} again: exiting now; the tables are as last written (each whole), runs left "
              f"RUNNING are marked KILLED by the next --resume", file=sys.stderr, flush=True)
        os._exit(128 + (self.signum or signal.SIGINT))

    def _watch(self) -> None:
        """After the first signal: abandon the sweep once Ray's own processes end, or a graceful stop
        inside Tune takes longer than GRACE_S."""
        if self._watching:
            return
        self._watching = True

        def loop():
            t0 = time.monotonic()
            while True:
                dead = self.ray_down()
                if dead:
                    return self._abandon(f"Ray's own processes were stopped too ({', '.join(dead)})")
                if self.in_tune and time.monotonic() - t0 > self.GRACE_S:
                    return self._abandon(f"Tune did not stop within {self.GRACE_S:.0f} s")
                time.sleep(0.2)

        threading.Thread(target=loop, name="sweep-signal-watch", daemon=True).start()

    def _abandon(self, why: str) -> None:
        """Write what the driver knows without Ray (bounded by ABANDON_S), stop Ray's processes, exit
        128 + signum. Runs in the watch thread, never in the main one: a handler suspends the main thread
        wherever it was (inside an import, an MLflow write), and work that waited for what it holds
        would wait forever."""
        code = 128 + (self.signum or signal.SIGINT)
        if not self._abandoning.acquire(blocking=False):
            return
        print(f"\n[sweep] {why}: not waiting for Ray; writing what finished and exiting "
              f"(another signal exits at once)", file=sys.stderr, flush=True)
        worker = threading.Thread(target=self._abandon_work, name="sweep-abandon", daemon=True)    # bounded
        worker.start()
        worker.join(self.ABANDON_S)
        if worker.is_alive():
            print(f"[sweep] the clean-up did not finish within {self.ABANDON_S:.0f} s; exiting (the next --resume "
                  f"marks runs left RUNNING KILLED)", file=sys.stderr, flush=True)
        try:
            self.ray_stop()
        except Exception as e:                    # exiting anyway: say what is left behind
            print(f"[sweep] could not stop Ray's processes: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def _abandon_work(self) -> None:
        try:
            if self.abandon is not None:
                self.abandon(self.signum or signal.SIGINT)
        except BaseException as e:               # reported, and the exit code stays 128 + signum
            print(f"[sweep] clean-up failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def install(self) -> None:
        """(Again after ``ray.init``, which installs its own SIGTERM handler: it aborts.)"""
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"        # one handler for both signals: this one
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def __enter__(self) -> SignalGuard:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.in_tune = False          # the handlers stay: a signal while the tables print still ends cleanly

    @contextlib.contextmanager
    def tune_loop(self):
        """Around ``Tuner.fit()``: the first signal becomes Tune's graceful stop."""
        signal.signal(signal.SIGUSR1, lambda *_: None)     # until Tune installs its own stop handler
        self.in_tune = True
        try:
            yield
        finally:
            self.in_tune = False


def write_record(out: Path, rec: dict) -> None:
    write_json(Path(out) / SWEEP_FILE, rec)


# -- the driver of a sweep, and what a later command does about one that died ------------------------

def _process_start(pid: int) -> str | None:
    """When the process started, as the kernel says (Linux: boot id and start tick), so that a later
    process given the same pid is not taken for it; None where /proc has no such file."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return None


def driver_identity() -> dict:
    """This process as the driver a sweep record names: host, pid, start."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid())}


def driver_state(record: dict) -> str:
    """Whether the driver of a sweep whose record says ``running`` still runs: ``alive``, ``dead``, or
    ``unknown`` (it ran on another host, or the record is from before drivers were recorded).
    ``ended`` for a record that does not say ``running``."""
    if record.get("status") != "running":
        return "ended"
    d = record.get("driver") or {}
    if d.get("host") != socket.gethostname() or not isinstance(d.get("pid"), int):
        return "unknown"
    try:
        os.kill(d["pid"], 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:          # a process of another user holds the pid: not this sweep's driver
        return "dead"
    try:
        if Path(f"/proc/{d['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return "dead"            # killed, not yet reaped by its parent
    except (OSError, IndexError):
        pass
    now = _process_start(d["pid"])
    return "dead" if d.get("started") and now and now != d["started"] else "alive"


def folder_record(path: Path, kind: str) -> dict | None:
    """The record a sweep or a chain keeps in its folder (``kind`` "sfd-sweep", "sfd-sequential"), None
    where there is none; a record that is damaged or of another kind raises ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        if not isinstance(rec, dict) or rec.get("kind") != kind:
            raise ValueError(f"not a {kind} record")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is corrupted ({e}) — restore it, or start over with --overwrite (the old folder "
                         f"is moved aside, not deleted)") from None
    return rec


def read_record(out: Path) -> dict | None:
    """``OUT/sweep.json`` as written, or None (none there, or not a sweep's record: the callers that
    need one say so)."""
    try:
        rec = json.loads((Path(out) / SWEEP_FILE).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("kind") == "sfd-sweep" else None


def refuse_live_driver(out: Path, record: dict | None, what: str) -> None:
    """A command that would change a sweep's folder (``--resume``, ``--overwrite``, ``--summarize-only``)
    is refused while the sweep's driver still runs on this host: two drivers would write the same
    tables and MLflow runs, and the live one's runs are not a dead driver's to mark KILLED."""
    if record is None or driver_state(record) != "alive":
        return
    pid = record["driver"]["pid"]
    raise ValueError(f"{what}: the sweep in {out} is still running (its driver is pid {pid} on this host) — wait "
                     f"for it to end, or stop it (Ctrl-C in its terminal, or kill -TERM {pid}) and run this again")


def settle_dead_driver(out: Path, record: dict | None, experiment: str = "sfd-sweep") -> str | None:
    """A sweep whose record says ``running`` but whose driver is gone (kill -9, a lost node, a power cut)
    left its MLflow runs RUNNING: they are marked KILLED (trials ``cut_off``, targets and the sweep
    ``interrupted``) and the record ``interrupted``, so the tracking store says what happened. Returns
    the one line to print, or None when there was nothing to settle. A driver on another host cannot be
    seen from here: its runs are left as they are, and the line says so. The Optuna trials it left
    RUNNING are left for ``--resume`` (which continues them with their Tune trials)."""
    if record is None:
        return None
    state = driver_state(record)
    if state in ("ended", "alive"):
        return None
    if state == "unknown":
        d = record.get("driver") or {}
        where = f"pid {d['pid']} on host {d.get('host')}" if d.get("pid") else "a driver not recorded"
        return (f"[sweep] note: {out / SWEEP_FILE} says the sweep is running ({where}), which cannot be checked "
                f"from here: its MLflow runs are left as they are (--resume continues it and ends them)")
    from orchestration.tracking import MLflowSweep, left_running_line
    counts = {"sweep": 0, "target": 0, "trial": 0}
    if record.get("parent_run_id") and record.get("mlflow_uri"):
        try:
            tracker = MLflowSweep(record["mlflow_uri"], record.get("experiment") or experiment)
            tracker.adopt(record["parent_run_id"])
            counts = tracker.end_left_running()
        except Exception as e:          # MLflow's own, SQLAlchemy's, a server that does not answer: said, not hidden
            raise ValueError(f"the sweep's driver (pid {record['driver']['pid']}) is gone, but the MLflow runs it left "
                             f"RUNNING could not be marked KILLED in {record['mlflow_uri']} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300] if str(e) else ''}) — make the tracking store reachable "
                             f"and run this again") from None
    record["status"] = "interrupted"
    write_record(out, record)
    pid = record["driver"]["pid"]
    if not any(counts.values()):
        return f"[sweep] the sweep's driver (pid {pid}) is gone; no MLflow run was left RUNNING"
    return (f"[sweep] the sweep's driver (pid {pid}) is gone: {left_running_line(counts)}; "
            f"continue the sweep with --resume")


@contextlib.contextmanager
def sweep_record(out: Path, record: dict, outcome: Outcome, **running):
    """``OUT/sweep.json``: written ``running`` (with ``running``'s facts: the MLflow run, the storage,
    the Tune experiment) when the sweep starts, and with its final status however it ends, so
    ``--resume`` knows what it continues."""
    record.update(running, status="running", driver=driver_identity())
    write_record(out, record)
    try:
        yield record
    except BaseException as e:
        outcome.settle(e)
        raise
    finally:
        record["status"] = outcome.status
        write_record(out, record)


@contextlib.contextmanager
def ray_session(a, runtime_env: dict, signals: SignalGuard):
    """Ray for the sweep: the cluster of ``--address`` joined, or a local instance started; shut
    down when the sweep ends."""
    import ray
    if a.address:
        ray.init(address=a.address, log_to_driver=a.verbose, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=a.verbose,
                 logging_level="INFO" if a.verbose else "WARNING", runtime_env=runtime_env)
    node = ray._private.worker._global_node      # the processes this driver started (none when joining)
    closing = False

    def down() -> list[str]:
        return [] if closing or node is None else sorted({kind for kind, _ in node.dead_processes()})

    def stop() -> None:
        if node is not None:     # SIGKILL: a graceful ray.shutdown() would wait on the dead GCS
            node.kill_all_processes(check_alive=False, allow_graceful=False)
    signals.ray_down, signals.ray_stop = down, stop
    try:
        signals.install()
        yield ray
    finally:
        closing = True                   # processes ending now are ray.shutdown's doing
        ray.shutdown()
