"""The KubeRay deployment in orchestration/kuberay/:

- the RayJob/RayCluster documents against KubeRay's own CRD schemas (../shared/kuberay/, the
  openAPIV3Schema of each CRD), strictly: an unknown field anywhere is an error, as
  `kubectl --validate=strict` treats it (and a misspelled field fails: negative control);
- the core objects (Namespace, Deployment, Service, PVC) with kubernetes-validate (offline, strict);
- the RayJob's entrypoint through the sweep's own --dry-run checks, its files replaced by fixtures
  and its services by the session's real ones (moto S3, MLflow server, 2-node Ray);
- the Dockerfile pins its base image and the lock file pins every dependency of pyproject.toml.
"""
import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "orchestration" / "kuberay"
CRDS = REPO.parent / "shared" / "kuberay"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def documents():
    docs = []
    for f in sorted(KUBERAY.glob("*.yaml")):
        docs += [(f.name, d) for d in yaml.load_all(f.read_text(), Loader=_Loader) if d]
    return docs


def strict(schema):
    """A copy of an openAPIV3Schema where every object that lists its properties (and does not say
    x-kubernetes-preserve-unknown-fields or give additionalProperties) rejects unknown ones."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(schema)
    return schema


@pytest.fixture(scope="module")
def crd_validators():
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (the shared test data beside the repository is absent)")
    import jsonschema
    out = {}
    for kind, name in (("RayJob", "ray.io_rayjobs.yaml"), ("RayCluster", "ray.io_rayclusters.yaml")):
        crd = yaml.load((CRDS / name).read_text(), Loader=_Loader)
        v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = strict(v1["schema"]["openAPIV3Schema"])
        # the API server checks metadata as an ObjectMeta; these are the fields our manifests may use
        schema["properties"]["metadata"] = {"type": "object", "additionalProperties": False, "properties": {
            "name": {"type": "string"}, "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
        schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
        out[kind] = jsonschema.Draft7Validator(schema)
        out[f"{kind}-as-published"] = jsonschema.Draft7Validator(v1["schema"]["openAPIV3Schema"])
    return out


def errors(validator, doc):
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(doc)]


def ray_docs():
    return [(f, d) for f, d in documents() if d.get("apiVersion") == "ray.io/v1"]


def rayjob():
    return next(d for f, d in ray_docs() if d["kind"] == "RayJob")


def test_ray_documents_match_the_kuberay_crds_strictly(crd_validators):
    docs = ray_docs()
    assert {d["kind"] for _, d in docs} >= {"RayJob"}
    for f, d in docs:
        assert errors(crd_validators[d["kind"]], d) == [], f
    spec = rayjob()["spec"]["rayClusterSpec"]
    # a CPU head that runs no trial, an autoscaling GPU worker group
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    gpu = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]
           ["resources"]["limits"]]
    assert gpu and gpu[0]["minReplicas"] < gpu[0]["maxReplicas"]


@pytest.mark.parametrize("where, misspelled", [
    (lambda d: d["spec"], "shutdownAfterJobFinish"),                                       # top of the spec
    (lambda d: d["spec"]["rayClusterSpec"], "enableInTreeAutoscalling"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0], "maxReplica"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0], "imagePulPolicy"),
    (lambda d: d["metadata"], "lables"),
])
def test_a_misspelled_field_fails_the_schema_test(crd_validators, where, misspelled):
    """Negative control: the same RayJob with one field misspelled is rejected, naming the field."""
    doc = copy.deepcopy(rayjob())
    node = where(doc)
    correct = next((k for k in node if k.startswith(misspelled[:6])), None)
    node[misspelled] = node.pop(correct) if correct else "x"
    errs = errors(crd_validators["RayJob"], doc)
    unexpected = f"'{misspelled}' was unexpected"
    assert any(unexpected in e for e in errs), errs
    if misspelled != "lables":
        # the CRD schema as published accepts it: without the strict reading the typo would pass
        assert not any(unexpected in e for e in errors(crd_validators["RayJob-as-published"], doc))


def test_core_objects_are_valid_kubernetes(tmp_path):
    import kubernetes_validate
    core = [(f, d) for f, d in documents() if d.get("apiVersion") != "ray.io/v1"]
    assert {d["kind"] for _, d in core} >= {"Deployment", "Service", "PersistentVolumeClaim"}
    version = kubernetes_validate.utils.latest_version()
    for f, d in core:
        kubernetes_validate.validate(d, version, strict=True)       # raises ValidationError naming the field
    # negative control: kubernetes-validate really is strict here
    bad = copy.deepcopy(next(d for _, d in core if d["kind"] == "Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["imagePulPolicy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePulPolicy"):
        kubernetes_validate.validate(bad, version, strict=True)


def test_mlflow_server_keeps_runs_on_a_volume_and_artifacts_on_s3():
    docs = {d["kind"]: d for _, d in documents() if d.get("apiVersion") != "ray.io/v1"}
    c = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(c.get("command", []) + c.get("args", []))
    assert "mlflow server" in args and "--artifacts-destination=s3://" in args
    db = re.search(r"--backend-store-uri=sqlite:///(\S+)", args).group(1)
    mount = c["volumeMounts"][0]["mountPath"]
    assert db.startswith(mount)
    claim = docs["Deployment"]["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]
    svc = docs["Service"]
    port = svc["spec"]["ports"][0]["port"]
    host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{port}"
    assert f"--mlflow-uri http://{host}" in rayjob()["spec"]["entrypoint"]       # the job logs to this server


def _entrypoint_args(tmp_path, moto_s3, mlflow_s3, cluster_address):
    """The RayJob's entrypoint as sweep.py arguments: /data files -> fixture files, the bucket -> moto's,
    the tracking server -> the session's, --address auto -> the 2-node test cluster."""
    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    assert argv[:2] == ["python", "orchestration/sweep.py"]
    out = []
    for a in argv[2:]:
        if a.startswith("/data/"):
            f = tmp_path / a.lstrip("/")
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(b"fixture")
            a = str(f)
        elif a.startswith("s3://YOUR-BUCKET/"):
            a = a.replace("YOUR-BUCKET", moto_s3["bucket"])
        elif a.startswith("http://mlflow."):
            a = mlflow_s3
        elif a == "auto":
            a = cluster_address
        out.append(a)
    return out


@pytest.mark.cluster
def test_rayjob_entrypoint_passes_the_sweeps_dry_run(tmp_path, moto_s3, mlflow_s3, ray_two_nodes, capsys,
                                                     monkeypatch):
    from orchestration import sweep
    cluster, _ = ray_two_nodes
    monkeypatch.setenv("SFD_HOME", str(tmp_path / "empty-home"))       # nothing comes from a cache
    args = _entrypoint_args(tmp_path, moto_s3, mlflow_s3, cluster.address)
    assert sweep.main(args + ["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "10 target(s)" in printed and "dry run: every service answers" in printed
    # negative control: a fixed override class for every target is refused for the target it forgets
    # (cifar10.yaml's own override is 'next' for that reason)
    assert sweep.main(args + ["--override", "1", "--dry-run"]) == 2
    assert "override class 1 is itself forgotten" in capsys.readouterr().err
    # negative control: the entrypoint as it was (no --fid-weights/--reference) exits 2 on CIFAR-10
    i = args.index("--fid-weights")
    del args[i:i + 4]
    assert "--reference" not in args
    assert sweep.main(args + ["--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "fid_weights" in err and "reference" in err


def test_dockerfile_and_lock_pin_every_version():
    text = (KUBERAY / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert re.fullmatch(r"rayproject/ray:2\.60\.0-py311(-gpu)?", base), base
    assert '"torch==2.13.0"' in text
    lock = {}
    for line in (KUBERAY / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"unpinned line in requirements.lock: {line}"
            lock[re.sub(r"[-_.]+", "-", name).lower()] = version
    import tomllib
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.sub(r"[-_.]+", "-", re.split(r"[\[<>=! ]", dep)[0]).lower()
        if name == "torch":
            continue
        assert name in lock, f"{name} is not pinned in orchestration/kuberay/requirements.lock"
        m = re.search(r"==\s*([\w.]+)", dep)
        if m:
            assert lock[name] == m.group(1), f"{name}: pyproject pins {m.group(1)}, the lock {lock[name]}"
    # the same Ray everywhere: pyproject, the base image, the RayJob's rayVersion
    assert rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == lock["ray"] == "2.60.0"
