"""Plots: UA / FD against kimg for a run, Pareto fronts for a sweep, methods side by side."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..io import atomic_path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_history(history: list[dict], path, title: str = "") -> None:
    """UA and remaining-class FD (with the teacher's FD as a dashed line) against kimg."""
    rows = [h for h in history if "ua" in h]
    if not rows:
        return
    plt = _plt()
    kimg = [h["kimg"] for h in rows]
    fig, ax1 = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax1.plot(kimg, [h["ua"] for h in rows], color="tab:orange", marker="o", ms=3, label="UA")
    ax1.set_xlabel("kimg (generator images)")
    ax1.set_ylabel("UA", color="tab:orange")
    ax1.set_ylim(-0.02, 1.02)
    ax2 = ax1.twinx()
    ax2.plot(kimg, [h["fd_remaining"] for h in rows], color="tab:blue", marker="o", ms=3, label="FD remaining")
    ax2.axhline(rows[0]["fd_remaining_teacher"], color="tab:blue", ls="--", lw=1, label="teacher FD")
    ax2.set_yscale("log")
    ax2.set_ylabel("FD over remaining classes", color="tab:blue")
    lines = ax1.get_lines() + ax2.get_lines()
    ax1.legend(lines, [ln.get_label() for ln in lines], loc="center right", fontsize=8)
    ax1.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_pareto(points: list[dict], path, title: str = "", front_ids=(), best_id=None, ua_threshold=None):
    """Trials in the (FD ratio, UA) plane: every trial grey, the Pareto front's trials ringed in
    blue and joined in FD order, the baseline a green square, the chosen trial a red star.

    Returns the (closed) Figure; its artists carry gids ``trials``, ``pareto-front``,
    ``pareto-front-line``, ``baseline`` and ``best`` so a check can read what was drawn."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 4.0), dpi=110)
    ax.scatter([p["fd_ratio"] for p in points], [p["ua"] for p in points], c="lightgray", edgecolors="gray",
               label="trials", zorder=2, gid="trials")
    front = sorted((p["fd_ratio"], p["ua"]) for p in points if p["trial_id"] in set(front_ids))
    if front:
        # the front is over three objectives (UA, FD ratio, override FD ratio); its trials are
        # ringed (visible under the star and the square too) and joined in FD order
        ax.plot(*zip(*front), color="tab:blue", lw=1, alpha=0.6, zorder=3, gid="pareto-front-line")
        ax.scatter(*zip(*front), facecolors="none", edgecolors="tab:blue", s=180, linewidths=2, zorder=5,
                   label=f"Pareto front ({len(front)}: UA, FD, override FD)", gid="pareto-front")
    if ua_threshold is not None:
        ax.axhline(ua_threshold, color="gray", ls="--", lw=1, label=f"UA threshold {ua_threshold}")
    base = [p for p in points if p.get("baseline")]
    if base:
        ax.scatter([base[0]["fd_ratio"]], [base[0]["ua"]], marker="s", color="tab:green", s=60, label="baseline",
                   zorder=4, gid="baseline")
    best = [p for p in points if p["trial_id"] == best_id]
    if best:
        ax.scatter([best[0]["fd_ratio"]], [best[0]["ua"]], marker="*", color="tab:red", s=160, label="best",
                   zorder=6, gid="best")
    ax.set_xlabel("FD ratio to teacher (remaining classes, lower is better)")
    ax.set_ylabel("UA (higher is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return fig


def plot_methods(points: list[dict], path, title: str = "", ua_threshold=None):
    """Methods side by side on one preset: each (target, method) pick a small dot in its method's
    colour, each method's median a large ringed marker. Left: forgetting against quality (FD ratio to
    the teacher on the remaining classes, log scale, lower is better; UA, higher is better). Right:
    forgetting against cost (images per second of the method's sampler, log scale, higher is better).

    ``points``: dicts with ``method``, ``ua``, ``fd_ratio`` and ``images_per_second_generator``
    (non-finite values are left out). Returns the (closed) Figure; the artists carry gids
    ``<method>-picks-<panel>`` and ``<method>-median-<panel>`` (panel ``quality`` or ``cost``)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.0), dpi=110, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(p["method"] for p in points))
    for i, method in enumerate(methods):
        colour = colours[i % len(colours)]
        mine = [p for p in points if p["method"] == method]
        for ax, key, panel in ((axes[0], "fd_ratio", "quality"), (axes[1], "images_per_second_generator", "cost")):
            pts = [(float(p[key]), float(p["ua"])) for p in mine
                   if math.isfinite(float(p[key])) and math.isfinite(float(p["ua"])) and float(p[key]) > 0]
            if not pts:
                continue
            ax.scatter(*zip(*pts), color=colour, s=18, alpha=0.6, zorder=3, gid=f"{method}-picks-{panel}")
            med = (statistics.median(x for x, _ in pts), statistics.median(y for _, y in pts))
            ax.scatter([med[0]], [med[1]], color=colour, edgecolors="black", s=160, linewidths=1.5, zorder=5,
                       label=f"{method} (median of {len(pts)})", gid=f"{method}-median-{panel}")
    from matplotlib.ticker import FuncFormatter
    for ax in axes:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
        if ua_threshold is not None:
            ax.axhline(ua_threshold, color="gray", ls="--", lw=1)
    axes[0].set_xlabel("FD ratio to teacher (remaining classes, lower is better)")
    axes[1].set_xlabel("images/s of the method's sampler (higher is better)")
    axes[0].set_ylabel("UA (higher is better)" + (f"; dashed: {ua_threshold}" if ua_threshold is not None else ""))
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return fig
