"""The sweep: target parsing, search-space validation, a real tiny sweep on local Ray logging to
a real MLflow tracking server on loopback (N-worker equivalence: tests/test_distributed.py)."""
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from orchestration.space import load_space, space_path
from orchestration.targets import parse_targets

REPO = Path(__file__).resolve().parent.parent
TINY = {"budget_kimg": 0.5, "eval_every_kimg": 0.25, "checkpoint_every_kimg": 0.25, "eval_forget_samples": 40,
        "eval_remain_per_class": 20, "batch_remain": 16, "batch_forget": 16}


def test_targets_all_classes_and_pairs():
    ts = parse_targets(["all_digits_classes"], "next")
    assert [t.forget for t in ts] == [(c,) for c in range(10)]
    assert ts[0].override == "1" and ts[9].override == "0"
    ts = parse_targets(["digits:3->5", "digits:7", "digits:0+3->1,2", "digits:4->random"], "next")
    assert [t.name for t in ts] == ["digits:3->5", "digits:7->8", "digits:0+3->1,2", "digits:4->random"]
    # class names on both sides of the arrow
    ts = parse_targets(["cifar10:cat->dog", "cifar10:cat+truck->dog,ship", "cifar10:airplane"], "next")
    assert [(t.forget, t.override) for t in ts] == [((3,), "5"), ((3, 9), "5,8"), ((0,), "1")]


@pytest.mark.parametrize("spec, needle", [
    ("all_mnist_classes", "valid presets: cifar10, colordigits, digits, sd, stl10"),
    ("digits:11", "class 11 is not a class of preset 'digits'"),
    ("digits:3->3", "override class 3 is itself forgotten"),
    ("digits", "not understood"),
    ("cifar10:cat->dragon", "3=cat, 4=deer"),
])
def test_bad_targets_are_rejected(spec, needle):
    with pytest.raises(ValueError, match=needle):
        parse_targets([spec], "next")


def test_shipped_spaces_are_valid_and_contain_the_baseline():
    for preset in ("digits", "cifar10"):
        s = load_space(space_path(preset))
        assert s.preset == preset
        base = s.baseline_point()
        for k, p in s.params.items():
            assert base[k] in p["values"] if p["type"] == "choice" else p["low"] <= base[k] <= p["high"]
    cifar = load_space(space_path("cifar10")).baseline()
    assert (cifar.alpha, cifar.lr_gen, cifar.sigma_dist, cifar.lambda_gen_forget) == (1.2, 1e-5, "vp-t", 0.01)


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d["search"].update(lr_teacher={"type": "uniform", "low": 0, "high": 1}), "search.lr_teacher"),
    (lambda d: d["search"].update(alpha={"type": "gaussian", "low": 0, "high": 1}), "search.alpha"),
    (lambda d: d["search"].update(alpha={"type": "uniform", "low": 2.0, "high": 1.0}), "search.alpha"),
    (lambda d: d["defaults"].update(learning_rate=1), "learning_rate"),
    (lambda d: d.update(serach={}), "serach"),
    (lambda d: d.update(override_defaults={"randm": {"batch_forget": 128}}), "override_defaults.randm: not an override"),
    (lambda d: d.update(override_defaults={"random": {"budget_kimg": 5}}), r"override_defaults.random: \['budget_kimg'\]"),
    (lambda d: d.update(override_defaults={"random": {"lr_gen": 0.5}}), "lr_gen=0.5 lies outside search.lr_gen"),
    (lambda d: d.update(override_defaults={"random": {"batch_forget": -3}}), "override_defaults.random: batch_forget"),
])
def test_malformed_space_names_the_key(tmp_path, mutate, needle):
    doc = yaml.safe_load(space_path("digits").read_text())
    mutate(doc)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=needle):
        load_space(p)


def _run_sweep(args, timeout=600):
    return subprocess.run([sys.executable, str(REPO / "orchestration" / "sweep.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_bad_target_or_space_fails_before_any_trial(tmp_path):
    out = tmp_path / "out"
    r = _run_sweep(["--targets", "digits:12", "--out", str(out)], timeout=120)
    assert r.returncode == 2 and "class 12 is not a class of preset 'digits'" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: digits\nsearch:\n  alpha: {type: uniform, low: 1.0}\n")
    r = _run_sweep(["--targets", "digits:1", "--space", str(bad), "--out", str(out)], timeout=120)
    assert r.returncode == 2 and "search.alpha" in r.stderr and not out.exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the MLflow tracking server did not start within 90 s")
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.cluster
def test_tiny_sweep_logs_nested_runs_to_a_tracking_server(tmp_path, mlflow_server, monkeypatch):
    monkeypatch.setenv("SFD_CACHE", str(tmp_path / "cache"))
    doc = yaml.safe_load(space_path("digits").read_text())
    doc["defaults"].update(TINY)
    doc["search"].pop("batch_remain", None)      # the tiny batch is not among its choices
    doc.pop("trial", None)
    doc["stage1_kimg"] = 0.2                 # a tiny shared stage 1, trained by the sweep on Ray Train
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(doc))
    out = tmp_path / "sweep"
    r = _run_sweep(["--targets", "digits:0->1", "digits:5", "--trials-per-target", "2", "--space", str(space),
                    "--out", str(out), "--num-cpus", "2", "--mlflow-uri", mlflow_server,
                    "--ua-threshold", "0.0"], timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "targets 2/2 done" in r.stdout
    # the shared stage 1 was distilled once and every trial started its forgetting from it
    stage1 = list((out / "stage1").glob("*/stage1.json"))
    assert len(stage1) == 1 and "distilling 0.2 kimg" in r.stdout
    for m in (out / "trials").glob("*/*/metrics.json"):
        assert json.loads(m.read_text())["config"]["init_from"] == str(stage1[0].parent)

    import pandas as pd
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 4 and set(trials["target"]) == {"digits:0->1", "digits:5->6"}
    assert trials.groupby("target")["baseline"].sum().tolist() == [1, 1]       # one baseline per target
    assert (trials["status"] == "finished").all() and trials["ua"].notna().all()
    summary = pd.read_parquet(out / "summary.parquet")
    assert len(summary) == 2 and (summary["best_trial"] != "").all()
    # the winners re-evaluated on fresh samples, next to the search-time figures
    for k in ("ua_fresh", "fd_ratio_fresh", "override_fd_ratio_fresh", "baseline_fd_ratio_fresh"):
        assert summary[k].notna().all(), k
    assert (summary["fd_ratio_fresh"] != summary["fd_ratio"]).all()        # other samples, other figure
    assert "fresh samples" in (out / "summary.md").read_text()
    assert (trials["overhead_seconds"] > 0).all()
    for slug in ("digits_forget0_to_1", "digits_forget5_to_6"):
        assert (out / "pareto" / f"{slug}.png").is_file()
        assert (out / "best" / slug / "generator.safetensors").is_file()

    import mlflow
    from mlflow.tracking import MlflowClient

    from sfd.io import load_tensors
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("sfd-sweep")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"    # the UI opens on the runs table
    runs = client.search_runs([exp.experiment_id], max_results=100)
    by_kind = {}
    for run in runs:
        by_kind.setdefault(run.data.tags.get("kind"), []).append(run)
    assert len(by_kind["sweep"]) == 1 and len(by_kind["target"]) == 2 and len(by_kind["trial"]) == 4
    parent = by_kind["sweep"][0].info.run_id
    target_ids = {r.info.run_id for r in by_kind["target"]}
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in by_kind["target"])
    assert all(r.data.tags["mlflow.parentRunId"] in target_ids for r in by_kind["trial"])
    trial = by_kind["trial"][0]
    assert len(client.get_metric_history(trial.info.run_id, "ua")) >= 2          # a history, not one value
    # every checkpoint a trial wrote is a logged model at its step, with that step's metrics, in safetensors
    for t in by_kind["trial"]:
        models = client.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{t.info.run_id}'")
        ckpts = sorted(json.loads(p.read_text())["iteration"] for p in
                       (out / "trials").glob(f"*/{t.data.tags['trial_id']}/checkpoints/*/state.json"))
        assert len(models) >= 1 and len(models) >= len(ckpts)
        for lm in models:
            step = int(lm.tags["step"])
            assert {m.key for m in lm.metrics if m.step == step} >= {"ua", "fd_ratio"}
            d = Path(mlflow.artifacts.download_artifacts(artifact_uri=lm.artifact_location, tracking_uri=mlflow_server,
                                                         dst_path=str(tmp_path / lm.model_id)))
            tensors, _ = load_tensors(d / "state.safetensors")                  # safetensors: no unpickling
            assert any(k.startswith("generator_ema/") for k in tensors)
            assert sorted(p.name for p in d.iterdir()) == ["state.json", "state.safetensors"]
    assert {"lr_gen", "alpha", "forget"} <= set(trial.data.params)
    arts = {a.path for a in client.list_artifacts(trial.info.run_id)}
    assert {"curves.png", "metrics.json", "samples_generator.png"} <= arts
    assert "summary.md" in {a.path for a in client.list_artifacts(parent)}
    # what people compare, where they look: the parent's row and each target's row of the runs table
    assert (f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey=sfd-sweep") in r.stdout
    figures = client.get_run(parent).data.metrics
    assert figures["targets_with_best"] == 2 and figures["worst_best_fd_ratio"] == summary["fd_ratio"].max()
    assert figures["min_best_ua"] == summary["ua"].min() and "worst_best_fd_ratio_fresh" in figures
    for t in by_kind["target"]:
        assert {"ua", "fd_ratio", "override_fd_ratio", "ua_fresh", "fd_ratio_fresh"} <= set(t.data.metrics)
    assert "summary_table.json" in {a.path for a in client.list_artifacts(parent)}


def test_dry_run_names_the_trial_runner_and_a_policys_defaults(tmp_path, capsys):
    """--dry-run says where the trials run (auto resolved by workers per trial) and which targets get
    their override policy's defaults."""
    from orchestration.sweep import main
    assert main(["--targets", "digits:3", "digits:4->random", "--dry-run", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "trials: 1 worker(s) each, run in the Tune trial's process (--trial-runner tune)" in out
    extra = load_space(space_path("digits")).by_override["random"]
    assert f"target digits:4->random (its policy's defaults: {extra})" in out
    assert "target digits:3->4\n" in out
    assert main(["--targets", "digits:3", "--workers-per-trial", "2", "--dry-run", "--out", str(tmp_path / "b")]) == 0
    assert "run as Ray Train jobs (--trial-runner train)" in capsys.readouterr().out


def test_a_default_outside_a_choice_is_refused_by_name(tmp_path):
    """A default (or a policy's default) that is not one of a `choice` parameter's values: the space is refused
    when loaded, naming the setting, its value and the fix — not Optuna's bare "'16' not in (...)" mid-sweep.
    Control: the shipped space with the choice added, and the defaults among its values, loads."""
    import yaml
    doc = yaml.safe_load(space_path("digits").read_text())
    doc["search"]["batch_remain"] = {"type": "choice", "values": [64, 96, 128, 192]}
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(doc))
    assert load_space(p).params["batch_remain"]
    doc["defaults"]["batch_remain"] = 16
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=r"search.batch_remain: the default batch_remain=16 is not one of its values"):
        load_space(p)
    doc["defaults"]["batch_remain"] = 128
    doc["override_defaults"]["random"]["batch_remain"] = 16
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=r"batch_remain=16 is not one of search.batch_remain's values"):
        load_space(p)
