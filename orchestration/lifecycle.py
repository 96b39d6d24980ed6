"""What a sweep's driver holds open while it runs, each as a context manager of its own: the
signal handlers (SIGINT/SIGTERM end the sweep cleanly), the sweep's record file (``OUT/sweep.json``)
and the Ray instance. Each one leaves things as the sweep ended: ``Outcome`` says how.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

from sfd.io import write_json

SWEEP_FILE = "sweep.json"


class Interrupted(Exception):
    """SIGINT / SIGTERM outside Ray Tune's loop (or a second one inside it)."""


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
    the trials); elsewhere, or on a second signal, :class:`Interrupted` unwinds the driver through
    its clean-up. :attr:`signum` is the signal that came (exit code 128 + signum), None if none."""

    def __init__(self):
        self.signum: int | None = None
        self.in_tune = False

    @property
    def caught(self) -> bool:
        return self.signum is not None

    def _handler(self, signum, frame):
        first = self.signum is None
        if first:
            self.signum = signum
        name = signal.Signals(signum).name
        if first and self.in_tune:
            print(f"\n[sweep] {name}: stopping the sweep (running trials are cut off; finished ones are kept; "
                  f"continue with --resume)", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        raise Interrupted(name)

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


@contextlib.contextmanager
def sweep_record(out: Path, record: dict, outcome: Outcome, **running):
    """``OUT/sweep.json``: written ``running`` (with ``running``'s facts: the MLflow run, the storage,
    the Tune experiment) when the sweep starts, and with its final status however it ends, so
    ``--resume`` knows what it continues."""
    record.update(running, status="running")
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
    try:
        signals.install()
        yield ray
    finally:
        ray.shutdown()
