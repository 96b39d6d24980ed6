"""The sweep's storage: one URI (s3://, gs://, a local path, anything pyarrow's filesystems take),
reached through ``pyarrow.fs`` from the driver and from every worker node alike.

Everything a sweep keeps lives under it, so nodes need no shared filesystem:

    <storage>/tune/...                      Ray Tune's experiment state and Ray Train checkpoints
    <storage>/trials/<target>/<trial>/...   each trial's outputs (metrics, plots, generator), uploaded by
                                            the trial's rank 0 from its node-local run folder when it ends
    <storage>/results/*.parquet             the results tables, written as Parquet through pyarrow
    <storage>/reference/<key>.safetensors   the teacher's reference samples (orchestration/reference.py)

S3 endpoints and credentials come from the standard environment variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION): pyarrow 25, s3fs, boto3 and
MLflow all read them, so nothing here takes keys as arguments.
"""
from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path

from sfd.io import atomic_path


def is_remote(uri: str) -> bool:
    """True for a URI with a scheme other than file:// (s3://, gs://, ...)."""
    return "://" in uri and not uri.startswith("file://")


@dataclass(frozen=True)
class Storage:
    """A root URI and the pyarrow filesystem that reaches it."""

    uri: str
    fs: object          # pyarrow.fs.FileSystem
    root: str           # the root as a path of ``fs`` (bucket/prefix for S3, an absolute path locally)

    @classmethod
    def from_uri(cls, uri: str) -> "Storage":
        import pyarrow.fs as pafs

        uri = str(uri).rstrip("/") or "/"
        if not is_remote(uri):
            local = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser().resolve()
            return cls(str(local), pafs.LocalFileSystem(), str(local))
        try:
            fs, root = pafs.FileSystem.from_uri(uri)
        except Exception as e:             # unknown scheme, malformed bucket, missing filesystem support
            raise ValueError(f"--storage {uri!r} is not a URI pyarrow understands ({e}) — use s3://bucket/prefix, "
                             f"gs://bucket/prefix or a local path") from e
        return cls(uri, fs, root.rstrip("/"))

    # -- paths ------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *[str(p).strip("/") for p in parts if str(p)])

    def child_uri(self, *parts: str) -> str:
        """The URI of a sub-path, for tools that take URIs (Ray's storage_path, the reference store)."""
        rel = posixpath.join(*[str(p).strip("/") for p in parts if str(p)]) if parts else ""
        return self.uri + ("/" + rel if rel else "")

    # -- files --------------------------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        import pyarrow.fs as pafs
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file: to a temporary name, then moved into place where the filesystem can rename
        (local); object stores make an object visible only once its upload completed."""
        dest = self.path(rel)
        self.fs.create_dir(posixpath.dirname(dest), recursive=True)
        if isinstance(self.fs, _local_fs_type()):
            tmp = posixpath.join(posixpath.dirname(dest), f".{posixpath.basename(dest)}.{uuid.uuid4().hex}.tmp")
            try:
                with self.fs.open_output_stream(tmp) as f:
                    f.write(data)
                self.fs.move(tmp, dest)
            except BaseException:
                try:
                    self.fs.delete_file(tmp)
                except (FileNotFoundError, OSError):
                    pass
                raise
        else:
            with self.fs.open_output_stream(dest) as f:
                f.write(data)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def delete(self, rel: str) -> None:
        self.fs.delete_file(self.path(rel))

    def upload_file(self, local, rel: str) -> None:
        self.write_bytes(rel, Path(local).read_bytes())

    def download_file(self, rel: str, local) -> Path:
        """Copy one file to ``local`` atomically (a reader never sees half a file)."""
        local = Path(local)
        with atomic_path(local) as tmp:
            tmp.write_bytes(self.read_bytes(rel))
        return local

    def upload_dir(self, local, rel: str) -> list[str]:
        """Every file under ``local`` to ``rel/`` (same relative layout); returns the uploaded paths."""
        local = Path(local)
        done = []
        for p in sorted(local.rglob("*")):
            if p.is_file() and not p.name.endswith(".tmp"):
                sub = posixpath.join(rel, p.relative_to(local).as_posix())
                self.upload_file(p, sub)
                done.append(sub)
        return done

    def download_dir(self, rel: str, local) -> list[Path]:
        """Every file under ``rel/`` into ``local`` (same layout); returns the local paths."""
        import pyarrow.fs as pafs
        base = self.path(rel)
        if self.fs.get_file_info(base).type == pafs.FileType.NotFound:
            return []
        out = []
        for info in self.fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            if info.type == pafs.FileType.File:
                sub = posixpath.relpath(info.path, base)
                out.append(self.download_file(posixpath.join(rel, sub), Path(local) / sub))
        return out

    def list(self, rel: str = "") -> list[str]:
        """Every file under ``rel`` (recursive), relative to the root."""
        import pyarrow.fs as pafs
        base = self.path(rel)
        if self.fs.get_file_info(base).type == pafs.FileType.NotFound:
            return []
        return sorted(posixpath.relpath(i.path, self.root) for i in
                      self.fs.get_file_info(pafs.FileSelector(base, recursive=True)) if i.type == pafs.FileType.File)

    # -- tables -------------------------------------------------------------------------------------
    def write_parquet(self, df, rel: str) -> None:
        """A DataFrame as Parquet through pyarrow's filesystem (serialised in memory first, so a
        failed write never leaves half a table under the final name)."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), sink)
        self.write_bytes(rel, sink.getvalue().to_pybytes())

    def read_parquet(self, rel: str):
        import pyarrow.parquet as pq
        return pq.read_table(self.path(rel), filesystem=self.fs).to_pandas()

    # -- Ray ----------------------------------------------------------------------------------------
    def ray_storage(self) -> str:
        """What Ray's RunConfig(storage_path=...) takes: the URI itself (pyarrow resolves s3:// with the
        AWS_* environment variables, AWS_ENDPOINT_URL included, on every node) or the local path."""
        return self.uri


def _local_fs_type():
    import pyarrow.fs as pafs
    return pafs.LocalFileSystem


def scratch_root() -> Path:
    """Node-local folder for trial run folders when the storage is remote: $SFD_SCRATCH, else the
    system temporary folder. Nothing in it is read by another node."""
    return Path(os.environ.get("SFD_SCRATCH") or Path(os.environ.get("TMPDIR", "/tmp")) / "sfd-scratch")
