"""The sweep on a cluster, against real services started once per session (tests/services.py):
moto's S3 server, an MLflow tracking server with its artifacts on S3, a 2-node local Ray cluster.

- storage: any pyarrow URI (local path, s3://), Parquet through pyarrow's filesystem, folders;
- --dry-run probes: each unreachable service is one line naming it (exit 2);
- a 2-target sweep with --storage s3:// on the 2-node cluster, 2-worker trials spread over both
  nodes: Ray checkpoints, trial outputs, results tables, the reference cache and MLflow's
  artifacts are all in the bucket; the trials read the reference samples from it.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestration.space import space_path
from orchestration.storage import Storage

REPO = Path(__file__).resolve().parent.parent
TINY = {"budget_kimg": 0.25, "eval_every_kimg": 0.25, "checkpoint_every_kimg": 0.25, "eval_forget_samples": 60,
        "eval_remain_per_class": 20, "batch_remain": 16, "batch_forget": 16}


def sweep(args, timeout=300, env=None):
    import os
    return subprocess.run([sys.executable, str(REPO / "orchestration" / "sweep.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def tiny_space(tmp_path) -> Path:
    doc = yaml.safe_load(space_path("digits").read_text())
    doc["defaults"].update(TINY)
    doc["search"].pop("batch_remain", None)      # the tiny batch is not among its choices
    doc.pop("trial", None)
    doc["stage1_kimg"] = 0
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


@pytest.mark.parametrize("kind", ["local", pytest.param("s3", marks=pytest.mark.cluster)])
def test_storage_tables_and_folders_round_trip(kind, tmp_path, request):
    import pandas as pd
    if kind == "s3":
        s3 = request.getfixturevalue("moto_s3")
        uri = f"s3://{s3['bucket']}/roundtrip-{tmp_path.name}"
    else:
        uri = str(tmp_path / "store")
    store = Storage.from_uri(uri)
    df = pd.DataFrame({"trial_id": ["a", "b"], "ua": [0.5, 1.0]})
    store.write_parquet(df, "results/trials.parquet")
    pd.testing.assert_frame_equal(store.read_parquet("results/trials.parquet"), df)
    src = tmp_path / "run"
    (src / "checkpoints" / "ckpt-1").mkdir(parents=True)
    (src / "metrics.json").write_text('{"ua": 1}')
    (src / "checkpoints" / "ckpt-1" / "state.json").write_text("{}")
    store.upload_dir(src, "trials/t/1")
    assert store.list("trials") == ["trials/t/1/checkpoints/ckpt-1/state.json", "trials/t/1/metrics.json"]
    got = store.download_dir("trials/t/1", tmp_path / "back")
    assert sorted(p.relative_to(tmp_path / "back").as_posix() for p in got) == [
        "checkpoints/ckpt-1/state.json", "metrics.json"]
    assert (tmp_path / "back" / "metrics.json").read_text() == '{"ua": 1}'
    if kind == "s3":                          # really in the bucket, seen by another client (boto3)
        import boto3
        keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3["bucket"])["Contents"]}
        assert f"roundtrip-{tmp_path.name}/results/trials.parquet" in keys


def test_storage_rejects_a_uri_pyarrow_does_not_know():
    with pytest.raises(ValueError, match=r"--storage 'nosuch://x/y' is not a URI pyarrow understands"):
        Storage.from_uri("nosuch://x/y")


def _closed_port():
    from services import free_port
    return free_port()                        # bound and released: nothing listens there


@pytest.mark.cluster
def test_dry_run_names_each_unreachable_service(tmp_path, moto_s3, mlflow_s3, ray_two_nodes, capsys):
    cluster, _ = ray_two_nodes
    base = ["--targets", "digits:1", "--dry-run", "--out", str(tmp_path / "out")]
    ok = sweep(base + ["--storage", f"s3://{moto_s3['bucket']}/dry", "--mlflow-uri", mlflow_s3,
                       "--address", cluster.address], timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for line in ("storage: s3://sfd-test/dry writable", f"MLflow: {mlflow_s3} answers",
                 f"Ray: {cluster.address} reachable", "digits_teacher:"):
        assert line in ok.stdout
    assert not (tmp_path / "out").exists()                 # a dry run creates nothing
    dead = f"127.0.0.1:{_closed_port()}"
    cases = [
        (["--mlflow-uri", f"http://{dead}"], f"MLflow tracking server http://{dead} does not answer"),
        (["--address", dead], f"Ray cluster --address {dead} ({dead}) is unreachable"),
        (["--storage", "s3://no-such-bucket-sfd/x"], "storage s3://no-such-bucket-sfd/x is not writable"),
        (["--storage", "s3://sfd-test/x"], "storage s3://sfd-test/x"),       # with a dead S3 endpoint, below
    ]
    from orchestration import sweep as sweep_cli     # the failures in-process (same main(), no re-import)
    for i, (extra, needle) in enumerate(cases):
        with pytest.MonkeyPatch.context() as mp:
            if i == 3:
                mp.setenv("AWS_ENDPOINT_URL", f"http://{dead}")
            t0 = time.time()
            rc = sweep_cli.main(base + extra)
            took = time.time() - t0
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, (extra, err)
        assert len(err) == 1 and err[0].startswith("sweep.py: error: ") and needle in err[0], (extra, err)
        assert took < 30, f"{extra}: the probe took {took:.0f} s"


def _bucket_keys(bucket: str, prefix: str) -> list[str]:
    import boto3
    keys = []
    for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


@pytest.mark.cluster
def test_two_node_sweep_keeps_everything_in_s3(tmp_path, moto_s3, mlflow_s3, ray_two_nodes, teacher,
                                               monkeypatch):
    import fnmatch

    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from sfd.io import read_metadata

    cluster, nodes = ray_two_nodes
    bucket = moto_s3["bucket"]
    uri = f"s3://{bucket}/sweep"
    out = tmp_path / "out"
    r = sweep(["--targets", "digits:0->1", "digits:5", "--trials-per-target", "1", "--space", str(tiny_space(tmp_path)),
               "--workers-per-trial", "2", "--placement", "spread", "--storage", uri, "--mlflow-uri", mlflow_s3,
               "--address", cluster.address, "--out", str(out), "--ua-threshold", "0", "--fresh-seed", "-1",
               "--no-shared-stage1"], timeout=420)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "as 2 Ray task(s)" in r.stdout                 # 600 reference images = 2 chunks, sampled on the workers

    keys = _bucket_keys(bucket, "sweep/")
    print(f"{len(keys)} objects under {uri}:\n  " + "\n  ".join(sorted(keys)))

    def has(pattern):
        return [k for k in keys if fnmatch.fnmatch(k, pattern)]

    # Ray: Tune's experiment state and every trial's Ray Train checkpoints
    assert has("sweep/tune-*")
    assert len({k.split("/")[1] for k in has("sweep/train-*/checkpoint_*/state.safetensors")}) == 2
    # each trial's outputs, uploaded from its node-local run folder
    trials = sorted({k.split("/")[3] for k in has("sweep/trials/*/*/metrics.json")})
    assert len(trials) == 2
    for f in ("metrics.json", "history.json", "curves.png", "generator.safetensors", "checkpoints/*/state.safetensors"):
        assert len(has(f"sweep/trials/*/*/{f}")) >= 2, f
    # results tables, read back from S3 as Parquet through pyarrow's filesystem
    fs, root = pafs.FileSystem.from_uri(uri)
    t = pq.read_table(f"{root}/results/trials.parquet", filesystem=fs).to_pandas()
    assert len(t) == 2 and sorted(t["trial_id"]) == trials and (t["status"] == "finished").all()
    assert len(pq.read_table(f"{root}/results/summary.parquet", filesystem=fs)) == 2
    # the reference cache: one file keyed by teacher digest and sampler settings
    ref = has("sweep/reference/teacher-*-60x10-heun18-s1234-c500.safetensors")
    assert len(ref) == 1
    # MLflow's artifacts went through the tracking server into the bucket
    mlflow_keys = _bucket_keys(bucket, "mlflow/")
    assert any(k.endswith("/curves.png") for k in mlflow_keys) and any(k.endswith("state.safetensors")
                                                                       for k in mlflow_keys)

    # both workers of each trial ran on different nodes of the cluster (--placement spread)
    for trial in trials:
        where = [json.loads(Storage.from_uri(uri).read_bytes(k[len("sweep/"):]))
                 for k in has(f"sweep/trials/*/{trial}/workers/rank-*.json")]
        assert sorted(w["rank"] for w in where) == [0, 1]
        assert len({w["node_id"] for w in where}) == 2 and {w["node_id"] for w in where} <= set(nodes)
    # the trials evaluated against the copy in storage: their node-local caches hold the file the
    # reference tasks wrote (its metadata names them; a cache entry a trial sampled itself has none)
    local = [p for d in nodes.values() for p in (d / "cache").glob("teacher-*.safetensors")]
    assert len(local) == 2, local                          # one per node: both nodes ran a rank 0 or 1
    assert all(read_metadata(p).get("made_by") == "orchestration.reference" for p in local)
    # the driver has the trials' folders (downloaded from S3) for the summary
    assert all((out / "trials").glob(f"*/{trial}/generator.safetensors") for trial in trials)

    # a later sweep with the same teacher and settings reuses the file: no task samples anything
    import ray

    from orchestration.reference import ensure_reference
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        again = ensure_reference(uri, "digits", None, 60, log=lambda *_: None)
    finally:
        ray.shutdown()
    assert again["reused"] and again["tasks"] == 0 and again["name"] == ref[0].rsplit("/", 1)[1]


    # ... and holds exactly what one process's own teacher_samples computes
    import torch

    from sfd.evaluate.forgetting import teacher_samples
    from sfd.io import load_tensors
    tensors, _ = load_tensors(Storage.from_uri(uri).download_file(ref[0][len("sweep/"):], tmp_path / "ref.safetensors"))
    monkeypatch.setenv("SFD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SFD_REFERENCE_STORE", raising=False)
    x, labels = teacher_samples(teacher, 10, 60)
    assert torch.equal(tensors["labels"], labels)
    assert torch.allclose(tensors["x"], x, atol=1e-5), (tensors["x"] - x).abs().max()

    # a sweep on another storage, on a driver whose cache holds that key: copied there, nothing sampled
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        other = ensure_reference(f"s3://{bucket}/other", "digits", None, 60, log=lambda *_: None)
    finally:
        ray.shutdown()
    assert other["reused"] and other["tasks"] == 0 and other["copied_from"] == str(tmp_path / "cache" / other["name"])
    # (pyarrow also writes a 'other/reference/' directory marker)
    assert [k for k in _bucket_keys(bucket, "other/reference/") if not k.endswith("/")] == [
        f"other/reference/{other['name']}"]


@pytest.mark.cluster
def test_one_worker_trials_in_the_tune_process_keep_everything_in_s3(tmp_path, moto_s3, mlflow_s3, ray_two_nodes):
    """--trial-runner tune (the default for one worker) on the 2-node cluster with S3 storage: Tune's
    own checkpoints of the trial and its uploaded outputs are in the bucket, the node it ran on is
    recorded, the driver gets the folder back for the summary; no Ray Train run exists."""
    import fnmatch

    cluster, nodes = ray_two_nodes
    bucket = moto_s3["bucket"]
    uri = f"s3://{bucket}/inline"
    out = tmp_path / "out"
    r = sweep(["--targets", "digits:3", "--trials-per-target", "1", "--space", str(tiny_space(tmp_path)),
               "--storage", uri, "--mlflow-uri", mlflow_s3, "--address", cluster.address, "--out", str(out),
               "--ua-threshold", "0", "--fresh-seed", "-1", "--no-shared-stage1"], timeout=420)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "in the Tune trial" in r.stdout
    keys = _bucket_keys(bucket, "inline/")

    def has(pattern):
        return [k for k in keys if fnmatch.fnmatch(k, pattern)]

    assert has("inline/tune-*/run_trial_*/checkpoint_*/state.safetensors")       # Tune's checkpoints, in S3
    assert not has("inline/train-*")                                             # no Ray Train run
    (trial,) = sorted({k.split("/")[3] for k in has("inline/trials/*/*/metrics.json")})
    for f in ("history.json", "generator.safetensors", "checkpoints/*/state.safetensors"):
        assert has(f"inline/trials/*/{trial}/{f}"), f
    (where,) = [json.loads(Storage.from_uri(uri).read_bytes(k[len("inline/"):]))
                for k in has(f"inline/trials/*/{trial}/workers/rank-*.json")]
    assert where["rank"] == 0 and where["node_id"] in set(nodes)
    assert list((out / "trials").glob(f"*/{trial}/generator.safetensors"))


@pytest.mark.parametrize("argv, needle", [
    (["--reference-cpus", "0"], "--reference-cpus must be > 0"),
    (["--reference-gpus", "-1"], "--reference-gpus >= 0"),
    (["--storage", "nosuch://bucket/x"], "--storage 'nosuch://bucket/x' is not a URI pyarrow understands"),
])
def test_bad_cluster_flags_fail_before_anything_starts(argv, needle, tmp_path, capsys):
    from orchestration import sweep as sweep_cli
    out = tmp_path / "out"
    assert sweep_cli.main(["--targets", "digits:1", "--out", str(out), "--dry-run", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_placement_reaches_ray_trains_scaling_config(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "1")
    from orchestration.cluster import for_cluster, worker_fn
    from sfd.raytrain import make_trainer
    base = make_trainer({}, "/nowhere", num_workers=2)
    assert for_cluster(base, placement="spread").scaling_config.placement_strategy == "SPREAD"
    packed = for_cluster(base, placement="pack", outputs_uri="s3://b/trials/t/1", scratch_rel="s/t/1")
    assert packed.scaling_config.placement_strategy == "PACK" and packed.train_loop_per_worker is worker_fn
    assert packed.scaling_config.num_workers == 2                  # everything else as make_trainer built it
    with pytest.raises(ValueError, match="--placement must be one of pack, spread"):
        for_cluster(base, placement="scatter")
