"""Where a run's files live: a local (or shared POSIX) path, or object storage (s3://, gs://) through pyarrow.

Object storage has no rename of folders and no append, and a worker on another node cannot see a local path. So:

- `open_uri`, `uri_join`: one way to name a file wherever it lives (a plain path stays a plain path).
- `upload_dir` / `local_copy`: what libraries need on a local disk (save_pretrained, from_pretrained, matplotlib)
  is written locally, then uploaded; a checkpoint read from object storage is downloaded once into a local cache
  keyed by its listing, so a replaced checkpoint is fetched again and an unchanged one never is.
- `ObjectStore`: pyarrow's S3/GCS filesystem as this project (and Ray Train, and Ray Data) uses it, with what S3 and a
  least-privilege policy require: no "folders" (pyarrow's `create_dir` asks HeadBucket and writes an empty marker
  object for every parent prefix, outside the run prefix too, which a policy scoped to the run refuses), and no
  CopyObject of an object over 5 GiB (S3 refuses it; such an object is streamed through a multipart upload).
- `AppendLog`: append-only JSON-lines records that survive a kill. On a filesystem: one file per writer, each
  record flushed and fsynced. On object storage: group commit — a record's writer waits until an object holding it
  is written; records that arrive while a write is in flight go together into the next object. So a record counts
  only once it is stored (as with fsync), and at high rates the number of writes stays bounded by their latency.
  `compact` folds many small objects into one while no writer is running.

Endpoint and region of an S3-compatible store come from `storage.endpoint_url` / `storage.region` (exported as
AWS_ENDPOINT_URL / AWS_REGION, which pyarrow and boto read) and credentials from the usual AWS chain (environment
variables, a profile, the node's instance role or Kubernetes service account).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs

from asclepius.coalesced import Coalesced

S3_COPY_LIMIT_BYTES = 5 * 1024**3  # the largest source S3 copies with one CopyObject (UploadPartCopy beyond)
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


class ObjectStore(pafs.FileSystemHandler):
    """An object store's pyarrow filesystem without folders and without oversized copies (see the module's docstring).
    Wrapped in `pafs.PyFileSystem`, it goes wherever a pyarrow filesystem does (Ray Train's storage_filesystem, Ray
    Data's readers) and pickles to other nodes with its base."""

    def __init__(self, base: pafs.FileSystem, copy_limit_bytes: int = S3_COPY_LIMIT_BYTES):
        self.base, self.copy_limit_bytes = base, copy_limit_bytes

    def __reduce__(self):
        return ObjectStore, (self.base, self.copy_limit_bytes)

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectStore) and self.base.equals(other.base)

    def get_type_name(self) -> str:
        return self.base.type_name

    def normalize_path(self, path):
        return self.base.normalize_path(path)

    def get_file_info(self, paths):
        return self.base.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.base.get_file_info(selector)

    def create_dir(self, path, recursive):
        """Nothing to do: a key needs no folder, and every write creates its own key."""

    def delete_dir(self, path):
        self.base.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.base.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete everything in the object store")

    def delete_file(self, path):
        self.base.delete_file(path)

    def copy_file(self, src, dest):
        size = self.base.get_file_info(src).size
        if size is None or size <= self.copy_limit_bytes:
            self.base.copy_file(src, dest)  # one server-side CopyObject
            return
        # S3 refuses CopyObject above 5 GiB: stream it through a multipart upload instead
        with self.base.open_input_stream(src) as reader, self.base.open_output_stream(dest) as writer:
            while chunk := reader.read(64 << 20):
                writer.write(chunk)

    def move(self, src, dest):
        self.copy_file(src, dest)  # an object store has no rename: copy, then delete
        self.base.delete_file(src)

    def open_input_stream(self, path):
        return self.base.open_input_stream(path)

    def open_input_file(self, path):
        return self.base.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.base.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        raise OSError("object storage has no append (asclepius.storage.AppendLog writes new objects)")


def object_store(base: pafs.FileSystem, copy_limit_bytes: int = S3_COPY_LIMIT_BYTES) -> pafs.FileSystem:
    return pafs.PyFileSystem(ObjectStore(base, copy_limit_bytes))


def base_filesystem(fs: pafs.FileSystem) -> pafs.FileSystem:
    """The filesystem under an `ObjectStore` wrapper (or `fs` itself)."""
    handler = getattr(fs, "handler", None)
    return handler.base if isinstance(handler, ObjectStore) else fs


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or any pyarrow URI; object storage comes as an `ObjectStore`."""
    if is_remote(uri):
        base, path = pafs.FileSystem.from_uri(uri)
        return object_store(base), path
    local = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local))


def uri_join(uri: str, *parts: str) -> str:
    return posixpath.join(uri, *parts) if is_remote(uri) else os.path.join(uri, *parts)


def uri_for(fs: pafs.FileSystem, path: str) -> str:
    """The URI of a path inside `fs` (a local path stays as it is): what a worker on another node can open."""
    scheme = {"s3": "s3", "gcs": "gs"}.get(base_filesystem(fs).type_name)
    return f"{scheme}://{path.lstrip('/')}" if scheme else path


def storage_env(endpoint_url: str | None, region: str | None) -> dict[str, str]:
    """The variables that point pyarrow (and boto) at the configured store; set here and passed to Ray's workers."""
    env = {}
    if endpoint_url:
        env["AWS_ENDPOINT_URL"] = endpoint_url
    if region:
        env["AWS_REGION"] = env["AWS_DEFAULT_REGION"] = region
    os.environ.update(env)
    return env


# ----------------------------------------------------------------------------------------------- whole folders
def ensure_dir(fs: pafs.FileSystem, path: str) -> None:
    """A folder for files to go in: created on a filesystem; nothing on object storage (see `ObjectStore`)."""
    fs.create_dir(path, recursive=True)


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local folder to `uri` (a local path too); files already there with the same name are replaced. Large
    files go up as multipart uploads (pyarrow's S3 output stream), so a 7B export's shards need no single PUT."""
    fs, path = open_uri(uri)
    ensure_dir(fs, path)
    pafs.copy_files(local_dir, path, destination_filesystem=fs, use_threads=True)


def listing(fs: pafs.FileSystem, path: str) -> dict[str, int]:
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {posixpath.relpath(i.path, path): i.size for i in infos if i.type == pafs.FileType.File}


def cache_root() -> str:
    return os.path.expanduser(os.environ.get("ASCLEPIUS_CACHE", "~/.cache/asclepius"))


def local_copy(uri: str, weights: bool = True) -> str:
    """A local folder with the content of `uri`: the path itself when it is local, else a private cached download
    (keyed by the URI and its listing, so a replaced checkpoint is fetched again). `weights=False` fetches all but
    the weight files — what a tokenizer needs."""
    if not is_remote(uri):
        return open_uri(uri)[1]
    fs, path = open_uri(uri)
    files = {name: size for name, size in listing(fs, path).items() if weights or not name.endswith(WEIGHT_SUFFIXES)}
    if not files:
        raise FileNotFoundError(f"nothing at {uri}")
    key = hashlib.sha256(json.dumps([uri, sorted(files.items())]).encode()).hexdigest()[:20]
    target = os.path.join(cache_root(), "objects", key)
    if os.path.isdir(target):
        return target
    os.makedirs(os.path.dirname(target), mode=PRIVATE_DIR_MODE, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{key}-", dir=os.path.dirname(target))  # 0700: checkpoints of clinical models

    def fetch(name: str) -> None:
        dest = os.path.join(staging, name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with fs.open_input_stream(posixpath.join(path, name)) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 8 << 20)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(fetch, files))
    try:
        os.rename(staging, target)  # whole or absent; another process may have won the race, which is as good
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically (temporary name, then move; an object store's PUT is atomic by itself)."""
    fs, path = open_uri(uri)
    ensure_dir(fs, posixpath.dirname(path))
    if is_remote(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_bytes(uri: str) -> bytes | None:
    """A whole file, or None when it is not there."""
    fs, path = open_uri(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


# ----------------------------------------------------------------------------------------------- append-only records
def make_private_dir(path: str) -> str:
    """A local directory only its owner can enter (it holds clinical text or what was derived from it)."""
    os.makedirs(path, mode=PRIVATE_DIR_MODE, exist_ok=True)
    os.chmod(path, PRIVATE_DIR_MODE)
    return path


def open_private(path: str, mode: str = "a"):
    """Open a local text file created 0600 whatever the umask (ledger parts, journals)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    fd = os.open(path, flags, PRIVATE_FILE_MODE)
    return os.fdopen(fd, mode, encoding="utf-8")


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


class AppendLog:
    """One writer's records under `directory` (a path or URI), named `<prefix>-<writer>...jsonl`."""

    def __init__(self, directory: str, prefix: str, writer_id: str | None = None):
        self.directory, self.prefix = directory, prefix
        self.writer_id = writer_id or uuid.uuid4().hex[:16]
        self.remote = is_remote(directory)
        self._fh = None
        self._seq = 0
        self._lock = threading.Lock()  # one write at a time, in order (sync writers, the async flusher's thread)
        self._group = Coalesced(self._write_group)  # concurrent commits share one write
        if self.remote:
            self.fs, self.path = open_uri(directory)
        else:
            self.path = make_private_dir(open_uri(directory)[1])  # requests and answers hold note text: owner-only

    def _put(self, lines: list[str]) -> None:
        """Object storage: write one new object holding `lines` (a PUT is all or nothing)."""
        with self._lock:
            self._seq += 1
            name = f"{self.prefix}-{self.writer_id}-{self._seq:08d}.jsonl"
            with self.fs.open_output_stream(posixpath.join(self.path, name)) as f:
                f.write("".join(lines).encode("utf-8"))

    def append(self, record: dict) -> None:
        self.append_many([record])

    def append_many(self, records: list[dict]) -> None:
        """Durably record: written (fsynced, or stored as an object) before this returns."""
        if not records:
            return
        lines = [_line(r) for r in records]
        if self.remote:
            self._put(lines)
            return
        self._write_local(lines)

    def _write_local(self, lines: list[str]) -> None:
        with self._lock:  # a sync writer and the async flusher's thread never interleave
            if self._fh is None:
                self._fh = open_private(os.path.join(self.path, f"{self.prefix}-{self.writer_id}.jsonl"))
            self._fh.write("".join(lines))
            self._fh.flush()
            os.fsync(self._fh.fileno())

    async def commit(self, record: dict) -> None:
        """`append` for coroutines: concurrent commits share one write (group commit) — one PUT on object storage,
        one write + fsync on a filesystem, in a thread, so the event loop keeps sending while the disk syncs (an
        fsync per record on the loop was a self-hosted teacher's pace). A failed write fails every commit in it."""
        await self._group.submit(_line(record))

    async def _write_group(self, lines: list[str]) -> list[None]:
        await asyncio.to_thread(self._put if self.remote else self._write_local, lines)
        return [None] * len(lines)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def log_files(directory: str, prefix: str) -> list[str]:
    """The record files of every writer under `directory`, sorted (none when it is not there)."""
    fs, path = open_uri(directory)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = [posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File]
    return sorted(posixpath.join(path, n) for n in names if n.startswith(f"{prefix}-") and n.endswith(".jsonl"))


def read_log(directory: str, prefix: str) -> Iterator[tuple[str, bool]]:
    """Every record line of every writer: (line, complete). A local line without its newline was cut short by a kill
    (not complete); an object is always whole. Objects are fetched in parallel: a resume may read thousands."""
    fs, _ = open_uri(directory)
    files = log_files(directory, prefix)

    def fetch(path: str) -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    with ThreadPoolExecutor(32 if is_remote(directory) else 1) as pool:
        for data in pool.map(fetch, files):
            lines = data.split(b"\n")
            for i, raw in enumerate(lines):
                if raw:
                    yield raw.decode("utf-8", errors="replace"), i < len(lines) - 1


def compact(directory: str, prefix: str, min_files: int = 64) -> int:
    """Object storage: fold many small record objects into one, while no writer runs (a stage's start). The merged
    object is written before the parts are deleted, so a crash in between only leaves records twice — which readers
    take as one. Returns how many objects were folded."""
    if not is_remote(directory):
        return 0
    files = log_files(directory, prefix)
    if len(files) < min_files:
        return 0
    fs, path = open_uri(directory)
    lines = [line + "\n" for line, complete in read_log(directory, prefix) if complete]
    name = f"{prefix}-compacted{uuid.uuid4().hex[:8]}-00000000.jsonl"
    with fs.open_output_stream(posixpath.join(path, name)) as f:
        f.write("".join(lines).encode("utf-8"))
    for p in files:
        fs.delete_file(p)
    return len(files)
