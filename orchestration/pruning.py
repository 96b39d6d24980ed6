"""Early stopping per target: asynchronous successive halving (ASHA) with one set of rungs per target.

Ray Tune's own ASHA (`ray.tune.schedulers.ASHAScheduler`) keeps one set of rungs for every trial of the
experiment, so in a sweep over many targets a trial of one target would be stopped by comparison with
another target's trials (another digit forgets faster or keeps a lower FD ratio for reasons that have
nothing to do with the configuration). `PerTargetHalving` keeps one set of rungs per target (a trial's
``config["target"]``, which names the target and its method), with the same rule as ASHA:

- rungs at ``grace_kimg * eta**k`` kimg, up to half the trial's budget (a rung later than that saves
  little: the trial is nearly done);
- when a trial's first report at or past a rung arrives, its *rung score* is recorded in its target's
  rung, and the trial continues only if that score is within the best ``1/eta`` of the scores its
  target's trials have recorded at that rung so far (itself included; the first trial at a rung always
  continues);
- the baseline trial (the project's default configuration) is never stopped: it is the reference the
  fresh re-evaluation compares the search's pick against, and its scores stay in the rungs, so a
  searched trial continues only while it keeps up with the defaults.

The rung score is lower-is-better and follows the sweep's selection rule and the Optuna studies'
constraint: the remaining-class FD ratio, scaled up by the UA shortfall below the threshold,
``fd_ratio * (1 + 10 * max(0, ua_threshold - ua))`` (a trial that forgets slowly and one that damages
the other classes both fall behind). The overridden class's FD ratio is left out: early in a trial it
is still in its forgetting transient (10-30x at 2 kimg for the defaults) and says little about the end.

The rungs and the reasons are kept in a JSON file (``OUT/early_stop.json``, written atomically after
every record), so a resumed sweep (`--resume`) compares its trials with the scores recorded before
the interruption, and a trial cut off and resumed past a rung is not recorded twice.

This module imports nothing heavy: `orchestration/sweep.py` wraps it in a Tune `TrialScheduler`.
"""
from __future__ import annotations

import math
from pathlib import Path

from sfd.io import read_json, write_json

# the UA shortfall's weight in the rung score: 0.05 below the threshold counts as a 50 % higher FD ratio
UA_WEIGHT = 10.0


def rung_score(result: dict, ua_threshold: float) -> float:
    """A report's score at a rung (lower is better); +inf when it has no finite UA or FD ratio."""
    try:
        ua, fd = float(result["ua"]), float(result["fd_ratio"])
    except (KeyError, TypeError, ValueError):
        return math.inf
    if not (math.isfinite(ua) and math.isfinite(fd)):
        return math.inf
    return fd * (1.0 + UA_WEIGHT * max(0.0, ua_threshold - ua))


def milestones(grace_kimg: float, eta: float, budget_kimg: float) -> list[float]:
    """The rungs in kimg: grace, grace*eta, ... up to half the budget (at least the grace rung when it
    lies inside the budget)."""
    if grace_kimg <= 0 or budget_kimg <= grace_kimg:
        return []
    out, m = [], float(grace_kimg)
    while m <= budget_kimg / 2 or not out:
        out.append(round(m, 6))
        m *= eta
    return out


def _quantile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation (numpy's default), over the finite values; +inf
    when none is finite."""
    v = sorted(x for x in values if math.isfinite(x))
    if not v:
        return math.inf
    pos = q * (len(v) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


class PerTargetHalving:
    """ASHA with one set of rungs per target (see the module's text). ``path``: where its state is kept
    (loaded when the file exists, e.g. by a resumed sweep)."""

    def __init__(self, grace_kimg: float, eta: float, ua_threshold: float, path: str | Path | None = None):
        if not (math.isfinite(grace_kimg) and grace_kimg > 0):
            raise ValueError(f"grace {grace_kimg!r} kimg is invalid — give a positive number of kimg")
        if not (math.isfinite(eta) and eta > 1):
            raise ValueError(f"reduction factor {eta!r} is invalid — give a number > 1 (3 keeps the best third)")
        self.grace_kimg, self.eta, self.ua_threshold = float(grace_kimg), float(eta), float(ua_threshold)
        self.path = Path(path) if path is not None else None
        # target -> rung (kimg, as text: JSON keys) -> trial id -> score
        self.rungs: dict[str, dict[str, dict[str, float]]] = {}
        self.pruned: dict[str, str] = {}          # trial id -> why it was stopped
        self.pruned_kimg: dict[str, float] = {}   # trial id -> the kimg it was stopped at
        if self.path is not None and self.path.is_file():
            self._load()

    # persistence ---------------------------------------------------------------------------------
    def _load(self) -> None:
        state = read_json(self.path)
        same = (state.get("grace_kimg"), state.get("eta")) == (self.grace_kimg, self.eta)
        if not same:
            raise ValueError(f"{self.path} holds early-stopping rungs of grace {state.get('grace_kimg')} kimg and "
                             f"reduction factor {state.get('eta')}, not {self.grace_kimg} and {self.eta} — resume "
                             f"with the sweep's own --grace-kimg / --reduction-factor")
        self.rungs = {t: {m: {k: float(v) for k, v in s.items()} for m, s in r.items()}
                      for t, r in state.get("rungs", {}).items()}
        self.pruned = dict(state.get("pruned", {}))
        self.pruned_kimg = {k: float(v) for k, v in state.get("pruned_kimg", {}).items()}

    def _save(self) -> None:
        if self.path is not None:
            write_json(self.path, {"grace_kimg": self.grace_kimg, "eta": self.eta, "rungs": self.rungs,
                                   "pruned": self.pruned, "pruned_kimg": self.pruned_kimg})

    # the decision --------------------------------------------------------------------------------
    def on_result(self, trial_id: str, target: str, baseline: bool, budget_kimg: float, result: dict) -> str | None:
        """Record the report's score at every rung it reached for the first time; returns why the trial
        stops (it fell outside the best 1/eta of its target's trials at a rung), or None."""
        kimg = result.get("kimg")
        if not isinstance(kimg, (int, float)) or not math.isfinite(kimg) or "fd_ratio" not in result:
            return None                            # a checkpoint-only report: no figures to compare
        rungs = self.rungs.setdefault(target, {})
        score = rung_score(result, self.ua_threshold)
        why, changed = None, False
        for m in milestones(self.grace_kimg, self.eta, budget_kimg):
            # a report up to 1 % short of the rung counts: kimg is counted in whole iterations
            if kimg < m * 0.99:
                break
            rung = rungs.setdefault(f"{m:g}", {})
            if trial_id in rung:
                continue                           # recorded before (a resumed trial reports again)
            rung[trial_id] = score
            changed = True
            if baseline or why is not None:
                continue
            cutoff = _quantile(list(rung.values()), 1.0 / self.eta)
            if score > cutoff:
                others = len(rung) - 1
                why = (f"early stop at the {m:g}-kimg rung of {target}: score {score:.3f} (FD ratio "
                       f"{float(result['fd_ratio']):.2f}, UA {float(result['ua']):.3f}) outside the best "
                       f"1/{self.eta:g} of its {others + 1} trials there (cutoff {cutoff:.3f})")
        if why is not None:
            self.pruned[trial_id] = why
            self.pruned_kimg[trial_id] = float(kimg)
        if changed:
            self._save()
        return why
