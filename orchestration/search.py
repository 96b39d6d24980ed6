"""One independent Optuna study per target inside a single Ray Tune run.

Tune runs one search algorithm; `PerTargetSearch` holds an Optuna study per target (ask/tell)
and routes every trial to the study of its target, so targets never share a study while all
of them run in parallel within the cluster's resources. The project's default configuration
is each study's first point (the baseline trial).

Each study minimises two objectives -- the remaining-class FD ratio (quality) and the
overridden class's FD ratio (diversity: the search must never reward a collapse onto one
template) -- under one constraint, UA >= the sweep's threshold, which TPE's constraints
support handles: infeasible trials inform the model without being traded off against FD.
"""
from __future__ import annotations

from ray.tune.search import Searcher

# The trade-off shown in the Pareto plots and tables: forget (UA up), keep quality (remaining
# FD ratio down), stay diverse on the overridden class (its FD ratio down).
METRICS = ["ua", "fd_ratio", "override_fd_ratio"]
MODES = ["max", "min", "min"]
# What each study optimises; UA enters as a constraint instead.
OBJECTIVES = ["fd_ratio", "override_fd_ratio"]


class PerTargetSearch(Searcher):
    def __init__(self, targets, spaces: dict, trials_per_target: int, overrides: dict | None = None, seed: int = 0,
                 ua_threshold: float = 0.99, storage=None):
        super().__init__(metric=None, mode=None)
        import optuna
        from optuna.samplers import TPESampler

        optuna.logging.set_verbosity(optuna.logging.WARNING)

        self.targets = {t.name: t for t in targets}
        self.spaces = spaces
        self.overrides = dict(overrides or {})
        self.ua_threshold = float(ua_threshold)
        self.remaining = {t.name: trials_per_target for t in targets}
        self.order = [t.name for t in targets]
        self.next = 0
        self.owner: dict[str, str] = {}
        self.asked: dict[str, object] = {}
        self.studies = {}
        for i, t in enumerate(targets):
            space = spaces[t.preset]
            study = optuna.create_study(
                study_name=t.name, storage=storage, load_if_exists=True, directions=["minimize", "minimize"],
                sampler=TPESampler(seed=seed + i, multivariate=True))
            study.enqueue_trial(space.baseline_point())
            self.studies[t.name] = study
        self.started = {t.name: 0 for t in targets}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True               # every study already knows its objectives and space

    def suggest(self, trial_id: str):
        for _ in range(len(self.order)):
            name = self.order[self.next % len(self.order)]
            self.next += 1
            if self.remaining[name] <= 0:
                continue
            space = self.spaces[self.targets[name].preset]
            ot = self.studies[name].ask(space.optuna_space())
            self.asked[trial_id] = ot
            params = dict(ot.params)
            self.remaining[name] -= 1
            self.owner[trial_id] = name
            baseline = self.started[name] == 0
            self.started[name] += 1
            return {"target": name, "target_slug": self.targets[name].slug, "baseline": baseline,
                    "params": params, "sfd": self.sfd_config(name, params)}
        return Searcher.FINISHED if all(v <= 0 for v in self.remaining.values()) else None

    def sfd_config(self, name: str, params: dict) -> dict:
        """The trial's full SFD configuration: preset defaults, searched values, target, overrides."""
        t = self.targets[name]
        base = self.spaces[t.preset].baseline()
        cfg = base.replace(**{**params, **self.overrides, **t.config_overrides()})
        return cfg.to_dict()

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        import math

        from optuna.trial import TrialState

        name = self.owner.get(trial_id)
        ot = self.asked.pop(trial_id, None)
        if name is None or ot is None:
            return
        study = self.studies[name]
        keys = ["ua", *OBJECTIVES]
        ok = (result is not None and not error and all(k in result for k in keys)
              and all(math.isfinite(float(result[k])) for k in keys))
        if not ok:                # failed, or stopped before its first evaluation
            study.tell(ot, state=TrialState.FAIL)
            return
        ot.set_user_attr("ua", float(result["ua"]))
        # feasible when <= 0 (Optuna's constraint convention; TPE and best_trials honour it)
        ot.set_constraint("ua_threshold", self.ua_threshold - float(result["ua"]))
        study.tell(ot, [float(result[k]) for k in OBJECTIVES])
