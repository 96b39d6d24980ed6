"""What the sweep's driver itself spends: wall and CPU seconds per phase, and its peak memory.

The driver should only plan and record (on the KubeRay layout its head node has no GPU and no
trial CPUs), so its costs per trial are what limits how many targets one sweep can hold. Each
phase (the Tuner's making or restoring, Tune's loop, the MLflow callback's writes, the tables,
the fresh re-evaluations) adds up here; the sweep writes them to ``OUT/driver_costs.json`` at its
end, where ``benchmarks/sweep_scale.py`` reads them.
"""
from __future__ import annotations

import contextlib
import resource
import sys
import time
from pathlib import Path

from sfd.io import write_json

COSTS_FILE = "driver_costs.json"


class DriverCosts:
    """Wall and CPU (this process's user + system) seconds and call counts per named phase."""

    def __init__(self):
        self.phases: dict[str, dict] = {}
        self.t0, self.cpu0 = time.time(), time.process_time()

    @contextlib.contextmanager
    def phase(self, name: str):
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            p = self.phases.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0, "calls": 0})
            p["wall_s"] += time.perf_counter() - w
            p["cpu_s"] += time.process_time() - c
            p["calls"] += 1

    def snapshot(self) -> dict:
        """The phases so far, the process's CPU seconds since the start and its peak RSS in MiB."""
        # ru_maxrss: KiB on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10)
        return {"wall_s": round(time.time() - self.t0, 3), "cpu_s": round(time.process_time() - self.cpu0, 3),
                "peak_rss_mib": round(peak, 1),
                "phases": {k: {"wall_s": round(v["wall_s"], 3), "cpu_s": round(v["cpu_s"], 3), "calls": v["calls"]}
                           for k, v in self.phases.items()}}

    def write(self, out: Path, name: str = COSTS_FILE, **extra) -> None:
        write_json(Path(out) / name, {**self.snapshot(), **extra})


# one driver per process: the sweep's phases add up in this one
COSTS = DriverCosts()
