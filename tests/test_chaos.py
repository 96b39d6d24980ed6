"""The chaos benchmark (benchmarks/chaos.py) as a test: a small sweep on a real 2-node Ray cluster on
loopback (a head and a worker node, each a ``ray start --block`` of its own), run undisturbed and then
while a trial's process is SIGKILLed and the worker node is killed whole (its process group and every
process under it) mid-trial, a new worker node joining afterwards. Every trial must finish or be
recorded failed with its cause, and every store -- trials.parquet, MLflow runs and checkpoints, the Optuna
study, the trial folders -- must hold what the undisturbed run holds, nothing RUNNING, lost or twice.
The store check itself is tested on counts that are wrong in each way it must catch."""
import copy
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import chaos  # noqa: E402  (benchmarks/ is not a package)

GOOD = {"table_rows": 2, "table_unique_trials": 2, "table_status": {"finished": 1, "failed": 1},
        "failed_without_cause": 0, "mlflow_runs": {"trial": 2, "target": 1, "sweep": 1},
        "mlflow_status": {"FINISHED": 3, "FAILED": 1}, "mlflow_trial_ids_unique": 2,
        "optuna": {"digits:0->1": {"COMPLETE": 1, "FAIL": 1}}}


def _bad(**change):
    c = copy.deepcopy(GOOD)
    c.update(change)
    return chaos.accounted(c, planned=2)


def test_the_store_check_catches_each_way_a_trial_can_be_lost_or_doubled():
    assert chaos.accounted(GOOD, planned=2) == []                 # a failed trial with its cause is accounted for
    assert "trials.parquet holds 1 rows" in _bad(table_rows=1, table_unique_trials=1)[0]        # lost
    assert "3 rows (2 unique)" in _bad(table_rows=3)[0]                                          # twice
    assert "statuses" in _bad(table_status={"finished": 1, "cut_off": 1})[0]
    assert "1 failed trial(s) without a cause" in _bad(failed_without_cause=1)[0]
    assert "MLflow holds 1 trial runs" in _bad(mlflow_runs={"trial": 1, "target": 1, "sweep": 1})[0]
    assert "1 MLflow run(s) RUNNING" in _bad(mlflow_status={"FINISHED": 3, "RUNNING": 1})[0]
    assert "Optuna" in _bad(optuna={"digits:0->1": {"COMPLETE": 1, "RUNNING": 1}})[0]
    assert "Optuna" in _bad(optuna={"digits:0->1": {"COMPLETE": 1}})[0]


def test_a_node_kill_needs_two_nodes():
    with pytest.raises(SystemExit, match="--kills 'node=1' kills a worker node, but --nodes is 1"):
        chaos.parse_kills("worker=1,node=1", nodes=1)
    assert sorted(chaos.parse_kills("worker=2,node=1", nodes=2)) == ["node", "worker", "worker"]


@pytest.mark.cluster
@pytest.mark.slow
def test_two_node_chaos_run_loses_nothing(tmp_path, capsys):
    report = tmp_path / "report.json"
    # the node first: both first trials start at once, one on each node's CPU, so one trains on the worker node
    # (shuffled, the worker kill could come first and the sweep end before a trial trained there again)
    # (3 trials of 1 kimg: a trial still trains for the worker kill after the node's)
    rc = chaos.main(["--nodes", "2", "--targets", "digits:0", "--trials-per-target", "3", "--budget-kimg", "1.0",
                     "--kills", "node=1,worker=1", "--in-order", "--max-delay", "4", "--out", str(tmp_path / "chaos"),
                     "--report", str(report)])
    text = capsys.readouterr().out
    rep = json.loads(report.read_text())
    assert rc == 0 and rep["ok"], text[-5000:]
    kills = rep["chaos"]["kills"]
    assert Counter(ev["kind"] for ev in kills) == {"worker": 1, "node": 1}, kills
    node = next(ev for ev in kills if ev["kind"] == "node")
    # the node was killed whole while a trial trained there, and a new one joined
    assert node["trials_training_there"] >= 1 and node["processes_killed"] >= 4 and "new_node_at_s" in node, node
    assert rep["chaos"]["tune_trial_task_failures"] >= 2, rep["chaos"]      # both kills hit a trial
    assert rep["diff"] == {} and rep["problems"] == {"calm": [], "chaos": []}
    got = rep["counts"]["chaos"]
    assert got["table_rows"] == 3 and got["table_status"] == {"finished": 3}
    assert got["mlflow_status"] == {"FINISHED": 5} and got["optuna"] == {"digits:0->1": {"COMPLETE": 3}}
    assert got["mlflow_checkpoint_models_distinct"] == rep["counts"]["calm"]["mlflow_checkpoint_models_distinct"]
