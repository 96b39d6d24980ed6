"""benchmarks/capacity.py: k targets forgotten jointly and as a chain, one row per k and mode."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "capacity.py"
TINY = ["--budget-kimg", "0.064", "--batch-remain", "8", "--batch-forget", "8", "--eval-forget-samples", "40",
        "--eval-remain-per-class", "5", "--device", "cpu"]


def capacity(*args, cwd=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


@pytest.mark.slow
def test_capacity_k2_both_modes(tmp_path):
    out = tmp_path / "cap"
    r = capacity("--k-max", "2", "--out", str(out), *TINY, cwd=tmp_path)     # from another folder, as a user
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "reduced budget" in r.stdout
    rows = list(csv.DictReader(open(out / "capacity.csv")))
    assert [(x["mode"], x["k"]) for x in rows] == [("sequential", "1"), ("joint", "1"),
                                                  ("sequential", "2"), ("joint", "2")]
    # k = 2: both modes forget 3 and 8 (overrides 'next': 4 and 9); the chain's stage 2 holds both targets
    for mode, run in (("sequential", out / "seq-k2"), ("joint", out / "joint-k2")):
        m = json.loads((run / "metrics.json").read_text())
        assert m["config"]["forget"] == [3, 8] and m["config"]["override"] == "4,9", mode
        per = m["ua_per_target"]
        row = next(x for x in rows if x["mode"] == mode and x["k"] == "2")
        assert float(row["ua_worst"]) == pytest.approx(min(per.values()))
        assert float(row["ua_mean"]) == pytest.approx(sum(per.values()) / 2)
        assert float(row["fd_ratio"]) == pytest.approx(m["fd_ratio"])
    chain = json.loads((out / "seq-k2" / "chain.json").read_text())
    assert chain["order"] == ["3", "8"] and chain["continues"] == str((out / "seq-k1").resolve())
    assert not (out / "joint-k2" / "chain.json").exists()                 # the joint run is no chain
    seq = [x for x in rows if x["mode"] == "sequential"]
    assert float(seq[1]["kimg_total"]) == pytest.approx(float(seq[0]["kimg"]) + float(seq[1]["kimg"]))
    data = json.loads((out / "capacity.json").read_text())
    assert data["budget_kimg_per_run"] == 0.064 and len(data["rows"]) == 4
    assert (out / "capacity.png").stat().st_size > 5000

    # finished runs are read back, not rerun
    again = capacity("--k-max", "2", "--out", str(out), *TINY)
    assert again.returncode == 0 and "sfd forget" not in again.stdout and again.stdout.count("(reused)") == 4


@pytest.mark.parametrize("args, words", [
    (["--k-max", "9"], "--k-max 9: give 1 to 8"),
    (["--preset", "digits", "--modes", "both"], "--modes both"),
    (["--budget-kimg", "0"], "--budget-kimg 0"),
])
def test_capacity_refuses_bad_settings_by_name(tmp_path, args, words):
    r = capacity(*args, "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and words in r.stderr and not (tmp_path / "x").exists()
