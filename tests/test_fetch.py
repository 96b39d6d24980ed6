"""`sfd fetch`, assets by name, the trained ResNet-34 judge and cached reference statistics, against a
real HTTP server on 127.0.0.1 serving small fixture files in the official formats (a CIFAR-10 python
archive of Python-2-style pickled batches, an NVIDIA-style EDM pickle, an Inception-shaped state dict).
Nothing leaves the machine: every URL points at the loopback server through the mirror setting."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import pickle
import socket
import struct
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from sfd import assets as A
from sfd.cli import main

REPO = Path(__file__).resolve().parent.parent
N_TRAIN_PER_BATCH, N_TEST = 4, 10


# ----------------------------------------------------------------------------- fixture files

class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` opcodes, as the official CIFAR-10 batches were written."""
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_bytes(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_bytes


def py2_batch(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # The official files name numpy's pre-2.0 module path.
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n")


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_cifar_archive(path, batches=None):
    """A cifar-10-python.tar.gz in the official layout: 5 train batches, a test batch, batches.meta."""
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    with tarfile.open(path, "w:gz") as tar:
        for k, name in enumerate(names):
            n = N_TEST if name == "test_batch" else N_TRAIN_PER_BATCH
            labels = [int(c) for c in (np.arange(n) + 4 * k) % 10]
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            obj = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                   b"filenames": [f"img_{k}_{i}.png".encode() for i in range(n)]}
            _add(tar, f"cifar-10-batches-py/{name}", (batches or {}).get(name) or py2_batch(obj))
        _add(tar, "cifar-10-batches-py/batches.meta",
             py2_batch({b"label_names": [b"airplane", b"automobile"], b"num_vis": 3072, b"num_cases_per_batch": 4}))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Served files, named as the real ones, and their SHA-256s."""
    from sfd.denoisers.edm_networks import build_edm_denoiser
    from sfd.evaluate.inception import FIDInceptionV3
    from test_real_teachers import TINY_SONG, write_nvidia_pickle

    d = tmp_path_factory.mktemp("served")
    write_cifar_archive(d / "cifar-10-python.tar.gz")
    cls, kw = TINY_SONG
    torch.manual_seed(1)
    write_nvidia_pickle(d / "edm-cifar10-32x32-cond-vp.pkl", build_edm_denoiser(cls, kw), cls, kw,
                        "raise SystemExit('module_src must never run')\n")
    torch.manual_seed(2)
    torch.save(FIDInceptionV3().state_dict(), d / "pt_inception-2015-12-05-6726825d.pth")
    sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()}
    return d, sha


def fixture_registry(sha) -> tuple:
    """The real registry with the fixture files' digests pinned (what a mirror with its own builds does)."""
    by_file = {a.filename: a.name for a in A.REGISTRY}
    return A.with_digests(A.REGISTRY, {by_file[f]: ("sha256", h) for f, h in sha.items()})


class Server:
    def __init__(self, root):
        self.root, self.log, self.drop_once = Path(root), [], set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/").split("/")[-1]
                rng = self.headers.get("Range")
                server.log.append((name, rng))
                p = server.root / name
                if not p.is_file():
                    self.send_error(404, "not found")
                    return
                data = p.read_bytes()
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data) and rng:
                    self.send_error(416)
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if name in server.drop_once:           # the connection dies half way through
                    server.drop_once.discard(name)
                    self.wfile.write(data[start:start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/sfd-mirror"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(files):
    s = Server(files[0])
    yield s
    s.close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "sfd-home"
    monkeypatch.setenv("SFD_HOME", str(h))
    monkeypatch.setenv("SFD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SFD_MIRROR", raising=False)
    return h


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/nowhere"


# ----------------------------------------------------------------------------- fetch

@pytest.mark.slow
def test_clean_fetch_then_dry_run_and_forget_resolve_every_file_without_flags(files, server, home, tmp_path,
                                                                               monkeypatch):
    from sfd.evaluate.resnet import ResNet34

    served, sha = files
    torch.manual_seed(3)
    torch.save(ResNet34(num_classes=10).state_dict(), tmp_path / "my_resnet34.pth")
    monkeypatch.setenv("SFD_MIRROR", server.url)
    r = __import__("sfd.fetch", fromlist=["run_fetch"]).run_fetch(
        "cifar10", registry=fixture_registry(sha), progress=False, classifier=str(tmp_path / "my_resnet34.pth"),
        log=lambda *_: None)
    assert r["missing"] == []
    for name in sha:
        cached = next(home.rglob(name))
        assert cached.read_bytes() == (served / name).read_bytes()
        assert not cached.with_name(name + ".part").exists()
    lock = json.loads((home / A.LOCK_NAME).read_text())
    assert {k: v["sha256"] for k, v in lock.items()} == sha
    assert {n for n, _ in server.log} == set(sha)              # resnet init skipped: the user has a judge
    stats = A.reference_stats_path("cifar10")
    with np.load(stats) as f:
        assert f["mu"].shape == (10, 2048) and f["sigma"].shape == (10, 2048, 2048) and list(f["n"]) == [2] * 10

    # A second fetch re-verifies the cache and downloads nothing.
    n_requests = len(server.log)
    __import__("sfd.fetch", fromlist=["run_fetch"]).run_fetch(
        "cifar10", registry=fixture_registry(sha), progress=False, skip_classifier=True, log=lambda *_: None)
    assert len(server.log) == n_requests

    # The card's command, dry: every file resolved from the cache, no flags, nothing started.
    env = {**os.environ, "SFD_HOME": str(home), "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "orchestration/sweep.py", "--targets", "cifar10:0", "--dry-run"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for key, path in (("teacher", home / "cifar10" / "edm-cifar10-32x32-cond-vp.pkl"),
                      ("classifier", A.classifier_path("cifar10")),
                      ("fid_weights", home / "common" / "pt_inception-2015-12-05-6726825d.pth"),
                      ("reference", stats)):
        assert f"[ok] {path}" in p.stdout, (key, p.stdout)
    assert "cifar10:0->1" in p.stdout and "dry run: nothing started" in p.stdout

    # sfd forget: omitted files come from the cache, `--teacher edm` names the cached teacher.
    from sfd.cli import config_from_args, fill_cached_assets
    from sfd.config import SFDConfig
    cfg = fill_cached_assets(SFDConfig(preset="cifar10", teacher="edm"))
    assert cfg.teacher == str(home / "cifar10" / "edm-cifar10-32x32-cond-vp.pkl")
    assert cfg.reference == str(stats) and cfg.classifier == str(A.classifier_path("cifar10"))
    del config_from_args


def test_interrupted_download_resumes_with_range(files, server, home):
    served, sha = files
    reg = fixture_registry(sha)
    edm = next(a for a in reg if a.teacher == "edm")
    server.drop_once.add(edm.filename)
    path = A.download(edm, mirror=server.url, progress=False)
    assert path.read_bytes() == (served / edm.filename).read_bytes()
    reqs = [r for n, r in server.log if n == edm.filename]
    size = (served / edm.filename).stat().st_size
    assert reqs == [None, f"bytes={size // 2}-"]              # the second request resumes where the first died

    # Across runs: without retries the first call stops and keeps the .part; the next call resumes it.
    path.unlink()
    server.log.clear()
    server.drop_once.add(edm.filename)
    with pytest.raises(A.DownloadError, match="run the same command again to resume"):
        A.download(edm, mirror=server.url, progress=False, retries=0)
    assert path.with_name(path.name + ".part").stat().st_size == size // 2
    A.download(edm, mirror=server.url, progress=False, retries=0)
    assert path.read_bytes() == (served / edm.filename).read_bytes()
    assert [r for _, r in server.log] == [None, f"bytes={size // 2}-"]


def test_checksum_mismatch_deletes_the_file_and_says_so(files, server, home, capsys):
    # The fixture archive is not the published one: the real registry's MD5 refuses it.
    rc = main(["fetch", "cifar10", "--mirror", server.url, "--skip-classifier", "--no-stats", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "checksum mismatch for cifar-10-python.tar.gz: md5" in err and "c58f30108f718f92721af3b95e74349a" in err
    assert "deleted" in err
    assert not list(home.rglob("cifar-10-python.tar.gz*"))     # neither the file nor its .part remains

    # Trust on first use: a file without a published digest must match the SHA-256 its first download recorded.
    served, sha = files
    edm = next(a for a in A.REGISTRY if a.teacher == "edm")
    assert edm.digest is None and edm.prefix is None
    A.download(edm, mirror=server.url, progress=False)
    edm.path().unlink()
    lock = json.loads((home / A.LOCK_NAME).read_text())
    lock[edm.filename]["sha256"] = "0" * 64
    (home / A.LOCK_NAME).write_text(json.dumps(lock))
    with pytest.raises(A.DownloadError, match="recorded 0000"):
        A.download(edm, mirror=server.url, progress=False)
    assert not edm.path().exists()


def test_http_404_is_a_clear_error(home, tmp_path, capsys):
    empty = Server(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    try:
        rc = main(["fetch", "cifar10", "--mirror", empty.url, "--no-progress"])
    finally:
        empty.close()
    err = capsys.readouterr().err
    assert rc == 1 and "HTTP 404" in err and f"{empty.url}/cifar-10-python.tar.gz" in err
    assert str(home / "cifar10" / "cifar-10-python.tar.gz") in err          # where to put it by hand


def test_offline_lists_every_file_its_checksum_and_path(home, capsys):
    rc = main(["fetch", "cifar10", "--mirror", closed_port_url(), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot reach the download server" in err
    for a in A.preset_assets("cifar10", None):
        if a.url:                                         # the ones fetch would download
            assert str(a.path()) in err and a.name in err, a.name
    assert "md5 c58f30108f718f92721af3b95e74349a" in err and "sha256 6726825d" in err
    assert not list(home.rglob("*.part"))

    # Without the files the sweep refuses to start and prints the same kind of list.
    from orchestration.sweep import main as sweep_main
    assert sweep_main(["--targets", "cifar10:0", "--dry-run"]) == 2
    err = capsys.readouterr().err
    for p in (home / "cifar10" / "edm-cifar10-32x32-cond-vp.pkl", A.classifier_path("cifar10"),
              A.reference_stats_path("cifar10"), home / "cifar10" / "cifar-10-python.tar.gz"):
        assert str(p) in err
    assert "sfd fetch cifar10" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- datasets, judge, statistics

def test_cifar_archive_reads_safely_and_a_malicious_batch_is_refused(tmp_path):
    from sfd.datasets import load_cifar10

    write_cifar_archive(tmp_path / "ok.tar.gz")
    x, y = load_cifar10(tmp_path / "ok.tar.gz", "train")
    assert x.shape == (5 * N_TRAIN_PER_BATCH, 32, 32, 3) and x.dtype == np.uint8 and sorted(set(y)) == list(range(10))
    xt, _ = load_cifar10(tmp_path / "ok.tar.gz", "test")
    assert xt.shape == (N_TEST, 32, 32, 3)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = pickle.dumps({"data": Evil(), "labels": [0]}, protocol=2)
    write_cifar_archive(tmp_path / "evil.tar.gz", batches={"data_batch_3": evil})
    with pytest.raises(ValueError, match="refusing global .*system"):
        load_cifar10(tmp_path / "evil.tar.gz", "train")
    assert not marker.exists()


def test_stl10_binary_layout(tmp_path):
    from sfd.datasets import load_stl10

    img = np.zeros((96, 96, 3), np.uint8)
    img[:8, :, 0] = 255                        # a red band at the top
    x = img.transpose(2, 1, 0)[None]           # the official files store each image column-major
    with tarfile.open(tmp_path / "stl10_binary.tar.gz", "w:gz") as tar:
        for split in ("train", "test"):
            _add(tar, f"stl10_binary/{split}_X.bin", x.tobytes())
            _add(tar, f"stl10_binary/{split}_y.bin", bytes([3]))
    xs, ys = load_stl10(tmp_path / "stl10_binary.tar.gz", "train")
    assert xs.shape == (1, 64, 64, 3) and list(ys) == [2]
    assert xs[0, 0, :, 0].min() == 255 and xs[0, -1, :, 0].max() == 0


@pytest.mark.slow
def test_train_classifier_cifar10_runs_and_loads_as_the_judge(files, home, capsys):
    from sfd.evaluate import load_judge
    from sfd.evaluate.resnet import ResNet34
    from sfd.presets import get_preset

    served, _ = files
    (home / "cifar10").mkdir(parents=True)
    (home / "cifar10" / "cifar-10-python.tar.gz").write_bytes((served / "cifar-10-python.tar.gz").read_bytes())
    (home / "common").mkdir()
    torch.manual_seed(4)
    torch.save(ResNet34(num_classes=1000).state_dict(), home / "common" / "resnet34-b627a593.pth")   # ImageNet-shaped
    assert main(["train-classifier", "--preset", "cifar10", "--steps", "2", "--batch", "4", "--device", "cpu",
                 "--no-progress"]) == 0
    out = A.classifier_path("cifar10")
    assert str(out) in capsys.readouterr().out
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["steps"] == 2 and manifest["init"].endswith("resnet34-b627a593.pth")
    assert manifest["metrics"]["n_test"] == N_TEST and 0 <= manifest["metrics"]["test_accuracy"] <= 1
    judge = load_judge(get_preset("cifar10"), out, fid_weights=served / "pt_inception-2015-12-05-6726825d.pth")
    with torch.no_grad():
        logits = judge.classifier(torch.zeros(1, 3, 32, 32))
    assert logits.shape == (1, 10)


def test_pooled_class_statistics_equal_the_statistics_of_the_union(tmp_path):
    from sfd.evaluate.metrics import feature_stats, frechet_distance
    from sfd.evaluate.report import ClassStatsReference, is_class_stats, save_class_stats

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 7)
    feats = rng.normal(size=(70, 5)) + labels[:, None]
    save_class_stats(tmp_path / "s.npz", feats, labels, 10, feature_net="x.pth")
    assert is_class_stats(tmp_path / "s.npz")
    ref = ClassStatsReference.load(tmp_path / "s.npz")
    classes = [1, 4, 5]
    mu, sigma = feature_stats(feats[np.isin(labels, classes)])
    mu2, sigma2 = ref.of(classes)
    assert np.allclose(mu, mu2) and np.allclose(sigma, sigma2)
    assert frechet_distance(feats[:20], ref.of([0, 1, 2])) == pytest.approx(frechet_distance(feats[:20], feats[:21]))


# ----------------------------------------------------------------------------- help

@pytest.mark.parametrize("argv", [["fetch", "--help"], ["train-classifier", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "SFD_HOME" in capsys.readouterr().out


def test_fetch_list_prints_paths_checksums_and_urls(home, capsys):
    assert main(["fetch", "stl10", "--list"]) == 0
    out = capsys.readouterr().out
    assert "91f7769df0f17e558f3565bffb0c7dfb" in out and str(home / "stl10" / "stl10_binary.tar.gz") in out
    assert "no direct link" in out                  # the official DDPM: where to get it by hand
