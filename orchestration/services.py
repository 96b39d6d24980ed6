"""Probes of the services a sweep depends on, each with a short timeout and each failing as one
line that names the service: the MLflow tracking server, the Ray cluster of --address, the
storage of --storage, and the model/reference files. `--dry-run` runs them all; a real sweep runs
them before it starts anything.
"""
from __future__ import annotations

import concurrent.futures
import os
import socket
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from .storage import Storage, is_remote

TIMEOUT = 5.0


class ServiceError(ValueError):
    """An unreachable or unusable service; the message is one line naming it."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:240] or type(e).__name__


def probe_mlflow(uri: str | None, timeout: float = TIMEOUT) -> str:
    """An http(s) tracking server must answer /health; a local store (sqlite:///, a path) needs nothing."""
    if not uri or not uri.startswith(("http://", "https://")):
        return f"MLflow: {uri or 'local store'} (local, nothing to reach)"
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            if r.status != 200:
                raise ServiceError(f"HTTP {r.status}")
    except (OSError, urllib.error.URLError, ServiceError) as e:
        raise ServiceError(f"MLflow tracking server {uri} does not answer ({_one_line(e)}) — start it or fix "
                           f"--mlflow-uri") from None
    return f"MLflow: {uri} answers"


def _ray_address(address: str) -> str | None:
    """host:port of the GCS for --address (auto: $RAY_ADDRESS, then the cluster this machine started)."""
    if address.startswith("ray://"):
        return address[len("ray://"):]
    if address != "auto":
        return address
    if os.environ.get("RAY_ADDRESS"):
        return _ray_address(os.environ["RAY_ADDRESS"]) if os.environ["RAY_ADDRESS"] != "auto" else None
    current = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    if current.is_file():
        return current.read_text().strip() or None
    return None


def probe_ray(address: str | None, timeout: float = TIMEOUT) -> str:
    """A TCP connection to the Ray cluster's GCS (without joining it)."""
    if not address:
        return "Ray: a local instance will be started"
    hostport = _ray_address(address)
    if hostport is None:
        raise ServiceError(f"Ray cluster --address {address}: no running cluster found ($RAY_ADDRESS unset, no "
                           f"cluster started on this machine) — start one (`ray start --head`) or pass host:port")
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        raise ServiceError(f"Ray cluster --address {address} ({hostport}) is unreachable ({_one_line(e)}) — start "
                           f"the cluster or fix --address") from None
    return f"Ray: {hostport} reachable"


def probe_storage(uri: str, timeout: float = TIMEOUT) -> str:
    """Write, read back and delete a small object under the storage root."""


    if not is_remote(uri):                   # a local path: check without creating anything
        p = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser().resolve()
        q = p
        while not q.exists():
            q = q.parent
        if not q.is_dir() or not os.access(q, os.W_OK | os.X_OK):
            raise ServiceError(f"storage {uri} is not writable ({q} is not a writable folder) — pick another "
                               f"--storage/--out")
        return f"storage: {p} writable"

    def attempt():
        store = Storage.from_uri(uri)
        rel = f".sfd-probe-{uuid.uuid4().hex}"
        payload = f"sfd storage probe {time.time()}".encode()
        store.write_bytes(rel, payload)
        try:
            if store.read_bytes(rel) != payload:
                raise OSError("read back different bytes")
        finally:
            store.delete(rel)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(attempt).result(timeout=timeout * 3)
    except concurrent.futures.TimeoutError:
        raise ServiceError(f"storage {uri} did not answer within {timeout * 3:.0f} s — check the endpoint "
                           f"(AWS_ENDPOINT_URL) and the network") from None
    except ValueError as e:
        raise ServiceError(_one_line(e)) from None
    except Exception as e:           # noqa: BLE001 — every storage failure becomes one line naming it
        raise ServiceError(f"storage {uri} is not writable ({_one_line(e)}) — check the bucket/path and the "
                           f"credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)") from None
    finally:
        pool.shutdown(wait=False)
    return f"storage: {uri} writable"


def probe_file(key: str, path) -> str:
    """A model or reference file opens (a folder: it lists)."""
    p = Path(path)
    try:
        if p.is_dir():
            next(iter(p.iterdir()), None)
        else:
            with open(p, "rb") as f:
                f.read(1)
    except OSError as e:
        raise ServiceError(f"{key} file {path} does not open ({_one_line(e)}) — fix --{key.replace('_', '-')}") \
            from None
    return f"{key}: {path} opens"


def probe_all(*, mlflow_uri, address, storage, files: dict, timeout: float = TIMEOUT, log=print) -> None:
    """Every probe; the first failure raises ServiceError (one line)."""
    for key, path in files.items():
        if path:
            log("[sweep] ok " + probe_file(key, path))
    log("[sweep] ok " + probe_storage(storage, timeout))
    log("[sweep] ok " + probe_mlflow(mlflow_uri, timeout))
    log("[sweep] ok " + probe_ray(address, timeout))
