"""Real services for the cluster tests, each started once per test session on 127.0.0.1:

- ``moto_s3``: moto's standalone S3 server (``python -m moto.server``) with one bucket; the standard
  AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION variables are set
  in this process (and so in every process it starts), which boto3, s3fs, pyarrow and MLflow read;
- ``mlflow_s3``: a real ``mlflow server`` (SQLite backend in a temporary folder) whose artifacts go to
  that bucket (``--artifacts-destination s3://...``);
- ``ray_two_nodes``: a real 2-node Ray cluster (a head and a worker node, separate raylets with their
  own scratch folder and reference cache, ``ray.cluster_utils.Cluster``), 2 CPUs each.
Registered in conftest.py; nothing here is a mock.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

BUCKET = "sfd-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with code {proc.returncode} before answering")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"{what} did not answer within {timeout:.0f} s")


@pytest.fixture(scope="session")
def moto_s3():
    """{'endpoint', 'bucket', 'env'}: moto's S3 server with the bucket created."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    _wait_http(endpoint + "/moto-api/", proc, "moto's S3 server")
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield {"endpoint": endpoint, "bucket": BUCKET, "env": env}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_s3(moto_s3, tmp_path_factory):
    """URI of a real MLflow tracking server whose artifacts live in the moto bucket under mlflow/."""
    d = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
         "--artifacts-destination", f"s3://{moto_s3['bucket']}/mlflow"],
        stdout=open(d / "server.log", "w"), stderr=subprocess.STDOUT,
        # no background job runners (8 extra processes on a 2-core machine): the tests use none
        env={**os.environ, **moto_s3["env"], "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    _wait_http(uri + "/health", proc, "the MLflow tracking server")
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")        # only tests/test_cluster.py uses it: gone before the other modules
def ray_two_nodes(moto_s3, tmp_path_factory):
    """(cluster, {node_id: scratch folder}): a head and a worker node, 2 CPUs each, each with its own
    scratch folder and reference cache; the S3 variables are in both raylets' environments."""
    from ray.cluster_utils import Cluster

    root = tmp_path_factory.mktemp("ray-nodes")
    nodes = {}

    def env(name):
        (root / name / "scratch").mkdir(parents=True)
        return {**moto_s3["env"], "SFD_SCRATCH": str(root / name / "scratch"), "SFD_CACHE": str(root / name / "cache"),
                "OMP_NUM_THREADS": "1", "RAY_TRAIN_V2_ENABLED": "1"}

    # A private Ray temp dir: Cluster records its address in <RAY_TMPDIR>/ray/ray_current_cluster, and a
    # plain ray.init() elsewhere on this shared machine must not find and join this cluster.
    saved = os.environ.get("RAY_TMPDIR")
    ray_tmp = tempfile.mkdtemp(prefix="sfdray-", dir="/tmp")        # short: socket paths <= 107 chars
    os.environ["RAY_TMPDIR"] = ray_tmp
    try:
        for attempt in range(3):
            # the raylet gives its agents a fixed 15 s to start (ray-project/ray#65983): on a loaded machine, retry
            try:
                cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "env_vars": env("head"),
                                                                        "include_dashboard": False})
                worker = cluster.add_node(num_cpus=2, env_vars=env("worker"))
                cluster.wait_for_nodes()
                break
            except Exception:
                if attempt == 2:
                    raise
                for name in ("head", "worker"):
                    shutil.rmtree(root / name, ignore_errors=True)
    finally:
        finally_restore_tmpdir(saved)     # the raylets have it; later ray.init() calls must not find this cluster
    nodes[cluster.head_node.node_id] = root / "head"
    nodes[worker.node_id] = root / "worker"
    yield cluster, nodes
    cluster.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)


def finally_restore_tmpdir(saved) -> None:
    if saved is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = saved
