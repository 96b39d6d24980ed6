"""MLflow tracking from the sweep's driver: one parent run per sweep, a nested run per target
and per trial, with params, metric histories, tags and artifacts.

Logging happens in a Tune callback on the driver, so trial workers need no access to the
tracking store (a SQLite file in the output folder by default, or `--mlflow-uri`).
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import time
from pathlib import Path
from types import SimpleNamespace

from ray.tune import Callback

from .costs import COSTS
from .targets import unit_name
from .trial import REPORT_KEYS as _METRIC_KEYS

PARENT_TAG = "mlflow.parentRunId"
# what happened to a run (tag "status") -> its MLflow run status
MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "FINISHED", "no_trial_at_ua_threshold": "FINISHED",
                 "failed": "FAILED", "cut_off": "KILLED", "interrupted": "KILLED", "not_started": "KILLED"}
# MLflow 3's experiment kinds (the UI's "Machine learning" vs "GenAI apps & agents")
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# MLflow (3.15+) shared views: the runs table's columns, read from this experiment tag when the URL names its key
# (?viewStateShareKey=): the sweep's headline (parent row), then each target's and trial's figures, on screen
VIEW_KEY = "sfd-sweep"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_COLUMNS = ([f"metrics.`{k}`" for k in ("min_best_ua", "median_best_fd_ratio", "worst_best_fd_ratio", "ua", "fd_ratio",
                                            "override_fd_ratio", "remaining_accuracy", "ua_fresh", "fd_ratio_fresh")]
                + [f"tags.`{k}`" for k in ("target", "method", "status")])


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


class MLflowStore:
    """One experiment of a tracking store and what every run of it is written with: params,
    metrics, artifacts, and an end that says what happened."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | None = None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_root)
        else:
            self.experiment_id = exp.experiment_id
        # this experiment is model training, not a GenAI app; MLflow 3's UIs before the workflow switch
        # (3.1-3.x) read this tag to open the runs table (3.17 reads ?workflowType=: see runs_view_url)
        self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        self.client.set_experiment_tag(self.experiment_id, VIEW_TAG,
                                       json.dumps({"selectedColumns": VIEW_COLUMNS, "columnOrder": VIEW_COLUMNS}))

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param
        items = [Param(k, str(v)[:500]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 90):
            self.client.log_batch(run_id, params=items[i:i + 90])

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:

        from mlflow.entities import Metric
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if _finite(v)]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def log_artifacts(self, run_id: str, paths, artifact_path: str | None = None) -> None:
        for p in paths:
            p = Path(p)
            if p.is_file():
                self.client.log_artifact(run_id, str(p), artifact_path)

    def reopen(self, run_id: str) -> bool:
        """An ended run RUNNING again (a resumed sweep, target or trial); False if it does not exist."""
        from mlflow.exceptions import MlflowException
        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, "status", "running")
        return True

    def finish(self, run_id: str, status: str, error: str = "") -> None:
        """End a run with what happened: tag ``status`` (finished, stopped, failed, cut_off, ...) and
        the MLflow status that matches it (FINISHED, FAILED, KILLED); a failure's cause as ``error``."""
        status = status.lower()
        self.client.set_tag(run_id, "status", status)
        if error:
            self.client.set_tag(run_id, "error", error[:5000])
        self.client.set_terminated(run_id, MLFLOW_STATUS.get(status, "FINISHED"))


CKPT_NAME = re.compile(r"(ckpt-\d+)$")          # a logged model's name ends with its checkpoint folder's


class CheckpointModels:
    """Checkpoint folders (safetensors + JSON, never a pickled module) as MLflow 3 logged models of
    the run that wrote them, each at its step with that step's metrics, so the UI compares
    checkpoints. Each folder is logged once."""

    def __init__(self, store: MLflowStore):
        self.store = store
        self.logged: dict[str, set[str]] = {}         # run id -> checkpoint folder names logged

    def known(self, run_id: str) -> set[str]:
        """The run's checkpoint folders already logged: by this driver, or (the first time a run is seen)
        by an earlier driver of the same sweep, read back from MLflow, so a resumed sweep logs none twice."""
        if run_id not in self.logged:
            models = self.store.client.search_logged_models(
                [self.store.experiment_id], filter_string=f"source_run_id = '{run_id}'", max_results=1000)
            # (MLflow 3.17's filter on status matches nothing: READY ones are picked here)
            ready = [x.name for x in models if str(x.status).endswith("READY")]
            self.logged[run_id] = {m.group(1) for m in map(CKPT_NAME.search, ready) if m}
        return self.logged[run_id]

    def log(self, run_id: str, name: str, ckpt_dir: Path, step: int, metrics: dict) -> str | None:
        """Returns the model id (None: logged before, not a checkpoint, or vanished while copied)."""

        from mlflow.entities import LoggedModelOutput, Metric

        client, ckpt_dir = self.store.client, Path(ckpt_dir)
        done = self.known(run_id)
        if ckpt_dir.name in done or not (ckpt_dir / "state.safetensors").is_file():
            return None
        model = client.create_logged_model(self.store.experiment_id, name=f"{name}-{ckpt_dir.name}",
                                           source_run_id=run_id, model_type="sfd-checkpoint",
                                           tags={"format": "safetensors", "step": str(step)})
        try:
            client.log_model_artifacts(model.model_id, str(ckpt_dir))
        except FileNotFoundError as e:
            # the trial removed the folder while it was copied (a newer checkpoint rotated it out, or it was
            # deleted by hand): that checkpoint is not tracked, the sweep goes on
            client.finalize_logged_model(model.model_id, "FAILED")
            print(f"[sweep] note: checkpoint {ckpt_dir} vanished while MLflow copied it ({e}); not logged",
                  flush=True)
            return None
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step, model_id=model.model_id, run_id=run_id)
                 for k, v in metrics.items() if _finite(v)]
        if items:
            client.log_batch(run_id, metrics=items)
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
        client.finalize_logged_model(model.model_id, "READY")
        done.add(ckpt_dir.name)
        return model.model_id


class MLflowSweep(MLflowStore):
    """The sweep's runs: one parent run, a nested run per target under it and per trial under its
    target; a resumed sweep finds and continues its own runs."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | None = None):
        super().__init__(uri, experiment, artifact_root)
        self.checkpoints = CheckpointModels(self)
        self.parent_id: str | None = None
        self.target_runs: dict[str, str] = {}
        self.trial_runs: dict[str, str] = {}

    def start_parent(self, name: str, params: dict, tags: dict, resume_id: str | None = None) -> str:
        """The sweep's run; ``resume_id``: the interrupted sweep's own run, continued (RUNNING again)."""
        if resume_id is not None and self.reopen(resume_id):
            self.adopt(resume_id)
            return resume_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags={"kind": "sweep", **tags,
                                                                              "status": "running"})
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        return self.parent_id

    def adopt(self, parent_id: str) -> None:
        """The runs of an earlier driver's sweep (its parent run, its targets and trials), as they are."""
        self.parent_id = parent_id
        for run in self._children(parent_id, "target"):
            self.target_runs[unit_name(run.data.tags["target"], run.data.tags.get("method", "sfd"))] = run.info.run_id
        for t in self._children(None, "trial"):
            self.trial_runs[t.data.tags["trial_id"]] = t.info.run_id

    def _children(self, parent: str | None, kind: str) -> list:
        """This sweep's runs of a kind (trials: every trial under any of its target runs). The trials in one
        search, not one per target: each search scans the experiment, so per target it grew with targets x runs."""
        if parent is None:
            targets = set(self.target_runs.values())
            return [r for r in self._search(f"tags.kind = '{kind}'") if r.data.tags.get(PARENT_TAG) in targets]
        return self._search(f"tags.`{PARENT_TAG}` = '{parent}' and tags.kind = '{kind}'")

    def _search(self, filter_string: str) -> list:
        """Every run of the experiment matching ``filter_string``, page by page (a search returns at most
        a page: a sweep of thousands of trials has more)."""
        out, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1000,
                                           page_token=token)
            out += list(page)
            token = page.token
            if not token:
                return out

    def target_run(self, target) -> str:
        if target.name not in self.target_runs:
            run = self.client.create_run(self.experiment_id, run_name=target.name, tags={
                PARENT_TAG: self.parent_id, "kind": "target", "target": target.target_name, "method": target.method,
                "preset": target.preset, "status": "running"})
            self.target_runs[target.name] = run.info.run_id
            self.log_params(run.info.run_id, {"forget": ",".join(map(str, target.forget)),
                                              "override": target.override, "preset": target.preset})
        elif self.client.get_run(self.target_runs[target.name]).info.status != "RUNNING":
            self.reopen(self.target_runs[target.name])
        return self.target_runs[target.name]

    def start_trial(self, trial_id: str, target, baseline: bool, params: dict) -> str:
        """The trial's run: created once; a trial resumed (Ray Train restart, sweep --resume) continues
        its own run instead of opening a second one."""
        parent = self.target_run(target)
        if trial_id in self.trial_runs:
            self.reopen(self.trial_runs[trial_id])
            return self.trial_runs[trial_id]
        run = self.client.create_run(self.experiment_id, run_name=f"{target.slug}-{trial_id}", tags={
            PARENT_TAG: parent, "kind": "trial", "target": target.target_name, "method": target.method,
            "preset": target.preset, "trial_id": trial_id, "baseline": str(baseline).lower(), "status": "running"})
        self.trial_runs[trial_id] = run.info.run_id
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_checkpoint(self, run_id: str, name: str, ckpt_dir: Path, step: int, metrics: dict) -> str | None:
        return self.checkpoints.log(run_id, name, ckpt_dir, step, metrics)

    def end_open_runs(self, status: str = "interrupted") -> list[str]:
        """Every run of this sweep still RUNNING (trials cut off, their targets) ends as ``status``
        (KILLED): no run is left RUNNING by an interrupted or failed sweep."""
        ended = []
        trials = set(self.trial_runs.values())
        mine = trials | set(self.target_runs.values())
        # one search for the RUNNING ones, not a get_run per run of the sweep
        for run in self._search("attributes.status = 'RUNNING'"):
            run_id = run.info.run_id
            if run_id in mine:
                self.finish(run_id, "cut_off" if run_id in trials else status)
                ended.append(run_id)
        return ended

    def mark_superseded(self, table_trial_ids) -> list[str]:
        """Tag this sweep's KILLED trial runs whose trial is in no row of the trial table: an attempt a killed
        driver started before Tune saved it, which the resumed sweep asked again under another trial id.
        Each gets ``superseded`` = true and a note saying so, so the runs table reads as the trial table
        does. Returns their run ids."""
        rows = set(table_trial_ids)
        orphans = {run_id for trial_id, run_id in self.trial_runs.items() if trial_id not in rows}
        marked = []
        if not orphans:
            return marked
        for run in self._search("attributes.status = 'KILLED'"):
            if run.info.run_id in orphans and run.data.tags.get("superseded") != "true":
                self.client.set_tag(run.info.run_id, "superseded", "true")
                self.client.set_tag(run.info.run_id, "note", "started as the sweep's driver was killed, before Tune "
                                    "saved it; the resumed sweep ran this configuration again as another trial")
                marked.append(run.info.run_id)
        return marked

    def end_left_running(self) -> dict[str, int]:
        """The runs a dead driver left RUNNING (a kill -9, a lost node): trials ``cut_off``, targets and
        the sweep ``interrupted``, all KILLED. Returns how many of each kind."""
        ended = {"sweep": 0, "target": 0, "trial": 0}
        trials = set(self.trial_runs.values())
        for run_id in self.end_open_runs("interrupted"):
            ended["trial" if run_id in trials else "target"] += 1
        if self.client.get_run(self.parent_id).info.status == "RUNNING":
            self.finish(self.parent_id, "interrupted")
            ended["sweep"] = 1
        return ended

    def runs_view_url(self, ui: str = "http://127.0.0.1:5000") -> str:
        """The runs table of this sweep's experiment in the MLflow UI at ``ui``. MLflow 3.17's UI
        opens an experiment by its *workflow type* (the URL's ``workflowType``, else the browser's
        last choice, by default ``genai``: the GenAI overview), not by the experiment's tag, so the
        link names it; and it names the shared view whose columns put the figures first (VIEW_TAG)."""
        return (f"{ui.rstrip('/')}/#/experiments/{self.experiment_id}/runs?workflowType=machine_learning"
                f"&viewStateShareKey={VIEW_KEY}")


def left_running_line(counts: dict[str, int]) -> str:
    """One line for the runs a killed driver left RUNNING, now KILLED: how many of each kind."""
    n = sum(counts.values())
    kinds = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    return f"{n} MLflow run{'s' if n != 1 else ''} the killed driver left RUNNING marked KILLED ({kinds})"


@contextlib.contextmanager
def sweep_tracking(tracker: MLflowSweep, outcome, name: str, params: dict, tags: dict, resume_id: str | None):
    """The sweep's MLflow run from start to end: started (or, resuming, reopened, with the trials the
    killed driver left RUNNING marked KILLED) before anything else, so that every later failure (Ray,
    storage, stage 1) ends it; at the end no run of the sweep is left RUNNING."""
    tracker.start_parent(name, params, tags, resume_id=resume_id)
    if resume_id is not None:
        trials = set(tracker.trial_runs.values())
        ended = tracker.end_open_runs()
        if ended:
            counts = {"target": sum(r not in trials for r in ended), "trial": sum(r in trials for r in ended)}
            print(f"[sweep] --resume: {left_running_line(counts)}", flush=True)
    try:
        yield tracker
    except BaseException as e:
        outcome.settle(e)
        raise
    finally:
        # cut-off trials and their targets KILLED, the sweep's run as it ended
        tracker.end_open_runs("interrupted" if outcome.status == "interrupted" else "failed")
        tracker.finish(tracker.parent_id, outcome.status)


# what a person compares targets by: the best trial's figures (and the same on fresh samples)
TABLE_COLUMNS = ("target", "method", "state", "best_trial", "best_is_baseline", "ua", "fd_ratio", "override_fd_ratio",
                 "remaining_accuracy", "baseline_fd_ratio", "ua_fresh", "fd_ratio_fresh", "override_fd_ratio_fresh",
                 "baseline_fd_ratio_fresh", "search_improved")


TABLE_FILE = "summary_table.json"
NOTE_MAX = 8000          # MLflow's longest tag value


def headline(df, by_method: bool = True) -> dict:
    """The sweep's figures in one row of the runs table: how many targets met the UA threshold (have
    a best trial), the median and the worst of their FD ratios, the lowest UA; each again on fresh
    samples where the sweep re-evaluated them."""
    if by_method and "method" in df and set(df["method"]) != {"sfd"}:
        # several methods: SFD's figures as they are without baselines, each baseline's prefixed by its name
        out = headline(df[df["method"] == "sfd"], False) if (df["method"] == "sfd").any() else {}
        for m in sorted(set(df["method"]) - {"sfd"}):
            out.update({f"{m}_{k}": v for k, v in headline(df[df["method"] == m], False).items()})
        return out
    best = df[df["best_trial"] != ""]
    out = {"targets": len(df), "targets_with_best": len(best), "median_best_fd_ratio": float(df["fd_ratio"].median())}
    for sfx in ("", "_fresh"):
        if f"fd_ratio{sfx}" in best and len(best):
            out.update({f"median_best_fd_ratio{sfx}": float(best[f"fd_ratio{sfx}"].median()),
                        f"worst_best_fd_ratio{sfx}": float(best[f"fd_ratio{sfx}"].max()),
                        f"min_best_ua{sfx}": float(best[f"ua{sfx}"].min()),
                        f"median_best_override_fd_ratio{sfx}": float(best[f"override_fd_ratio{sfx}"].median())})
    if "search_improved" in df:
        out["targets_search_improved"] = int(df["search_improved"].sum())
    return out


def log_sweep_summary(tracker: MLflowSweep, df, n_trials: int, out: Path) -> None:
    """The parent run carries what people compare: the summary files, the per-target table
    (``summary_table.json``, which the run's artifacts view shows as a table), the summary as the
    run's description and the headline figures as metrics (the runs table's parent row)."""

    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    out, parent = Path(out), tracker.parent_id
    table = df[[c for c in TABLE_COLUMNS if c in df]]
    # MLflow's own table format (log_table's), written here: log_table appends to a table the run
    # already has, and a resumed sweep logs its summary again
    table.to_json(out / TABLE_FILE, orient="split", index=False)
    tracker.log_artifacts(parent, [out / "summary.md", out / "summary.parquet", out / "trials.parquet", out / TABLE_FILE,
                                   *[out / f for f in ("methods.md", "methods.parquet") if (out / f).is_file()],
                                   *sorted(out.glob("methods-*.png"))])
    tables = json.loads(tracker.client.get_run(parent).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    if {"path": TABLE_FILE, "type": "table"} not in tables:
        tracker.client.set_tag(parent, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*tables, {"path": TABLE_FILE,
                                                                                      "type": "table"}]))
    if (out / "summary.md").is_file():
        note = (out / "summary.md").read_text()
        cut = "\n\n(cut here: the whole table is the artifact summary.md)"
        tracker.client.set_tag(parent, "mlflow.note.content", note if len(note) <= NOTE_MAX else
                               note[:NOTE_MAX - len(cut)] + cut)
    tracker.log_metrics(parent, {**headline(df), "trials": n_trials})


class MLflowTuneCallback(Callback):
    """Mirrors Tune's trial events into nested MLflow runs."""

    ARTIFACTS = ("metrics.json", "history.json", "curves.png", "samples_generator.png", "samples_teacher.png")

    def __init__(self, tracker: MLflowSweep, targets: dict, out_dir: Path, on_event=None, stopped=None):
        self.tracker = tracker
        self.targets = targets
        self.out_dir = Path(out_dir)
        self.on_event = on_event
        self.stopped = stopped if stopped is not None else {}   # trial id -> why the scheduler stopped it
        # trial id -> what happened ("finished", "stopped", "failed"); a started trial missing here
        # when the sweep ends was cut off
        self.outcome: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.started: set[str] = set()
        self.target_of: dict[str, str] = {}
        self.trials: list = []             # Tune's trials, as its last event showed them (snapshot)
        self.frozen = False                # the sweep is being abandoned: later events are not recorded

    def snapshot(self) -> list:
        """Tune's trials as result-like records (``config``, ``metrics``, ``path``, ``error``), read
        from the driver's memory: what the tables are made of when Ray is gone and Tune can hand
        back no ResultGrid. Later events are ignored from here on (the runs are being ended)."""
        self.frozen = True
        out = []
        for t in list(self.trials):
            error = None
            if t.status == "ERROR":
                error = (Path(t.error_file).read_text(errors="replace") if t.error_file and Path(t.error_file).is_file()
                         else "the trial failed")
            out.append(SimpleNamespace(config=t.config, metrics=dict(t.last_result or {}), path=t.path, error=error))
        return out

    def on_step_begin(self, iteration, trials, **info):
        self.trials = trials

    # kept in Tune's experiment checkpoint, so a resumed sweep knows what happened before
    def get_state(self) -> dict:
        return {"outcome": dict(self.outcome), "errors": dict(self.errors), "started": sorted(self.started),
                "stopped": dict(self.stopped), "target_of": dict(self.target_of)}

    def set_state(self, state: dict) -> None:
        self.outcome.update(state.get("outcome", {}))
        self.errors.update(state.get("errors", {}))
        self.started.update(state.get("started", []))
        self.stopped.update(state.get("stopped", {}))
        self.target_of.update(state.get("target_of", {}))
        if hasattr(self.on_event, "restored"):      # progress counts what finished before the interruption
            done: dict[str, int] = {}
            for tid in self.outcome:
                if tid in self.target_of:
                    done[self.target_of[tid]] = done.get(self.target_of[tid], 0) + 1
            self.on_event.restored(done)

    def _run_dir(self, trial) -> Path:
        return self.out_dir / "trials" / trial.config["target_slug"] / trial.trial_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.trials = trials
        if self.frozen:
            return
        with COSTS.phase("mlflow_callback"):
            self._start(trial)

    def _start(self, trial):
        cfg = trial.config
        self.started.add(trial.trial_id)
        self.target_of[trial.trial_id] = cfg["target"]
        self.outcome.pop(trial.trial_id, None)
        self.tracker.start_trial(trial.trial_id, self.targets[cfg["target"]], cfg["baseline"],
                                 {**cfg["sfd"], "searched": ",".join(sorted(cfg["params"]))})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.frozen:
            return
        with COSTS.phase("mlflow_callback"):
            self._result(trial, result)

    def _result(self, trial, result):
        run_id = self.tracker.trial_runs.get(trial.trial_id)
        if run_id:
            metrics = {k: result[k] for k in result if k in _METRIC_KEYS}
            step = int(result.get("iteration", 0))
            self.tracker.log_metrics(run_id, metrics, step=step)
            # a checkpoint written at this report: track it with this step's metrics
            ckpt = self._run_dir(trial) / "checkpoints" / f"ckpt-{step:08d}"
            if ckpt.is_dir():
                self.tracker.log_checkpoint(run_id, trial.trial_id, ckpt, step, metrics)
        if self.on_event:
            self.on_event("result", trial, result)

    def _end(self, trial, status: str, error: str = ""):
        if self.frozen:
            return
        self.outcome[trial.trial_id] = status
        if error:
            self.errors[trial.trial_id] = error
        run_id = self.tracker.trial_runs.get(trial.trial_id)
        if run_id is None:
            return
        run_dir = self._run_dir(trial)
        self.tracker.log_artifacts(run_id, [run_dir / a for a in self.ARTIFACTS])
        # a checkpoint whose report never reached the driver (written while a stop or a kill was under way;
        # the resumed trial continued after it) is still in the run folder: logged now, at its own step
        for ckpt in sorted((run_dir / "checkpoints").glob("ckpt-*")):
            self.tracker.log_checkpoint(run_id, trial.trial_id, ckpt, int(ckpt.name.split("-")[1]), {})
        if status == "stopped":
            self.tracker.client.set_tag(run_id, "stop_reason", self.stopped.get(trial.trial_id, ""))
        self.tracker.finish(run_id, status, error)
        if self.on_event:
            self.on_event(status, trial, trial.last_result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        with COSTS.phase("mlflow_callback"):
            self._end(trial, "stopped" if trial.trial_id in self.stopped else "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        from .results import root_cause
        error = ""
        if trial.error_file and Path(trial.error_file).is_file():
            error = root_cause(Path(trial.error_file).read_text(errors="replace"))
        with COSTS.phase("mlflow_callback"):
            self._end(trial, "failed", error)

