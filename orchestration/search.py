"""One independent Optuna study per target inside a single Ray Tune run.

Tune runs one search algorithm; `PerTargetSearch` holds an Optuna study per target (ask/tell)
and routes every trial to the study of its target, so targets never share a study while all
of them run in parallel within the cluster's resources. The project's default configuration
is each study's first point (the baseline trial).

Each study minimises two objectives -- the remaining-class FD ratio (quality) and the
overridden class's FD ratio (diversity: the search must never reward a collapse onto one
template) -- under one constraint, UA >= the sweep's threshold, which TPE's constraints
support handles: infeasible trials inform the model without being traded off against FD.

Targets are handed out one after the other (all of a target's trials before the next target's):
its trials then run close together, so the per-target early stopping (orchestration/pruning.py)
compares each with its own target's trials as they reach the same rung, and a target's study can
start from what worked on the targets before it. A trial stopped early is told PRUNED (with its
reason and kimg as user attributes), never COMPLETE with figures from part of its budget.

Warm starts (``warm_start`` > 0): the first searched trials of a target are the best completed
(full-budget, UA-feasible, not the baseline) configurations of the targets before it, lowest
remaining-class FD ratio first, one per trial, each enqueued in the study with its origin
(``warm_start_from`` = ``<target>#<Optuna trial number>``), which the trial's config carries into
trials.parquet and the summary. Only studies searching the same parameters lend configurations.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ray.tune.search import Searcher

from orchestration.space import space_for, trial_layers, trials_for
from sfd.config import layered_config

# The trade-off shown in the Pareto plots and tables: forget (UA up), keep quality (remaining
# FD ratio down), stay diverse on the overridden class (its FD ratio down).
METRICS = ["ua", "fd_ratio", "override_fd_ratio"]
MODES = ["max", "min", "min"]
# What each study optimises; UA enters as a constraint instead.
OBJECTIVES = ["fd_ratio", "override_fd_ratio"]


class PerTargetSearch(Searcher):
    """Routes every Tune trial to its target's Optuna study (ask/tell).

    With ``storage`` (an Optuna RDB URL such as ``sqlite:///OUT/optuna.db``) the studies live in
    Optuna's own storage, so an interrupted sweep resumes them: Tune's experiment checkpoint calls
    :meth:`save` (a small JSON map from Tune trial id to its study and Optuna trial number), and
    :meth:`restore` re-opens the studies from the storage. Pickling (Tune keeps the searcher in
    ``tuner.pkl``) drops the study objects and re-opens them the same way.
    """

    def __init__(self, targets, spaces: dict, trials_per_target: int, overrides: dict | None = None, seed: int = 0,
                 ua_threshold: float = 0.99, storage: str | None = None, max_asr: float | None = None,
                 warm_start: int = 0, pruned: dict | None = None):
        super().__init__(metric=None, mode=None)
        self.targets = {t.name: t for t in targets}
        self.order = [t.name for t in targets]
        self.spaces = spaces
        self.trials_per_target = int(trials_per_target)
        self.overrides = dict(overrides or {})
        self.seed = int(seed)
        self.ua_threshold = float(ua_threshold)
        self.max_asr = None if max_asr is None else float(max_asr)
        self.storage = storage
        self.warm_start = int(warm_start)
        # trial id -> why the early stopping stopped it (orchestration/pruning.py; shared with the scheduler)
        self.pruned = pruned if pruned is not None else {}
        self.remaining = {t.name: trials_for(spaces, t, self.trials_per_target) for t in targets}
        self.started = {t.name: 0 for t in targets}
        self.next = 0
        self.owner: dict[str, list] = {}           # tune trial id -> [target name, optuna trial number]
        self._open_studies()

    def _open_studies(self) -> None:
        """Forget the opened studies; each is opened when first needed (:class:`_Studies`), so a sweep of
        a thousand targets starts its first trials at once instead of opening every study first."""
        self.studies = _Studies(self)
        self._storage = None

    def _rdb(self):
        """One Optuna storage object for every study (a URL per study would build a database engine
        each: about 8x slower per study opened)."""
        if self.storage is None:
            return None
        if self._storage is None:
            import optuna
            self._storage = optuna.storages.RDBStorage(self.storage)
        return self._storage

    def open_study(self, name: str):
        """``name``'s study, created (with the baseline as its first point) if the storage has none."""
        import optuna
        from optuna.samplers import TPESampler

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        i = self.order.index(name)
        study = optuna.create_study(
            study_name=name, storage=self._rdb(), load_if_exists=True, directions=["minimize", "minimize"],
            sampler=TPESampler(seed=self.seed + i, multivariate=True))
        if not study.trials:                  # a fresh study: the baseline is its first point
            t = self.targets[name]
            study.enqueue_trial(space_for(self.spaces, t).baseline_point(t.override))
        return study

    def studies_with_trials(self) -> dict:
        """The studies that hold any trial: with a storage, those it records (one query, then each opened);
        in memory, the ones opened so far."""
        if self.storage is None:
            return {n: s for n, s in self.studies.items() if s.trials}
        import optuna
        held = {s.study_name for s in optuna.get_all_study_summaries(self._rdb(), include_best_trial=False)
                if s.n_trials}
        return {n: self.studies[n] for n in self.order if n in held}

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("studies", None)                # Optuna's storage holds them, not a pickle
        state.pop("_storage", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open_studies()

    # Tune's experiment checkpoint ------------------------------------------------------------
    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps({
            "remaining": self.remaining, "started": self.started, "next": self.next, "owner": self.owner}))

    def restore(self, checkpoint_path: str) -> None:
        """Continue from Tune's last experiment checkpoint. An Optuna trial asked after that
        checkpoint belongs to no Tune trial Tune will resume: it is told FAIL (Tune asks again)."""

        from optuna.trial import TrialState

        state = json.loads(Path(checkpoint_path).read_text())
        self.remaining, self.started = state["remaining"], state["started"]
        self.next, self.owner = int(state["next"]), {k: list(v) for k, v in state["owner"].items()}
        self._open_studies()
        known = {(name, number) for name, number in self.owner.values()}
        for name, study in self.studies_with_trials().items():
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if (name, t.number) not in known:
                    study.tell(t.number, state=TrialState.FAIL)

    def fail_running(self) -> int:
        """Tell FAIL to every Optuna trial left RUNNING by a sweep that died before Tune saved any
        state (so none of them will be resumed); returns how many."""
        from optuna.trial import TrialState
        n = 0
        for study in self.studies_with_trials().values():
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                study.tell(t.number, state=TrialState.FAIL)
                n += 1
        return n

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True               # every study already knows its objectives and space

    def suggest(self, trial_id: str):
        # targets one after the other: the first target (in order) with trials left
        for name in self.order:
            if self.remaining[name] <= 0:
                continue
            space = space_for(self.spaces, self.targets[name])
            baseline = self.started[name] == 0
            if not baseline and self.warm_start > 0:
                self._enqueue_warm_start(name)
            ot = self.studies[name].ask(space.optuna_space())
            ot.set_user_attr("tune_trial_id", trial_id)
            ot.set_user_attr("baseline", baseline)
            params = dict(ot.params)
            self.remaining[name] -= 1
            self.owner[trial_id] = [name, ot.number]
            self.started[name] += 1
            return {"target": name, "target_slug": self.targets[name].slug, "method": self.targets[name].method,
                    "baseline": baseline, "warm_start_from": str(ot.user_attrs.get("warm_start_from", "")),
                    "params": params, "sfd": self.sfd_config(name, params)}
        return Searcher.FINISHED if all(v <= 0 for v in self.remaining.values()) else None

    def warm_start_candidates(self, name: str) -> list[tuple[str, object]]:
        """(origin, frozen Optuna trial) of the configurations ``name``'s study may start from: the other
        studies' completed, feasible, non-baseline trials over the same parameters, best first (remaining
        FD ratio, then override FD ratio), none whose parameters ``name``'s study has already run."""
        from optuna.trial import TrialState

        keys = set(space_for(self.spaces, self.targets[name]).params)
        have = [t.params for t in self.studies[name].get_trials(deepcopy=False)]
        found = []
        for other in self.order:
            if other == name or self.started[other] == 0 or set(space_for(self.spaces, self.targets[other]).params) != keys:
                continue
            for t in self.studies[other].get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                feasible = bool(t.constraints) and all(c <= 0 for c in t.constraints.values())
                if t.user_attrs.get("baseline") or not feasible or not t.values \
                        or not all(math.isfinite(v) for v in t.values) or t.params in have:
                    continue
                found.append((f"{other}#{t.number}", t))
        found.sort(key=lambda x: tuple(x[1].values))
        return found

    def _enqueue_warm_start(self, name: str) -> None:
        """Enqueue the best candidate configuration in ``name``'s study while it has fewer warm starts
        than ``warm_start`` (Optuna's ask then returns it, with its origin as a user attribute)."""
        study = self.studies[name]
        used = sum(bool(t.user_attrs.get("warm_start_from")) for t in study.get_trials(deepcopy=False))
        if used >= self.warm_start:
            return
        cands = self.warm_start_candidates(name)
        if cands:
            origin, t = cands[0]
            study.enqueue_trial(dict(t.params), user_attrs={"warm_start_from": origin})

    def sfd_config(self, name: str, params: dict) -> dict:
        """The trial's full SFD configuration: preset defaults, searched values, target, overrides."""
        t = self.targets[name]
        return layered_config(trial_layers(space_for(self.spaces, t), t, self.overrides, params))[0].to_dict()

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:

        import optuna
        from optuna.trial import TrialState

        if trial_id not in self.owner:
            return
        name, number = self.owner[trial_id]
        study = self.studies[name]
        frozen = study.get_trials(deepcopy=False)[number]
        if frozen.state != TrialState.RUNNING:   # told before an interruption: never twice
            return
        if trial_id in self.pruned:               # stopped early: no figures of the whole budget to tell
            ot = optuna.trial.Trial(study, frozen._trial_id)
            ot.set_user_attr("stopped_reason", self.pruned[trial_id])
            if result is not None and isinstance(result.get("kimg"), (int, float)):
                ot.set_user_attr("stopped_kimg", float(result["kimg"]))
            study.tell(number, state=TrialState.PRUNED)
            return
        keys = ["ua", *OBJECTIVES]
        ok = (result is not None and not error and all(k in result for k in keys)
              and all(math.isfinite(float(result[k])) for k in keys))
        if not ok:                # failed, or stopped before its first evaluation
            study.tell(number, state=TrialState.FAIL)
            return
        ot = optuna.trial.Trial(study, frozen._trial_id)
        ot.set_user_attr("ua", float(result["ua"]))
        # feasible when <= 0 (Optuna's constraint convention; TPE and best_trials honour it)
        ot.set_constraint("ua_threshold", self.ua_threshold - float(result["ua"]))
        if self.max_asr is not None:
            # the worst attack's success rate over the limit; a trial whose attack did not report is infeasible
            asr = float(result.get("asr_max", math.nan))
            ot.set_user_attr("asr_max", asr)
            ot.set_constraint("max_asr", asr - self.max_asr if math.isfinite(asr) else 1.0)
        study.tell(number, [float(result[k]) for k in OBJECTIVES])


class _Studies(dict):
    """Target name -> its Optuna study, opened by :meth:`PerTargetSearch.open_study` on first access."""

    def __init__(self, searcher: PerTargetSearch):
        super().__init__()
        self.searcher = searcher

    def __missing__(self, name: str):
        study = self[name] = self.searcher.open_study(name)
        return study


def trial_owners(storage: str) -> dict[str, str]:
    """Tune trial id -> target, as the per-target Optuna studies in ``storage`` record them (each
    study is named after its target; each trial carries its Tune trial's id)."""
    import optuna
    owners = {}
    storage = optuna.storages.RDBStorage(storage)
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        for t in study.get_trials(deepcopy=False):
            if "tune_trial_id" in t.user_attrs:
                owners[t.user_attrs["tune_trial_id"]] = summary.study_name
    return owners
