"""Public files by name: a registry (data), one cache (``$SFD_HOME``), verified resumable downloads.

``sfd fetch cifar10|stl10`` puts into ``$SFD_HOME`` (default ``~/.cache/sfd``) what a real-dataset
run needs: the official dataset archive, a public class-conditional teacher and the FID Inception
weights (plus torchvision's ImageNet ResNet-34, the starting point of the UA judge that
``sfd train-classifier --preset cifar10`` trains). When ``--teacher/--classifier/--fid-weights/
--reference`` are omitted, ``sfd forget`` and the sweep take the cached files; missing ones are
listed with their URL, checksum and the exact path to put them at (air-gapped sites copy them
there by hand, or point ``SFD_MIRROR`` at a mirror serving ``<mirror>/<filename>``).

Checksums. Every entry names its hash algorithm. Where a full digest is publicly documented it
is pinned (the CIFAR-10 / STL-10 archives: MD5 sums; CIFAR-10's is listed on its homepage, both
are the values torchvision pins). Where only a prefix is published (torch.hub's convention: the first 8 hex digits
of the SHA-256 in the file name) the prefix is checked. Where nothing is published (NVIDIA's
EDM snapshot) no digest is invented: the file's SHA-256 is recorded in ``$SFD_HOME/checksums.lock.json``
on its first successful download and every later download or copy must match it
(trust on first use). The lock records the SHA-256 of every file fetched.

Downloads go to ``<file>.part`` beside the target, resume with an HTTP ``Range`` request after an
interruption (within one call, and across calls), show a tqdm bar, are verified, and only then
renamed into place; a checksum mismatch deletes the file and says so.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .io import write_json

LOCK_NAME = "checksums.lock.json"
TEACHER_NAMES = ("edm", "ddpm")
CHUNK = 1 << 16


class AssetError(ValueError):
    """A file the user must provide is missing or unusable; the message says what to do."""


class DownloadError(RuntimeError):
    """A download failed (HTTP error, network down, checksum mismatch); the message says what to do."""


@dataclass(frozen=True)
class Asset:
    name: str                  # registry name, e.g. "edm-cifar10-32x32-cond-vp"
    role: str                  # dataset | teacher | fid_weights | classifier_init
    presets: tuple[str, ...]   # presets that use it
    filename: str              # file name in the cache (and on a mirror: <mirror>/<filename>)
    subdir: str                # folder under $SFD_HOME
    url: str | None            # None: no direct public link (see ``manual``)
    algo: str                  # hash algorithm of ``digest``/``prefix``: "md5" or "sha256"
    digest: str | None = None  # full published digest, where one is published
    prefix: str | None = None  # published digest prefix only (torch.hub file-name convention)
    size: int | None = None    # bytes, where known
    teacher: str | None = None  # short name for --teacher (edm / ddpm)
    source: str = ""           # where it comes from (a page a person can open)
    licence: str = ""
    manual: str = ""           # how to obtain it by hand when there is no direct link

    def path(self, home=None) -> Path:
        return sfd_home(home) / self.subdir / self.filename

    def checksum_text(self) -> str:
        if self.digest:
            return f"{self.algo} {self.digest}"
        if self.prefix:
            return f"{self.algo} {self.prefix}... (published prefix)"
        return f"{self.algo}: none published (recorded in {LOCK_NAME} on first download)"


# The registry: one row per public file. Digests are the publicly documented ones; none is guessed.
REGISTRY: tuple[Asset, ...] = (
    Asset("cifar10", "dataset", ("cifar10",), "cifar-10-python.tar.gz", "cifar10",
          "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
          "md5", digest="c58f30108f718f92721af3b95e74349a", size=170_498_071,
          source="https://www.cs.toronto.edu/~kriz/cifar.html",
          licence="no licence stated by the authors; research use, cite Krizhevsky (2009)"),
    Asset("stl10", "dataset", ("stl10",), "stl10_binary.tar.gz", "stl10",
          "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
          "md5", digest="91f7769df0f17e558f3565bffb0c7dfb", size=2_640_397_119,
          source="https://cs.stanford.edu/~acoates/stl10/",
          licence="no licence stated by the authors (images from ImageNet); research use, cite Coates, Lee & "
                  "Ng (AISTATS 2011)"),
    Asset("edm-cifar10-32x32-cond-vp", "teacher", ("cifar10",), "edm-cifar10-32x32-cond-vp.pkl", "cifar10",
          "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl",
          "sha256", teacher="edm", source="https://github.com/NVlabs/edm",
          licence="CC BY-NC-SA 4.0 (NVIDIA)"),
    Asset("sfd-ddpm-cifar10", "teacher", ("cifar10",), "ddpm-cifar10-ckpt.pth", "cifar10", None, "sha256",
          teacher="ddpm", source="https://github.com/tqch/score-forgetting-distillation",
          licence="see the repository",
          manual="no direct link: download the pretrained conditional DDPM (ckpt.pth) linked from the READMEs "
                 "of tqch/score-forgetting-distillation (DDPM/) or clear-nus/selective-amnesia (ddpm/)"),
    Asset("sfd-ddpm-stl10", "teacher", ("stl10",), "ddpm-stl10-ckpt.pth", "stl10", None, "sha256",
          teacher="ddpm", source="https://github.com/tqch/score-forgetting-distillation",
          licence="see the repository",
          manual="no direct link: download the pretrained STL-10 conditional DDPM (ckpt.pth) linked from the "
                 "README of tqch/score-forgetting-distillation (DDPM/) or clear-nus/selective-amnesia (ddpm/)"),
    Asset("fid-inception", "fid_weights", ("cifar10", "stl10"), "pt_inception-2015-12-05-6726825d.pth", "common",
          "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
          "sha256", prefix="6726825d", source="https://github.com/mseitzer/pytorch-fid",
          licence="Apache-2.0 (pytorch-fid; weights ported from TensorFlow's FID Inception)"),
    Asset("resnet34-imagenet", "classifier_init", ("cifar10", "stl10"), "resnet34-b627a593.pth", "common",
          "https://download.pytorch.org/models/resnet34-b627a593.pth",
          "sha256", prefix="b627a593", source="https://github.com/pytorch/vision",
          licence="BSD-3-Clause (torchvision)"),
)


def sfd_home(home=None) -> Path:
    return Path(home or os.environ.get("SFD_HOME") or Path.home() / ".cache" / "sfd").expanduser()


def with_digests(registry, digests: dict[str, tuple[str, str]]) -> tuple[Asset, ...]:
    """A copy of ``registry`` with ``{name: (algo, digest)}`` pinned (mirrors with their own builds, tests)."""
    out = []
    for a in registry:
        if a.name in digests:
            algo, digest = digests[a.name]
            a = dataclasses.replace(a, algo=algo, digest=digest, prefix=None)
        out.append(a)
    return tuple(out)


def preset_assets(preset: str, teacher: str | None = None, registry=REGISTRY, roles=None) -> list[Asset]:
    """The registry rows ``preset`` uses (one teacher: ``teacher`` or every teacher if None)."""
    out = []
    for a in registry:
        if preset not in a.presets or (roles is not None and a.role not in roles):
            continue
        if a.role == "teacher" and teacher is not None and a.teacher != teacher:
            continue
        out.append(a)
    return out


def find(registry, preset: str, role: str, teacher: str | None = None) -> Asset | None:
    rows = preset_assets(preset, teacher, registry, roles=(role,))
    return rows[0] if rows else None


# --------------------------------------------------------------------------- checksums

def file_digests(path, algos=("sha256",)) -> dict[str, str]:
    hs = {a: hashlib.new(a, usedforsecurity=False) for a in set(algos) | {"sha256"}}
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            for h in hs.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hs.items()}


def read_lock(home=None) -> dict:
    p = sfd_home(home) / LOCK_NAME
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        raise AssetError(f"{p} is not valid JSON — delete it (it is rebuilt from verified downloads)") from None


def _write_lock(lock: dict, home=None) -> None:
    write_json(sfd_home(home) / LOCK_NAME, lock)


def check_digest(asset: Asset, path, home=None) -> str:
    """Verify ``path`` against the asset's pinned digest/prefix and the lock; return its SHA-256.

    Raises DownloadError (after deleting nothing: the caller decides) on a mismatch.
    """
    d = file_digests(path, (asset.algo,))
    got = d[asset.algo]
    if asset.digest and got != asset.digest.lower():
        raise DownloadError(f"checksum mismatch for {asset.filename}: {asset.algo} {got}, expected {asset.digest}")
    if asset.prefix and not got.startswith(asset.prefix.lower()):
        raise DownloadError(f"checksum mismatch for {asset.filename}: {asset.algo} {got[:16]}..., expected "
                            f"prefix {asset.prefix}")
    locked = read_lock(home).get(asset.filename, {}).get("sha256")
    if locked and locked != d["sha256"]:
        raise DownloadError(f"checksum mismatch for {asset.filename}: sha256 {d['sha256']}, but "
                            f"{sfd_home(home) / LOCK_NAME} recorded {locked} at its first download")
    return d["sha256"]


def record(asset: Asset, sha256: str, url: str | None, home=None) -> None:
    lock = read_lock(home)
    lock[asset.filename] = {"name": asset.name, "sha256": sha256, "url": url,
                            "pinned": asset.checksum_text() if (asset.digest or asset.prefix) else None}
    _write_lock(lock, home)


# --------------------------------------------------------------------------- downloads

def asset_url(asset: Asset, mirror: str | None = None) -> str | None:
    mirror = mirror if mirror is not None else os.environ.get("SFD_MIRROR") or None
    if mirror:
        return mirror.rstrip("/") + "/" + asset.filename
    return asset.url


def _is_offline(e: BaseException) -> bool:
    if isinstance(e, urllib.error.HTTPError):
        return False
    reason = getattr(e, "reason", e)
    return isinstance(reason, (ConnectionError, socket.gaierror, socket.timeout, TimeoutError, OSError))


def download(asset: Asset, home=None, mirror: str | None = None, progress: bool = True, retries: int = 3,
             timeout: float = 60.0) -> Path:
    """Fetch one asset into the cache: ``.part`` file, Range resume, tqdm bar, verify, rename."""

    dest = asset.path(home)
    url = asset_url(asset, mirror)
    if url is None:
        raise DownloadError(f"{asset.name}: {asset.manual} — then put it at {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(url, headers={"User-Agent": "sfd-fetch"})
        if offset:
            req.add_header("Range", f"bytes={offset}-")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                if offset and r.status != 206:        # the server ignored Range: start again
                    offset = 0
                length = r.headers.get("Content-Length")
                total = offset + int(length) if length is not None else asset.size
                with open(part, "ab" if offset else "wb") as f, \
                        tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=asset.filename, disable=not progress, leave=False) as bar:
                    while chunk := r.read(CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
            if length is not None and part.stat().st_size < offset + int(length):
                raise http.client.IncompleteRead(b"")
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset:              # Range beyond the end: the .part is stale
                part.unlink(missing_ok=True)
                attempt += 1
                if attempt <= retries:
                    continue
            raise DownloadError(f"{asset.filename}: HTTP {e.code} {e.reason} from {url} — check the URL"
                                f"{' and SFD_MIRROR / --mirror' if url != asset.url else ''}, or put the file at "
                                f"{dest} ({asset.checksum_text()})") from None
        except (http.client.IncompleteRead, ConnectionError, socket.timeout, TimeoutError,
                urllib.error.URLError, OSError) as e:
            got = part.stat().st_size if part.exists() else 0
            interrupted = isinstance(e, (http.client.IncompleteRead, ConnectionResetError, socket.timeout,
                                         TimeoutError, http.client.RemoteDisconnected)) or got > offset
            attempt += 1
            if interrupted and attempt <= retries:
                if progress:
                    print(f"sfd fetch: {asset.filename}: interrupted at {got} bytes, resuming", flush=True)
                continue
            if _is_offline(e) and not interrupted:
                raise OfflineError([asset], home, str(getattr(e, "reason", e))) from None
            raise DownloadError(f"{asset.filename}: download from {url} interrupted ({e}); run the same command "
                                f"again to resume from {part.stat().st_size if part.exists() else 0} bytes") from None
    try:
        sha = check_digest(asset, part, home)
    except DownloadError as e:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{e}; the downloaded file was deleted — run the command again, or check the "
                            f"mirror ({url})") from None
    os.replace(part, dest)
    record(asset, sha, url, home)
    return dest


class OfflineError(DownloadError):
    def __init__(self, assets, home=None, why: str = ""):
        self.assets = list(assets)
        super().__init__(f"cannot reach the download server{f' ({why})' if why else ''} — put these files in "
                         f"place by hand (or set SFD_MIRROR to a server that has them):\n"
                         + manual_list(self.assets, home))


def manual_list(assets, home=None) -> str:
    lines = []
    for a in assets:
        lines.append(f"  {a.path(home)}\n      {a.name}: {a.checksum_text()}\n      from: "
                     f"{a.url or a.manual}")
    return "\n".join(lines)


def fetch(assets, home=None, mirror: str | None = None, progress: bool = True, retries: int = 3,
          log=print) -> dict[str, Path]:
    """Download every asset not already in the cache (present files are re-verified).

    When the network is unreachable, one OfflineError lists every file still missing.
    """
    done, offline = {}, []
    for a in assets:
        dest = a.path(home)
        if dest.is_file():
            try:
                sha = check_digest(a, dest, home)
            except DownloadError as e:
                raise DownloadError(f"{e}; the cached file {dest} is not the published one — delete it and run "
                                    f"the command again") from None
            record(a, sha, read_lock(home).get(a.filename, {}).get("url"), home)
            log(f"  ok (cached, verified) {dest}")
            done[a.name] = dest
            continue
        if offline:                       # the network is down: do not wait on every remaining file
            offline.append(a)
            continue
        try:
            done[a.name] = download(a, home, mirror, progress, retries)
            log(f"  ok (downloaded, verified) {done[a.name]}")
        except OfflineError:
            offline.append(a)
    if offline:
        raise OfflineError(offline, home)
    return done


# --------------------------------------------------------------------------- resolution

def classifier_path(preset: str, home=None) -> Path:
    return sfd_home(home) / preset / f"resnet34_{preset}.safetensors"


def reference_stats_path(preset: str, home=None) -> Path:
    return sfd_home(home) / preset / f"{preset}_train_inception_stats.npz"


def is_teacher_name(value) -> bool:
    return isinstance(value, str) and value in TEACHER_NAMES


def resolve(preset: str, given: dict | None = None, home=None, registry=REGISTRY,
            roles=("teacher", "classifier", "fid_weights", "reference")) -> tuple[dict, dict]:
    """Fill the omitted ``teacher/classifier/fid_weights/reference`` of a real-dataset preset from the cache.

    ``given`` holds what the user passed (None: omitted; ``teacher`` may be a name, ``edm``/``ddpm``).
    Returns (paths, missing): ``paths`` maps each role to a path (given or cached) or None;
    ``missing`` maps each unresolved role to a human-readable entry (path, checksum, how to get it).
    """
    given = dict(given or {})
    paths, missing = {}, {}
    if "teacher" in roles:
        t = given.get("teacher")
        if t and not is_teacher_name(t):
            paths["teacher"] = t
        else:
            rows = preset_assets(preset, t, registry, roles=("teacher",))
            hit = next((a for a in rows if a.path(home).is_file()), None)
            paths["teacher"] = str(hit.path(home)) if hit else None
            if not hit:
                if not rows:
                    missing["teacher"] = f"  teacher: no public '{t}' teacher for {preset}; pass --teacher PATH"
                else:
                    # the first one with a download link, else the first
                    a = next((r for r in rows if r.url), rows[0])
                    missing["teacher"] = _entry(a, home, preset)
    if "fid_weights" in roles:
        paths["fid_weights"] = given.get("fid_weights")
        if not paths["fid_weights"]:
            a = find(registry, preset, "fid_weights")
            if a and a.path(home).is_file():
                paths["fid_weights"] = str(a.path(home))
            elif a:
                missing["fid_weights"] = _entry(a, home, preset)
    if "classifier" in roles:
        paths["classifier"] = given.get("classifier")
        if not paths["classifier"]:
            p = classifier_path(preset, home)
            if p.is_file():
                paths["classifier"] = str(p)
            else:
                missing["classifier"] = (f"  {p}\n      the ResNet-34 UA judge: `sfd train-classifier --preset {preset}` "
                                         f"trains it there (after `sfd fetch {preset}`), or pass --classifier PATH")
    if "reference" in roles:
        paths["reference"] = given.get("reference")
        if not paths["reference"]:
            p = reference_stats_path(preset, home)
            if p.is_file():
                paths["reference"] = str(p)
            else:
                missing["reference"] = (f"  {p}\n      per-class Inception statistics of the training set: "
                               f"`sfd fetch {preset}` computes them once (dataset + FID weights), or pass "
                                        f"--reference PATH")
    needs_data = ("classifier" in missing or "reference" in missing)
    data = find(registry, preset, "dataset")
    if needs_data and data is not None and not data.path(home).is_file():
        missing["dataset"] = _entry(data, home, preset) + "\n      (the judge and the reference statistics are made from it)"
    return paths, missing


def _entry(a: Asset, home, preset) -> str:
    how = f"`sfd fetch {preset}{' --teacher ' + a.teacher if a.teacher else ''}` downloads it" if a.url else a.manual
    return f"  {a.path(home)}\n      {a.name}: {a.checksum_text()}\n      {how}" + (f"\n      from: {a.url}" if a.url else "")


def missing_message(preset: str, missing, what: str = "these files", home=None) -> str:
    entries = list(missing.values()) if isinstance(missing, dict) else list(missing)
    return (f"preset '{preset}' needs {what}, neither passed as flags nor in the cache {sfd_home(home)} — "
            f"put them at these paths (or pass the flags):\n" + "\n".join(entries))
