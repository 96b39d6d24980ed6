"""Plots: UA / FD against kimg for a run, Pareto fronts for a sweep."""
from __future__ import annotations

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
