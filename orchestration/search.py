"""One independent Optuna study per target inside a single Ray Tune run.

Tune runs one search algorithm; `PerTargetSearch` holds an `OptunaSearch` per target and
routes every trial to the study of its target, so targets never share a study while all
of them run in parallel within the cluster's resources. The project's default
configuration is each study's first point (the baseline trial).
"""
from __future__ import annotations

from ray.tune.search import Searcher

# Objectives of every study: forget (UA up), keep quality (remaining FD ratio down) and stay
# diverse on the overridden class (its FD to the override's real images, as a ratio to the
# teacher's own, down) so the search never rewards a collapse onto one template.
METRICS = ["ua", "fd_ratio", "override_fd_ratio"]
MODES = ["max", "min", "min"]


class PerTargetSearch(Searcher):
    def __init__(self, targets, spaces: dict, trials_per_target: int, overrides: dict | None = None, seed: int = 0):
        super().__init__(metric=None, mode=None)
        import optuna
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)

        self.targets = {t.name: t for t in targets}
        self.spaces = spaces
        self.overrides = dict(overrides or {})
        self.remaining = {t.name: trials_per_target for t in targets}
        self.order = [t.name for t in targets]
        self.next = 0
        self.owner: dict[str, str] = {}
        self.studies = {}
        for i, t in enumerate(targets):
            space = spaces[t.preset]
            self.studies[t.name] = OptunaSearch(
                space=space.optuna_space(), metric=METRICS, mode=MODES,
                points_to_evaluate=[space.baseline_point()],
                sampler=TPESampler(seed=seed + i, multivariate=True))
        self.started = {t.name: 0 for t in targets}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True               # every study already knows its objectives and space

    def suggest(self, trial_id: str):
        for _ in range(len(self.order)):
            name = self.order[self.next % len(self.order)]
            self.next += 1
            if self.remaining[name] <= 0:
                continue
            params = self.studies[name].suggest(trial_id)
            if params is None or params == Searcher.FINISHED:
                continue
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
        cfg = base.replace(**{**params, **self.overrides, "forget": list(t.forget), "override": t.override})
        return cfg.to_dict()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.owner:
            self.studies[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        name = self.owner.get(trial_id)
        if name is None:
            return
        if result is not None and not error and not all(m in result for m in METRICS):
            error = True          # stopped before its first evaluation: tell Optuna it failed
        self.studies[name].on_trial_complete(trial_id, result=result, error=error)
