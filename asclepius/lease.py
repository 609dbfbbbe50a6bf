"""One driver per run directory: a lease object in the run, renewed by a heartbeat.

Ctrl-C on `ray job submit` leaves the job running; submitting again would give two drivers on one run directory —
both rewriting the manifest, each clearing the other's half-written outputs, both paying the teacher for the same
rows. So the pipeline takes `<run>/.lease.json` before its first stage:

- **Taken only if free.** On object storage, a conditional PUT (`If-None-Match: *`; S3 has had it since 2024, moto
  too) creates it only if no lease is there; on a filesystem (local disk, EFS, NFS v4), an exclusive create under an
  advisory lock (`flock` on `<run>/.lease.lock`).
- **Renewed.** A thread rewrites it every `lease.heartbeat_s` (on S3, `If-Match` the ETag it last wrote: if another
  driver took it, the write fails and this driver knows). Every manifest write checks that the lease is still held
  (`RunLease.check`), so a driver that lost its lease stops before it records anything.
- **Refused with a name.** A second driver stops at once with who holds the lease (host, pid, job id, command)
  and how long ago it was renewed.
- **Taken over when stale.** A lease not renewed for `lease.stale_after_s` (its holder was killed: kill -9, a lost
  head node) is taken over, and the new holder says so. Age is measured on one clock: the store's (S3's Last-Modified
  against its Date header) or the filesystem's (the file's mtime against now). A holder on this same host whose
  process is gone (kill -9, then the same command again on the same head) is stale at once.
- **Released** at the end of the run.

gs:// run directories have no lease yet (a warning says so); two drivers there are not prevented.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from asclepius.storage import is_remote, open_private, open_uri

log = logging.getLogger("asclepius")
LEASE_FILE = ".lease.json"
LOCK_FILE = ".lease.lock"


class RunDirLeased(RuntimeError):
    """Another driver holds this run directory."""


class LeaseLost(RuntimeError):
    """This driver's lease was taken over (it stopped renewing it for too long): it must not write any more."""


@dataclass
class Holder:
    """Who holds a lease: enough for a person to find the other driver (and for this host to know it is gone)."""

    id: str
    host: str
    pid: int
    job: str | None
    command: str
    started_at: float
    pid_started: float = 0.0  # the process's start time: a reused pid is not the holder

    @classmethod
    def this_process(cls) -> Holder:
        import sys

        import psutil

        job = os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID")  # set for `ray job submit`
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid(), job, " ".join(sys.argv)[:300], time.time(),
                   psutil.Process().create_time())  # fmt: skip

    def describe(self) -> str:
        job = f", job {self.job}" if self.job else ""
        return f"{self.host} pid {self.pid}{job} ({self.command})"

    def gone(self) -> bool:
        """Known to be dead: it ran on this host and its process is no more (kill -9, then the same command again on the
        same head). A holder on another host is judged by its lease's age alone."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        import psutil

        try:
            return abs(psutil.Process(self.pid).create_time() - self.pid_started) > 1.0  # the pid was reused
        except psutil.NoSuchProcess:
            return True


def _record(holder: Holder) -> bytes:
    return json.dumps({**holder.__dict__, "renewed_at": time.time()}).encode()


def _holder_of(data: bytes) -> Holder:
    try:
        d = json.loads(data)
        return Holder(d["id"], d["host"], int(d["pid"]), d.get("job"), d.get("command", ""), float(d["started_at"]),
                      float(d.get("pid_started", 0.0)))  # fmt: skip
    except (ValueError, KeyError, TypeError):
        return Holder("unreadable", "?", -1, None, "an unreadable lease file", 0.0)


def _free(current: tuple[Holder, float], holder: Holder, stale_after_s: float) -> bool:
    """May `holder` take a lease held by `current` (holder, age)? Its own, a stale one, or one whose process is gone."""
    other, age = current
    return other.id == holder.id or age > stale_after_s or other.gone()


def _age(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ----------------------------------------------------------------------------------------------- the stores
class _FileStore:
    """A lease file on a filesystem: create-or-replace under `flock`, so check-then-write is one step."""

    def __init__(self, root: str):
        self.path, self.lock_path = os.path.join(root, LEASE_FILE), os.path.join(root, LOCK_FILE)

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        with open_private(self.lock_path, "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _read(self) -> tuple[Holder, float] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
            return _holder_of(data), time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None

    def _write(self, holder: Holder) -> None:
        tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.tmp"
        with open_private(tmp, "w") as f:
            f.write(_record(holder).decode())
        os.replace(tmp, self.path)

    def acquire(self, holder: Holder, stale_after_s: float) -> tuple[Holder, float] | None:
        """Take the lease; returns the stale holder taken over (and its age), or None. Raises RunDirLeased."""
        with self._locked():
            current = self._read()
            if current is not None and not _free(current, holder, stale_after_s):
                raise RunDirLeased(_refusal(current))
            self._write(holder)
            return current if current is not None and current[0].id != holder.id else None

    def renew(self, holder: Holder) -> None:
        with self._locked():
            current = self._read()
            if current is None or current[0].id != holder.id:
                raise LeaseLost(_lost(current))
            self._write(holder)

    def release(self, holder: Holder) -> None:
        with self._locked():
            current = self._read()
            if current is not None and current[0].id == holder.id:
                os.remove(self.path)


class _S3Store:
    """A lease object on S3 (or an S3-compatible store): conditional PUTs, ages on the store's clock."""

    def __init__(self, uri: str):
        import boto3

        fs, path = open_uri(uri)
        bucket, _, prefix = path.partition("/")
        self.bucket, self.key = bucket, f"{prefix.rstrip('/')}/{LEASE_FILE}".lstrip("/")
        self.s3 = boto3.client("s3")  # endpoint (AWS_ENDPOINT_URL), region and credentials from the usual chain
        self.etag: str | None = None

    def _read(self) -> tuple[Holder, float, str] | None:
        from botocore.exceptions import ClientError

        try:
            got = self.s3.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        data = got["Body"].read()
        now = email.utils.parsedate_to_datetime(got["ResponseMetadata"]["HTTPHeaders"]["date"])
        return _holder_of(data), (now - got["LastModified"]).total_seconds(), got["ETag"]

    def _put(self, holder: Holder, **condition) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.etag = self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=_record(holder), **condition)["ETag"]
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                return False
            raise

    def acquire(self, holder: Holder, stale_after_s: float) -> tuple[Holder, float] | None:
        if self._put(holder, IfNoneMatch="*"):
            return None
        current = self._read()
        if current is None:  # released between the two requests
            if self._put(holder, IfNoneMatch="*"):
                return None
            raise RunDirLeased("another driver took this run directory a moment ago; try again")
        other, age, etag = current
        if not _free((other, age), holder, stale_after_s):
            raise RunDirLeased(_refusal((other, age)))
        if not self._put(holder, IfMatch=etag):  # only if nobody renewed or took it since we read it
            now = self._read()
            raise RunDirLeased(_refusal(now[:2]) if now else "another driver took this run directory a moment ago; try again")
        return other, age

    def renew(self, holder: Holder) -> None:
        if not self._put(holder, IfMatch=self.etag):
            current = self._read()
            raise LeaseLost(_lost(current[:2] if current else None))

    def release(self, holder: Holder) -> None:
        from botocore.exceptions import ClientError

        current = self._read()
        if current is None or current[0].id != holder.id:
            return
        try:
            self.s3.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=current[2])
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "NoSuchKey", "404"):
                raise


def _refusal(current: tuple[Holder, float]) -> str:
    holder, age = current
    return (f"this run directory is in use by another driver: {holder.describe()}, lease renewed {_age(age)} ago. Two "
            "drivers on one run would overwrite each other's manifest and outputs and pay the teacher twice. Wait for it "
            "to finish, or stop it (`ray job stop <id>`); a lease not renewed for lease.stale_after_s is taken over.")  # fmt: skip


def _lost(current: tuple[Holder, float] | None) -> str:
    who = f"{current[0].describe()} holds it now" if current else "the lease is gone"
    return f"this driver lost its lease on the run directory ({who}); it stops without writing anything more"


def _store_for(run_uri: str) -> _FileStore | _S3Store | None:
    """Where a run directory's lease lives: a file, an S3 object, or nowhere (other object stores)."""
    if is_remote(run_uri):
        return _S3Store(run_uri) if run_uri.startswith("s3://") else None
    return _FileStore(open_uri(run_uri)[1])


# ----------------------------------------------------------------------------------------------- the lease
class RunLease:
    """The lease of one driver on one run directory, with its heartbeat thread. `check()` raises LeaseLost once the
    heartbeat found it taken over."""

    def __init__(self, store, holder: Holder, heartbeat_s: float):
        self.store, self.holder, self.heartbeat_s = store, holder, heartbeat_s
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def refuse_if_held(cls, run_uri: str, stale_after_s: float = 300.0) -> None:
        """A look that writes nothing: raises RunDirLeased when another live driver holds the run directory's lease
        now, so a second driver stops before it starts or joins Ray. `acquire`, after the pre-run checks, decides for
        good; a lease that cannot be read here (no such store, a policy that refuses the read) is left to it."""
        store = _store_for(run_uri)
        if isinstance(store, _S3Store):
            from botocore.exceptions import ClientError

            try:
                found = store._read()
            except ClientError:
                return
            current = found[:2] if found else None
        elif store is not None:
            current = store._read()  # unlocked: the file is replaced whole (os.replace)
        else:
            return
        if current is not None and not _free(current, Holder.this_process(), stale_after_s):
            raise RunDirLeased(_refusal(current))

    @classmethod
    def acquire(cls, run_uri: str, heartbeat_s: float = 30.0, stale_after_s: float = 300.0) -> RunLease | None:
        store = _store_for(run_uri)
        if store is None:
            log.warning("%s: no lease on this kind of object storage; a second driver on this run directory is not prevented",
                        run_uri.split("://")[0] + "://")  # fmt: skip
            return None
        holder = Holder.this_process()
        taken = store.acquire(holder, stale_after_s)
        if taken is not None:
            why = "its process is gone" if taken[0].gone() else f"not renewed for {_age(taken[1])}; lease.stale_after_s {stale_after_s:g} s"
            log.warning("run directory: took over a stale lease of %s (%s)", taken[0].describe(), why)
        lease = cls(store, holder, heartbeat_s)
        lease._thread = threading.Thread(target=lease._beat, name="run-lease", daemon=True)
        lease._thread.start()
        return lease

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.store.renew(self.holder)
            except LeaseLost as err:
                self.lost = str(err)
                log.error("%s", err)
                return
            except Exception as err:  # noqa: BLE001 — a storage hiccup: try again at the next beat
                log.warning("run directory lease: renewal failed (%s); retrying in %.0f s", type(err).__name__, self.heartbeat_s)

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.lost:
            with contextlib.suppress(Exception):
                self.store.release(self.holder)
