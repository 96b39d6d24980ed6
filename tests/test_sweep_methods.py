"""The method dimension of the sweep (`sweep.py --methods`, docs/baselines.md): every target once per method,
each with its own study over its own search block, the same wall-time budget per trial (`--trial-seconds`),
a `method` column and MLflow tag, and a per-method table; a real tiny sweep of SFD and SalUn on local Ray."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from orchestration.results import method_picks, method_table, methods_markdown
from sfd.evaluate.plots import plot_methods
from orchestration.search import PerTargetSearch
from orchestration.space import load_space, space_for, space_path, trials_for
from orchestration.sweep import main
from orchestration.targets import parse_methods, parse_targets, with_methods

REPO = Path(__file__).resolve().parent.parent


def test_each_target_is_planned_once_per_method(tmp_path, capsys):
    assert main(["--targets", "digits:3", "--methods", "sfd,esd,salun", "--trial-seconds", "30", "--dry-run",
                 "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "[sweep] plan: 1 target(s) x 3 methods (sfd, esd, salun) x 2 trials = 6 trials" in out
    assert "  target digits:3->4\n  target digits:3->4 [esd]\n  target digits:3->4 [salun]\n" in out
    # each method searches its own block of the YAML
    assert "space digits [esd]: " in out and "searches esd_negative_guidance, esd_start_guidance, lr_finetune;" in out
    assert "space digits [salun]: " in out and "searches lr_finetune, salun_alpha, salun_mask_ratio;" in out
    assert "lr_finetune: 0.0001" in out and "methods[esd]; Optuna searches it: methods.esd.search.lr_finetune" in out
    # the same wall-time budget for every trial of every method
    assert "at most 30 s of training (--trial-seconds)" in out
    assert out.count("max_seconds: 30.0") == 3 and "# --trial-seconds" in out
    # negative control: the default plans SFD alone, as before methods existed
    assert main(["--targets", "digits:3", "--dry-run", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "[sweep] plan: 1 target(s) x 2 trials = 2 trials" in out and "[esd]" not in out and "max_seconds" not in out


@pytest.mark.parametrize("flags, needle", [
    (["--methods", "sfd,ssd"], "--methods: unknown method 'ssd' — give a comma-separated list of sfd, esd, sa, salun"),
    (["--methods", "esd,esd"], "--methods: esd listed twice"),
    (["--methods", "sfd,"], "unknown method ''"),
    (["--trial-seconds", "0"], "--trial-seconds 0.0 is invalid — give a positive number of seconds"),
    (["--trial-seconds", "nan"], "--trial-seconds nan is invalid"),
    (["--methods", "sfd,sa", "--workers-per-trial", "2"], "--methods sa: the baselines run in one process per trial"),
])
def test_bad_methods_or_budget_exit_2_naming_the_value(tmp_path, capsys, flags, needle):
    assert main(["--targets", "digits:3", *flags, "--dry-run", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and not (tmp_path / "x").exists()


def test_unknown_method_from_the_command_line_exits_2():
    r = subprocess.run([sys.executable, str(REPO / "orchestration" / "sweep.py"), "--targets", "digits:3",
                        "--methods", "sfd,esdd", "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown method 'esdd'" in r.stderr and "sfd, esd, sa, salun" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_method_without_an_entry_in_the_space_is_refused(tmp_path):
    doc = yaml.safe_load(space_path("digits").read_text())
    del doc["methods"]["sa"]
    p = tmp_path / "nosa.yaml"
    p.write_text(yaml.safe_dump(doc))
    assert main(["--targets", "digits:3", "--methods", "sfd,sa", "--space", str(p), "--dry-run",
                 "--out", str(tmp_path / "o")]) == 2


@pytest.mark.parametrize("mutate, needle", [
    (lambda m: m.update(esdd={"defaults": {}}), "methods.esdd: not a baseline; give one of esd, sa, salun"),
    (lambda m: m["esd"]["defaults"].update(budget_kimg=5), r"methods.esd.defaults: \['budget_kimg'\] cannot differ"),
    (lambda m: m["esd"]["defaults"].update(lr_finetune=-1.0), "methods.esd.defaults: lr_finetune"),
    (lambda m: m["sa"]["search"].update(pool_per_condition={"type": "int", "low": 8, "high": 64}),
     "methods.sa.search.pool_per_condition: not a tunable SFD setting"),
    (lambda m: m["salun"]["search"].update(salun_alpha={"type": "loguniform", "low": 0.1, "high": 0.5}),
     "methods.salun.search.salun_alpha: the default salun_alpha=0.05 lies outside"),
    (lambda m: m["esd"].update(serach={}), "methods.esd: must be a mapping with 'defaults' and 'search'"),
])
def test_malformed_methods_block_names_the_key(tmp_path, mutate, needle):
    doc = yaml.safe_load(space_path("digits").read_text())
    mutate(doc["methods"])
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=needle):
        load_space(p)


def test_each_method_gets_its_own_study_over_its_own_settings():
    space = load_space(space_path("digits"))
    targets = with_methods(parse_targets(["digits:3"], "next"), parse_methods("sfd,esd,sa"))
    assert [t.name for t in targets] == ["digits:3->4", "digits:3->4 [esd]", "digits:3->4 [sa]"]
    assert [t.slug for t in targets] == ["digits_forget3_to_4", "digits_forget3_to_4_esd", "digits_forget3_to_4_sa"]
    search = PerTargetSearch(targets, {"digits": space}, 2, {"seed": 0, "max_seconds": 30.0})
    got = {}
    for i in range(6):
        cfg = search.suggest(f"t{i}")
        got.setdefault(cfg["target"], []).append(cfg)
    assert sorted(got) == sorted(t.name for t in targets) and all(len(v) == 2 for v in got.values())
    sfd, esd, sa = got["digits:3->4"], got["digits:3->4 [esd]"], got["digits:3->4 [sa]"]
    assert sfd[0]["method"] == "sfd" and sfd[0]["sfd"]["method"] == "sfd" and "lr_gen" in sfd[0]["params"]
    assert esd[0]["method"] == "esd" and esd[0]["sfd"]["method"] == "esd"
    assert set(esd[1]["params"]) == {"lr_finetune", "esd_negative_guidance", "esd_start_guidance"}
    # each study's first trial is the method's own recipe from the YAML, every trial has the same time budget
    assert esd[0]["params"] == {"lr_finetune": 1e-4, "esd_negative_guidance": 1.0, "esd_start_guidance": 2.0}
    assert esd[0]["sfd"]["batch_forget"] == 64 and sa[0]["sfd"]["sa_lambda"] == 10.0 and sa[0]["baseline"]
    assert {c["sfd"]["max_seconds"] for v in got.values() for c in v} == {30.0}
    assert search.suggest("t6") == search.FINISHED
    # a baseline whose entry searches nothing runs its recipe once
    space.methods["sa"] = (space.methods["sa"][0], {})
    assert trials_for({"digits": space}, targets[2], 2) == 1 and trials_for({"digits": space}, targets[1], 2) == 2
    assert space_for({"digits": space}, targets[2]).baseline_point() == {}


def _row(target, method, tid, ua, fd_ratio, best=False, **kw):
    base = {"target": target, "method": method, "trial_id": tid, "status": "finished", "ua": ua, "fd_ratio": fd_ratio,
            "override_fd_ratio": 1.0, "remaining_accuracy": 0.99, "nfe": 1.0 if method == "sfd" else 35.0,
            "images_per_second_generator": 5000.0 if method == "sfd" else 130.0, "train_seconds": 30.0, "best": best}
    return {**base, **kw}


def test_per_method_table_takes_each_targets_pick_and_reports_median_and_worst(tmp_path):
    rows = [_row("digits:3->4", "sfd", "a", 1.0, 1.5, best=True), _row("digits:3->4", "sfd", "b", 1.0, 1.2),
            _row("digits:5->6", "sfd", "c", 0.995, 2.5, best=True),
            _row("digits:7->8", "sfd", "d", 0.999, 1.9, best=True, images_per_second_generator=3000.0),
            # esd: no trial at the threshold on 5->6, its highest UA stands for it; a failed trial does not count
            _row("digits:3->4", "esd", "e", 0.999, 17.0, best=True),
            _row("digits:5->6", "esd", "f", 0.40, 3.0), _row("digits:5->6", "esd", "g", 0.70, 9.0),
            _row("digits:5->6", "esd", "h", 1.0, 0.1, status="failed")]
    picks = method_picks(rows)
    assert {k: r["trial_id"] for k, r in picks.items()} == {
        ("digits:3->4", "sfd"): "a", ("digits:5->6", "sfd"): "c", ("digits:7->8", "sfd"): "d",
        ("digits:3->4", "esd"): "e", ("digits:5->6", "esd"): "g"}
    summary = pd.DataFrame([
        {"target": t, "method": m, "trials": n, "best_trial": b} for t, m, n, b in [
            ("digits:3->4", "sfd", 2, "a"), ("digits:5->6", "sfd", 1, "c"), ("digits:7->8", "sfd", 1, "d"),
            ("digits:3->4", "esd", 1, "e"), ("digits:5->6", "esd", 3, "")]])
    df = method_table(rows, summary, tmp_path, 0.99).set_index("method")
    assert df.loc["sfd", "targets"] == 3 and df.loc["sfd", "targets_at_ua_threshold"] == 3
    assert df.loc["esd", "targets_at_ua_threshold"] == 1 and df.loc["esd", "trials"] == 4
    assert df.loc["sfd", "fd_ratio_median"] == 1.9 and df.loc["sfd", "fd_ratio_worst"] == 2.5     # worst: highest
    assert df.loc["sfd", "ua_worst"] == 0.995 and df.loc["esd", "ua_worst"] == 0.70               # worst: lowest
    assert df.loc["esd", "fd_ratio_median"] == 13.0 and df.loc["esd", "nfe_median"] == 35
    assert df.loc["sfd", "images_per_second_generator_worst"] == 3000.0
    assert pd.read_parquet(tmp_path / "methods.parquet").shape[0] == 2
    md = (tmp_path / "methods.md").read_text()
    assert "| sfd | 3/3 | 0.999 / 0.995 | 1.90 / 2.50 |" in md and "| esd | 1/2 | 0.849 / 0.700 |" in md
    assert methods_markdown(df.reset_index(), 0.99) == md
    # the plot per preset: each method's median where the table puts it, one point per pick, the failed trial left out
    assert [p.name for p in tmp_path.glob("methods-*.png")] == ["methods-digits.png"]
    fig = plot_methods(list(picks.values()), tmp_path / "again.png", ua_threshold=0.99)
    drawn = {a.get_gid(): a.get_offsets().tolist() for ax in fig.axes for a in ax.collections}
    assert drawn["sfd-median-quality"] == [[1.9, 0.999]] and drawn["esd-median-quality"][0] == pytest.approx([13.0, 0.8495])
    assert drawn["sfd-median-cost"] == [[5000.0, 0.999]] and len(drawn["esd-picks-cost"]) == 2
    assert sorted(x for x, _ in drawn["esd-picks-quality"]) == [9.0, 17.0]      # h (failed, FD 0.1) is not a pick


@pytest.mark.slow
def test_tiny_sweep_of_two_methods_on_one_target(tmp_path, monkeypatch):
    """SFD and SalUn on digits:3, one trial each, under the same 3-s training budget (their kimg budgets
    far out of reach): a method column and tag, run names that show the method, the per-method table."""
    monkeypatch.setenv("SFD_CACHE", str(tmp_path / "cache"))
    doc = yaml.safe_load(space_path("digits").read_text())
    doc["defaults"].update({"budget_kimg": 500, "eval_every_kimg": 250, "checkpoint_every_kimg": 250,
                            "eval_forget_samples": 40, "eval_remain_per_class": 20, "batch_remain": 16,
                            "batch_forget": 16, "pool_per_condition": 8})
    doc.pop("trial", None)
    doc["search"].pop("batch_remain", None)      # the tiny batch is not among its choices
    for m in doc["methods"].values():
        for k in ("batch_forget", "batch_remain"):
            m["defaults"].pop(k, None)
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(doc))
    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, str(REPO / "orchestration" / "sweep.py"), "--targets", "digits:3",
                        "--methods", "sfd,salun", "--trials-per-target", "1", "--trial-seconds", "3",
                        "--space", str(space), "--out", str(out), "--num-cpus", "2", "--ua-threshold", "0",
                        "--fresh-seed", "-1"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 targets x 2 methods x 1 trials = 2 trials" in r.stdout and "# Methods side by side" in r.stdout
    trials = pd.read_parquet(out / "trials.parquet")
    assert sorted(trials["method"]) == ["salun", "sfd"] and set(trials["target"]) == {"digits:3->4"}
    assert (trials["status"] == "finished").all()
    by = trials.set_index("method")
    assert by.loc["sfd", "nfe"] == 1 and by.loc["salun", "nfe"] == 35
    # the time budget ended both trials, far before their 500 kimg
    for m in ("sfd", "salun"):
        assert 3.0 <= by.loc[m, "train_seconds"] < 30 and by.loc[m, "kimg"] < 50, by.loc[m].to_dict()
        assert math.isfinite(by.loc[m, "images_per_second_generator"])
        cfg = json.loads((Path(by.loc[m, "run_dir"]) / "metrics.json").read_text())["config"]
        assert cfg["method"] == m and cfg["max_seconds"] == 3.0
    assert Path(by.loc["salun", "run_dir"]).parent.name == "digits_forget3_to_4_salun"
    summary = pd.read_parquet(out / "summary.parquet")
    assert sorted(summary["method"]) == ["salun", "sfd"] and "| digits:3->4 | salun |" in (out / "summary.md").read_text()
    assert (out / "best" / "digits_forget3_to_4_salun" / "model.safetensors").is_file()
    assert (out / "best" / "digits_forget3_to_4" / "generator.safetensors").is_file()
    methods = pd.read_parquet(out / "methods.parquet").set_index("method")
    assert list(methods.index) == ["sfd", "salun"] and methods.loc["salun", "nfe_median"] == 35
    assert methods.loc["sfd", "images_per_second_generator_median"] > methods.loc["salun", "images_per_second_generator_median"]

    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sfd-sweep")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    trial_runs = {r.data.tags["method"]: r for r in runs if r.data.tags.get("kind") == "trial"}
    assert sorted(trial_runs) == ["salun", "sfd"]
    assert trial_runs["salun"].info.run_name.startswith("digits_forget3_to_4_salun-")
    assert trial_runs["salun"].data.tags["target"] == "digits:3->4" and trial_runs["salun"].data.params["method"] == "salun"
    target_runs = {r.info.run_name for r in runs if r.data.tags.get("kind") == "target"}
    assert target_runs == {"digits:3->4", "digits:3->4 [salun]"}
    parent = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    assert "salun_median_best_fd_ratio" in parent.data.metrics and "median_best_fd_ratio" in parent.data.metrics
    assert {"methods.md", "methods-digits.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
