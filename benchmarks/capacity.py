#!/usr/bin/env python
"""Capacity: how many targets one generator can forget, jointly and one after another (issue 24).

    python benchmarks/capacity.py --preset digits --k-max 8 --budget-kimg 10 --out runs/capacity-digits
    python benchmarks/capacity.py --preset colordigits --k-max 3 --budget-kimg 3 --out runs/capacity-colordigits

For k = 1..K, with the first k targets of --order (override 'next'):
  joint       one `sfd forget` run forgetting the k targets, from the preset's start (digits: the bundled stage 1);
  sequential  stage k of one chain (`sfd forget --init-from <stage k-1>`) forgetting target k (docs/sequential.md).
Every run and every stage trains --budget-kimg: a REDUCED budget so the curve runs in minutes on 2 CPU cores (the
preset defaults are 40 kimg for digits, 12 for colordigits); stage k of a chain has trained k budgets in all.
Any other flag is passed to every `sfd forget` run (e.g. --seed 1 --eval-forget-samples 500).

Per k and mode: UA worst and mean over the forgotten targets (colordigits: also on held-out prompts), FD ratio and
accuracy on the remaining classes, the chain's largest rebound, training and wall seconds (sequential: the stage
and the chain so far). Writes OUT/capacity.csv, OUT/capacity.json and OUT/capacity.png after every k (a stopped
benchmark keeps what it measured); the runs are OUT/joint-k<k> and OUT/seq-k<k>. A run folder that already holds
metrics.json is read, not rerun (delete it to rerun).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

# isort: off  (the repo on sys.path before the project's imports when run as a script)
if __package__ in (None, ""):           # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# isort: on
from sfd.cli import main as sfd_main
from sfd.io import read_json, write_json

# the default orders: no target is the override ('next') of an earlier one, so every prefix is a valid chain and
# a valid joint run. digits: 3, 2, 1, 0 fall to 4 and 8, 7, 6, 5 to 9 (classes 4 and 9 remain at k = 8).
ORDERS = {"digits": "3,8,2,7,1,6,0,5", "colordigits": "seven,red,two,blue"}
MODES = ("sequential", "joint")
WALL_FILE = "capacity-wall.json"
COLUMNS = ("mode", "k", "targets", "overrides", "ua_worst", "ua_mean", "ua_heldout_worst", "fd_ratio",
           "remaining_accuracy", "rebound_max", "kimg", "kimg_total", "train_seconds", "train_seconds_total",
           "wall_seconds", "wall_seconds_total", "reused", "run")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="benchmarks/capacity.py", description=__doc__,
                                epilog="Other flags go to every `sfd forget` run.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="digits", help="a class preset or colordigits (default: digits)")
    p.add_argument("--order", default=None, help="targets to forget, in order, comma-separated (default: "
                   + "; ".join(f"{k}: {v}" for k, v in ORDERS.items()) + ")")
    p.add_argument("--k-max", type=int, default=None, help="largest k (default: every target of --order)")
    p.add_argument("--budget-kimg", type=float, default=10.0,
                   help="training budget of every run and every stage, in kimg: reduced from the preset's "
                        "default so the benchmark runs in minutes on a CPU (default: 10)")
    p.add_argument("--modes", default=",".join(MODES), help="sequential, joint or both (default: both)")
    p.add_argument("--out", required=True, help="folder for the runs, capacity.csv/.json and capacity.png")
    a, rest = p.parse_known_args(argv)
    order = [t.strip() for t in (a.order or ORDERS.get(a.preset, "")).split(",") if t.strip()]
    if not order:
        p.error(f"--order: preset '{a.preset}' has no default order; give the targets, e.g. --order 3,8,2")
    a.k_max = len(order) if a.k_max is None else a.k_max
    if not 1 <= a.k_max <= len(order):
        p.error(f"--k-max {a.k_max}: give 1 to {len(order)} (the targets of --order {','.join(order)}), "
                f"or a longer --order")
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in a.modes if m not in MODES]
    if bad or not a.modes:
        p.error(f"--modes {','.join(a.modes) or repr('')}: choose from {', '.join(MODES)}")
    if a.budget_kimg <= 0:
        p.error(f"--budget-kimg {a.budget_kimg}: give a positive number of kimg, e.g. 10")
    a.order, a.forget_args = order[:a.k_max], rest
    return a


def forget(a, out: Path, targets: list[str], init_from: Path | None) -> tuple[dict, float, bool]:
    """metrics.json of the `sfd forget` run in ``out`` (run now unless it finished before), its wall seconds, and
    whether it was reused."""
    if (out / "metrics.json").is_file():
        took = read_json(out / WALL_FILE) if (out / WALL_FILE).is_file() else {}
        return read_json(out / "metrics.json"), float(took.get("wall_seconds", float("nan"))), True
    b = f"{a.budget_kimg:g}"
    argv = ["forget", "--preset", a.preset, "--forget", ",".join(targets), "--override", "next",
            "--budget-kimg", b, "--eval-every-kimg", b, "--checkpoint-every-kimg", b, "--no-eval-at-start",
            "--no-progress", "--overwrite", "--out", str(out), *a.forget_args]
    if init_from is not None:
        argv += ["--init-from", str(init_from)]
    print(f"[capacity] sfd {' '.join(argv)}", flush=True)
    t0 = time.time()
    rc = sfd_main(argv)
    wall = time.time() - t0
    if rc != 0 or not (out / "metrics.json").is_file():
        raise SystemExit(f"capacity: `sfd {' '.join(argv)}` failed (exit {rc}); see its message above")
    write_json(out / WALL_FILE, {"wall_seconds": wall})      # so a reused run reports its time
    return read_json(out / "metrics.json"), wall, False


def row(mode: str, k: int, m: dict, wall: float, reused: bool, out: Path, before: dict | None) -> dict:
    per = m.get("ua_per_target") or {}
    if not per:
        raise SystemExit(f"capacity: {out}/metrics.json has no ua_per_target: the preset needs a judge "
                         f"(--classifier ...) for UA")
    held = m.get("ua_heldout_per_target") or {}
    cfg = m.get("config", {})
    order = [str(t) for t in (cfg.get("forget_concepts") or cfg.get("forget") or per)]     # in the order forgotten
    r = {"mode": mode, "k": k, "targets": " ".join(order), "overrides": str(cfg.get("override", "")),
         "ua_worst": min(per.values()), "ua_mean": statistics.fmean(per.values()),
         "ua_heldout_worst": min(held.values()) if held else None, "fd_ratio": m.get("fd_ratio"),
         "remaining_accuracy": m.get("remaining_accuracy"), "rebound_max": m.get("rebound_max"),
         "kimg": m.get("kimg"), "train_seconds": m.get("train_seconds"), "wall_seconds": wall, "reused": reused,
         "run": str(out)}
    for key in ("kimg", "train_seconds", "wall_seconds"):      # a chain's stage k stands on stages 1..k-1
        r[f"{key}_total"] = (before or {}).get(f"{key}_total", 0.0) + (r[key] or 0.0)
    return r


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = (("ua_worst", "UA, worst forgotten target"), ("fd_ratio", "FD ratio, remaining (1 = teacher)"),
              ("remaining_accuracy", "accuracy, remaining classes"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, label) in zip(axes, panels):
        for mode, style in zip(MODES, ("o-", "s--")):
            pts = [(r["k"], r[key]) for r in rows if r["mode"] == mode and r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=mode)
        ax.set_xlabel("k (targets forgotten)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(a, rows: list[dict], out: Path) -> None:
    with open(out / "capacity.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    write_json(out / "capacity.json", {"preset": a.preset, "order": a.order, "budget_kimg_per_run": a.budget_kimg,
                                       "forget_args": a.forget_args, "rows": rows})
    plot(rows, out / "capacity.png", f"{a.preset}: forget k of {','.join(a.order)} (override next), "
                                     f"{a.budget_kimg:g} kimg per run / stage (reduced budget)")


def run(a) -> list[dict]:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[capacity] {a.preset}: k = 1..{a.k_max} of {','.join(a.order)}, modes {', '.join(a.modes)}, "
          f"{a.budget_kimg:g} kimg per run and per stage (a reduced budget)", flush=True)
    rows, prev = [], None
    for k in range(1, a.k_max + 1):
        for mode in a.modes:
            if mode == "sequential":
                folder = out / f"seq-k{k}"
                m, wall, reused = forget(a, folder, [a.order[k - 1]], out / f"seq-k{k - 1}" if k > 1 else None)
                prev = row(mode, k, m, wall, reused, folder, prev)
                rows.append(prev)
            else:
                folder = out / f"joint-k{k}"
                m, wall, reused = forget(a, folder, a.order[:k], None)
                rows.append(row(mode, k, m, wall, reused, folder, None))
            r = rows[-1]
            print(f"[capacity] {mode} k={k}: UA worst {r['ua_worst']:.3f} mean {r['ua_mean']:.3f}, FD ratio "
                  f"{r['fd_ratio']:.3f}, remaining accuracy {r['remaining_accuracy']:.3f}, "
                  f"{r['wall_seconds']:.0f} s wall{' (reused)' if reused else ''}", flush=True)
        write(a, rows, out)
    print(f"[capacity] wrote {out / 'capacity.csv'}, {out / 'capacity.json'}, {out / 'capacity.png'}")
    return rows


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
