#!/usr/bin/env python
"""Open a sweep's MLflow store in a real browser, as a user does, and check what it shows first.

    python orchestration/mlflow_ui_check.py runs/sweep --screenshot docs/img/mlflow-runs.png

Starts `mlflow ui` on the sweep's store (OUT/mlflow.db) on a free loopback port, loads the runs-table
URL the sweep prints (and, with --bare, the experiment's bare URL, which MLflow 3.17 opens on its
GenAI overview) in headless Chromium (Debian's `chromium` package), and fails unless the page holds
the sweep's parent run, not the GenAI overview, with the headline figures' columns on screen. A manual
check, not a CI test: it needs Chromium and ~1 minute.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium(url: str, screenshot: Path | None, budget_ms: int = 15000) -> str:
    """The page's DOM after ``budget_ms`` of virtual time (a fresh profile: no remembered choices)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise SystemExit("mlflow_ui_check.py: error: no chromium on PATH — install it (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:
        base = [exe, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                "--window-size=1600,1000", f"--virtual-time-budget={budget_ms}"]
        if screenshot:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=180, check=True)
        return subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180,
                              check=True).stdout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="orchestration/mlflow_ui_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the sweep's output folder (its mlflow.db)")
    p.add_argument("--experiment", default="sfd-sweep")
    p.add_argument("--screenshot", type=Path, help="save what the runs-table URL shows (PNG)")
    p.add_argument("--bare", type=Path, help="also screenshot the experiment's bare URL #/experiments/<id>")
    a = p.parse_args(argv)
    db = Path(a.out).resolve() / "mlflow.db"
    if not db.is_file():
        raise SystemExit(f"mlflow_ui_check.py: error: {db} does not exist — give a sweep's --out folder")
    from orchestration.tracking import MLflowSweep
    uri = f"sqlite:///{db}"
    tracker = MLflowSweep(uri, a.experiment)
    parents = tracker.client.search_runs([tracker.experiment_id], "tags.kind = 'sweep'")
    if not parents:
        raise SystemExit(f"mlflow_ui_check.py: error: no sweep run in experiment {a.experiment!r} of {db}")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ui = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(ui + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("mlflow_ui_check.py: error: `mlflow ui` did not answer within 120 s") from None
                time.sleep(1)
        if a.bare:
            chromium(f"{ui}/#/experiments/{tracker.experiment_id}", a.bare)
        url = tracker.runs_view_url(ui)
        dom = chromium(url, a.screenshot)
    finally:
        server.terminate()
        server.wait(timeout=30)
    name = parents[0].info.run_name
    table = name[:12] in dom and "Token Usage" not in dom
    # the grid renders the columns on screen only: the headline's column is in the page when the shared view
    # put it first (without the view it sits off-screen, behind the default columns)
    headline = "min_best_ua" in dom
    print(f"{url}: {'the runs table with' if table else 'NOT the runs table with'} the sweep's run {name}, "
          f"{'with' if headline else 'WITHOUT'} its headline columns on screen")
    return 0 if table and headline else 1


if __name__ == "__main__":
    sys.exit(main())
