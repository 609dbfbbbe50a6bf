"""The run directory, and the one contract every stage follows: what it depends on, when it is done, what it may
never lose.

A run is a local path or any pyarrow filesystem URI (s3://bucket/run, gs://...). `<run>/manifest.json` holds one
entry per stage. A stage is a `Stage`: its name, the config sections (and single values) that decide its output,
the upstream stages whose outputs it reads, and the run-directory folders it writes. `run_stage` does the rest,
the same way for every stage:

1. **Decide.** The stage is skipped only if its entry is `complete`, its config hash and its inputs (the upstream
   stages' output ids, or fingerprints of files outside the run) are the ones recorded, and its published outputs
   still list exactly the files recorded. Anything else reruns it, and `status` says why.
2. **Record `running` first**, with an attempt id. A stage that was cut off (entry still `running`, same hash and
   inputs) resumes its attempt: Ray Train restores its checkpoints, journals replay. A changed config, changed
   inputs or `--force` start a new attempt, so nothing of an older config is ever restored.
3. **Work in a new version.** Outputs are written under `<run>/<output>/v-<attempt>/`, beside the published one;
   readers never see them half-written.
4. **Publish by pointer**: record `complete` with the output listing (file names and sizes), the version each output
   now is, and an output id that the downstream stages take as their input. Readers — the next stages, Serve, the
   console — resolve an output through the manifest (`RunDir.output_path`), so the switch from the old version to the
   new one is the manifest's single write (a rename locally, one PUT on object storage): nobody ever reads a mix of
   two versions, and nothing is copied. Older versions are deleted after the switch.

Reading an upstream table: only "not there" (the stage never ran, or is not part of this pipeline) may mean empty;
any other error — a corrupt or truncated Parquet file, a storage error — stops the stage naming the file.

Files here hold clinical text: on a local filesystem the run directory is created private to its owner (0700).
One driver at a time writes a run directory (asclepius.lease); its manifest writes check that it still holds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from asclepius import metrics
from asclepius.storage import PRIVATE_DIR_MODE, ensure_dir, make_private_dir, open_private, open_uri, uri_for  # noqa: F401 — re-exported

log = logging.getLogger("asclepius")

MANIFEST = "manifest.json"
VERSION_PREFIX = "v-"  # <run>/<output>/v-<attempt>/: one version of an output


class StageInputError(RuntimeError):
    """An input exists but cannot be read; the message names the file (never its content)."""


class StageOrderError(RuntimeError):
    """A stage was asked to run before a stage it requires has completed."""


# ----------------------------------------------------------------------------------------------- the run directory
@dataclass(frozen=True)
class RunDir:
    fs: pafs.FileSystem
    root: str  # path inside `fs`, no trailing slash
    uri: str  # what the user gave, for messages
    lease: Any = None  # the driver's asclepius.lease.RunLease: manifest writes check it is still held

    @classmethod
    def open(cls, uri: str) -> RunDir:
        fs, root = open_uri(uri)
        root = root.rstrip("/") or "/"
        ensure_dir(fs, root)
        run = cls(fs=fs, root=root, uri=uri)
        if run.is_local:
            os.chmod(root, PRIVATE_DIR_MODE)
        return run

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri_of(self, *parts: str) -> str:
        """A path in the run as a URI that any process on any node can open (a local path stays a path)."""
        return uri_for(self.fs, self.path(*parts))

    # ------------------------------------------------------------------------------------------- published outputs
    def versions(self) -> dict[str, str]:
        """{output folder: its published version}, from the manifest: the only pointer readers follow. It changes only
        when a stage completes, so a stage being redone leaves its last output readable."""
        return dict(self.read_manifest().get("published") or {})

    def output_path(self, *parts: str) -> str:
        """A path inside a published output, through the manifest (`checkpoints/finetune/final` →
        `<run>/checkpoints/finetune/v-<attempt>/final`). A path outside every versioned output is itself (an output
        recorded before outputs had versions, the ledger, Ray Train's folder)."""
        rel = posixpath.join(*parts)
        for name, version in sorted(self.versions().items(), key=lambda nv: -len(nv[0])):
            if rel == name or rel.startswith(name + "/"):
                return self.path(name, version, rel[len(name) + 1 :]).rstrip("/")
        return self.path(rel)

    def output_uri(self, *parts: str) -> str:
        """`output_path` as a URI any process on any node can open."""
        return uri_for(self.fs, self.output_path(*parts))

    def published_source(self, uri: str) -> str:
        """A URI or path that names something in this run's outputs (a preset's `${run_dir}/checkpoints/finetune/final`),
        as the published version the manifest points to; anything else as it is."""
        root = self.uri.rstrip("/")
        stripped = uri.rstrip("/")
        if not stripped.startswith(root + "/"):
            return uri
        return self.output_uri(*stripped[len(root) + 1 :].split("/"))

    def prune_versions(self, output: str, keep: str | None) -> None:
        """Delete every version of `output` but `keep` (and anything else in its folder: an older layout's files)."""
        folder = self.path(output)
        for info in self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
            if posixpath.basename(info.path) == keep:
                continue
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(info.path)
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(info.path)

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    # ------------------------------------------------------------------------------------------- manifest
    def read_manifest(self) -> dict[str, Any]:
        try:
            with self.fs.open_input_stream(self.path(MANIFEST)) as f:
                return json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return {"stages": {}}

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        if self.lease is not None:
            self.lease.check()  # another driver took the run over: this one must not write
        data = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
        if not self.is_local:  # one PUT is all or nothing
            with self.fs.open_output_stream(self.path(MANIFEST)) as f:
                f.write(data)
            return
        # Write to a temporary name, then rename: a crash mid-write never leaves a truncated manifest behind.
        tmp = self.path(f".{MANIFEST}.{uuid.uuid4().hex}.tmp")
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, self.path(MANIFEST))

    def stage_entry(self, stage: str) -> dict[str, Any] | None:
        return self.read_manifest()["stages"].get(stage)

    def record_stage(self, stage: str, entry: dict[str, Any]) -> None:
        manifest = self.read_manifest()
        manifest.setdefault("stages", {})[stage] = {**entry, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if entry.get("status") == "complete":  # the outputs' pointer moves in the same write
            manifest.setdefault("published", {}).update(entry.get("versions") or {})
        self.write_manifest(manifest)

    # ------------------------------------------------------------------------------------------- tables
    def files(self, folder: str) -> list[str]:
        """Data files under a published output folder, resolved through the manifest (recursive, sorted); names
        starting with '.' or '_' are working files."""
        return sorted(self._file_sizes(self.output_path(folder)))

    def _file_sizes(self, base: str) -> dict[str, int]:
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        out = {}
        for info in infos:
            rel = posixpath.relpath(info.path, base)
            if info.type == pafs.FileType.File and not any(p.startswith((".", "_")) for p in rel.split("/")):
                out[info.path] = info.size
        return out

    def listing(self, folder: str) -> dict[str, int]:
        """{relative file name: size} of a published folder: what `complete` promises is there."""
        return self.listing_at(self.output_path(folder))

    def listing_at(self, base: str) -> dict[str, int]:
        return {posixpath.relpath(p, base): size for p, size in sorted(self._file_sizes(base).items())}

    def read_table(self, folder: str, columns: list[str] | None = None) -> pa.Table | None:
        """A published table, or None if the folder is not there (the stage has not produced it). Every other
        failure stops the caller with the file's name: a corrupt table must never read as an empty one."""
        paths = [p for p in self.files(folder) if p.endswith(".parquet")]
        if not paths:
            return None
        tables = []
        for p in paths:
            try:
                with self.fs.open_input_file(p) as f:
                    tables.append(pq.read_table(f, columns=columns))
            except (OSError, pa.ArrowException) as err:
                raise self._unreadable(p, err) from None
        return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]

    def read_frame(self, folder: str, columns: list[str] | None = None):
        """`read_table` as pandas; an empty frame (with `columns`, if given) when the folder is not there."""
        import pandas as pd

        table = self.read_table(folder, columns)
        return table.to_pandas() if table is not None else pd.DataFrame(columns=columns or [])

    def iter_frames(self, folder: str, columns: list[str] | None = None, batch_rows: int = 1000):
        """A published table as pandas frames of at most `batch_rows` rows, file by file: a table of any size is read
        holding one batch. Nothing if the folder is not there; a file that cannot be read stops the caller."""
        for p in [p for p in self.files(folder) if p.endswith(".parquet")]:
            try:
                with self.fs.open_input_file(p) as f:
                    for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns):
                        yield batch.to_pandas()
            except (OSError, pa.ArrowException) as err:
                raise self._unreadable(p, err) from None

    def count_rows(self, folder: str) -> int:
        """Rows in a published table, from its files' footers (no data is read)."""
        total = 0
        for p in [p for p in self.files(folder) if p.endswith(".parquet")]:
            try:
                with self.fs.open_input_file(p) as f:
                    total += pq.ParquetFile(f).metadata.num_rows
            except (OSError, pa.ArrowException) as err:
                raise self._unreadable(p, err) from None
        return total

    def _unreadable(self, path: str, err: Exception) -> StageInputError:
        return StageInputError(
            f"cannot read {self.uri.rstrip('/')}/{posixpath.relpath(path, self.root)} ({type(err).__name__}: "
            f"{str(err)[:200]}); the stage stops rather than read it as empty. Rerun the stage that wrote it "
            f"(--force) or restore the file."
        )

    def write_frame(self, folder_path: str, df, name: str) -> str:
        """Write a pandas frame as one Parquet file into `folder_path` (a full path inside the run), atomically."""
        return self.write_table(folder_path, pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False), name)

    def write_table(self, folder_path: str, table: pa.Table, name: str) -> str:
        """`write_frame` for an Arrow table."""
        ensure_dir(self.fs, folder_path)
        path = posixpath.join(folder_path, name)
        if not self.is_local:  # one PUT is all or nothing
            with self.fs.open_output_stream(path) as f:
                pq.write_table(table, f)
            return path
        tmp = posixpath.join(folder_path, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        with self.fs.open_output_stream(tmp) as f:
            pq.write_table(table, f)
        self.fs.move(tmp, path)
        return path

    def delete_dir(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_dir(path)



class TableParts:
    """A stage's table written part by part into its output folder, so no process holds all of it:
    `<name>-00000.parquet`, ... (the names sort in the order written); if nothing was written, an empty table with
    the columns, which readers can still open. `types`: columns a part may hold only nulls in, written with the type
    the other parts have, so that the parts read as one table. `tally`: a column whose values are counted."""

    def __init__(self, run: RunDir, folder: str, name: str, columns: list[str], types: dict | None = None, tally: str | None = None):
        self.run, self.folder, self.name, self.columns, self.types, self.tally = run, folder, name, columns, types or {}, tally
        self.parts, self.rows, self.tallied = 0, 0, Counter()

    def write(self, df, empty_ok: bool = False) -> None:
        if df.empty and not empty_ok:  # an empty part's columns have no types to read the others by
            return
        table = pa.Table.from_pandas(df[self.columns].reset_index(drop=True), preserve_index=False)
        for column, kind in self.types.items():
            if table.schema.field(column).type == pa.null():
                table = table.set_column(table.schema.get_field_index(column), column, pa.nulls(len(table), kind))
        self.run.write_table(self.folder, table, f"{self.name}-{self.parts:05d}.parquet")
        self.parts, self.rows = self.parts + 1, self.rows + len(df)
        if self.tally:
            self.tallied.update(df[self.tally].astype(str))

    def close(self) -> int:
        """Rows written."""
        if not self.parts:
            import pandas as pd

            self.write(pd.DataFrame(columns=self.columns), empty_ok=True)
        return self.rows


def file_fingerprint(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    """Cheap identity of an input file: a changed file (size or mtime) makes the stage rerun."""
    info = fs.get_file_info(path)
    mtime = info.mtime_ns if info.mtime_ns is not None else None
    return {"path": path, "size": info.size, "mtime_ns": mtime}


def stable_fraction(seed: int, key: str) -> float:
    """A number in [0, 1) from (seed, key): the same on every machine and every run."""
    value = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(value[:8], "big") / 2**64


def digest(value: Any) -> str:
    payload = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- the contract
@dataclass(frozen=True)
class Stage:
    """A stage's declaration; `run_stage` applies the contract to it."""

    name: str
    work: Callable[[StageRun], dict]  # the stage's logic: writes its outputs under ctx.output(...), returns counts
    sections: tuple[str, ...] = ()  # config sections whose values decide the output ("seed" for the top-level seed)
    upstream: tuple[str, ...] = ()  # stages whose published outputs it reads
    outputs: tuple[str, ...] = ()  # run-directory folders it publishes
    identity: Callable[[Any], Any] | None = None  # more hashed values: the teacher, single fields of other sections
    external_inputs: Callable[[Any], Any] | None = None  # fingerprints of inputs outside the run (source files)
    requires: tuple[str, ...] = ()  # upstream stages that must have completed (the split: held-out notes must be known)
    always_run: bool = False  # the serve stage deploys every time it is asked to
    summary: Callable[[dict], str] | None = None  # one line (or a few) for the console

    def config_parts(self, cfg) -> dict[str, str]:
        parts = {}
        for section in self.sections:
            value = getattr(cfg, section)
            parts[section] = digest(value.model_dump(mode="json") if hasattr(value, "model_dump") else value)
        if self.identity is not None:
            parts["identity"] = digest(self.identity(cfg))
        return parts

    def config_hash(self, cfg) -> str:
        return digest(self.config_parts(cfg))

    def inputs(self, cfg, run: RunDir) -> dict[str, Any]:
        manifest = run.read_manifest()["stages"]
        out: dict[str, Any] = {s: (manifest.get(s) or {}).get("output_id") for s in self.upstream}
        if self.external_inputs is not None:
            out["external"] = self.external_inputs(cfg)
        return out


@dataclass
class StageRun:
    """What a stage's work gets: the config, the run, where to write, and its attempt."""

    stage: Stage
    cfg: Any
    run: RunDir
    attempt: str
    config_hash: str
    inputs: dict
    resumed: bool
    teacher: Callable[[], Any] | None = None
    extra: dict = field(default_factory=dict)  # pipeline-provided hooks (e.g. release the teacher)

    @property
    def version(self) -> str:
        return VERSION_PREFIX + self.attempt

    def output(self, name: str) -> str:
        """This attempt's folder of one declared output, `<run>/<name>/v-<attempt>`; published (pointed to by the
        manifest) when the stage completes."""
        if name not in self.stage.outputs:
            raise ValueError(f"stage {self.stage.name} does not declare output {name!r} (declared: {self.stage.outputs})")
        path = self.run.path(name, self.version)
        ensure_dir(self.run.fs, path)
        return path

    def output_uri(self, name: str) -> str:
        """`output` as a URI a worker on any node can write to."""
        return uri_for(self.run.fs, self.output(name))


@dataclass
class StageStatus:
    name: str
    state: str  # complete, stale, running (cut off), never run
    reasons: list[str]
    entry: dict | None

    @property
    def up_to_date(self) -> bool:
        return self.state == "complete"


def stage_status(stage: Stage, cfg, run: RunDir, inputs: dict | None = None) -> StageStatus:
    """Whether a stage would be skipped, and if not, every reason why."""
    inputs = stage.inputs(cfg, run) if inputs is None else inputs
    entry = run.stage_entry(stage.name)
    if not entry:
        return StageStatus(stage.name, "never run", ["never run"], None)
    reasons = []
    if entry.get("config_hash") != stage.config_hash(cfg):
        recorded = entry.get("config_parts") or {}
        changed = [k for k, v in stage.config_parts(cfg).items() if recorded.get(k) != v]
        reasons.append(f"config changed ({', '.join(changed) or 'hash'})")
    recorded_inputs = entry.get("inputs") or {}
    for name, value in inputs.items():
        if recorded_inputs.get(name) != value:
            reasons.append("input files changed" if name == "external" else f"upstream {name} changed")
    if entry.get("status") == "running":
        return StageStatus(stage.name, "running", ["interrupted (recorded running, never completed)", *reasons], entry)
    if entry.get("status") != "complete":
        reasons.append(f"status {entry.get('status')}")
    for folder, listing in (entry.get("outputs") or {}).items():
        if run.listing(folder) != listing:
            reasons.append(f"output {folder}/ differs from what was recorded")
    if entry.get("incomplete_rows"):  # rows whose retryable errors ran out of attempts: a rerun retries them (only)
        reasons.append(f"{entry['incomplete_rows']} rows failed with retryable errors")
    return StageStatus(stage.name, "stale" if reasons else "complete", reasons, entry)


def run_stage(stage: Stage, cfg, run: RunDir, force: bool = False, teacher=None, extra: dict | None = None) -> dict:
    """Apply the contract: skip, or record running → work in a new version → record complete (publish)."""
    inputs = stage.inputs(cfg, run)
    status = stage_status(stage, cfg, run, inputs)
    if status.up_to_date and not force and not stage.always_run:
        return {**status.entry, "skipped": True}
    manifest = run.read_manifest()["stages"]
    missing = [u for u in stage.requires if (manifest.get(u) or {}).get("status") != "complete"]
    if missing:
        raise StageOrderError(f"stage {stage.name} needs {missing} to have completed first: run the whole pipeline, or "
                              f"--stage {' --stage '.join(missing)} before it")  # fmt: skip
    config_hash = stage.config_hash(cfg)
    previous = status.entry or {}
    resumed = bool(
        not force and previous.get("status") == "running" and previous.get("config_hash") == config_hash
        and previous.get("inputs") == inputs and previous.get("attempt")
    )  # fmt: skip
    attempt = previous["attempt"] if resumed else f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    if not resumed:  # an older attempt's half-written outputs never mix with this one's
        published = run.versions()
        for name in stage.outputs:
            run.prune_versions(name, keep=published.get(name))
    if status.state != "never run":
        log.info("%s: %s", stage.name, "; ".join(status.reasons) if not force else "forced")
    started = time.time()
    running = {"status": "running", "config_hash": config_hash, "config_parts": stage.config_parts(cfg), "inputs": inputs,
               "attempt": attempt, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    run.record_stage(stage.name, running)
    ctx = StageRun(stage, cfg, run, attempt, config_hash, inputs, resumed, teacher, extra or {})
    result = stage.work(ctx)
    for name in stage.outputs:
        ctx.output(name)  # an output with nothing in it is still an output
    outputs = {name: run.listing_at(ctx.output(name)) for name in stage.outputs}
    entry = {
        **result, **running, "status": "complete", "outputs": outputs, "resumed": resumed,
        "versions": {name: ctx.version for name in stage.outputs},
        "output_id": digest({"attempt": attempt, "config": config_hash, "outputs": outputs}),
        "seconds": result.get("seconds", round(time.time() - started, 2)),
    }  # fmt: skip
    run.record_stage(stage.name, entry)  # the switch: from here on every reader resolves the new version
    for name in stage.outputs:
        run.prune_versions(name, keep=ctx.version)
    metrics.stage_rows(stage.name, entry.get("counts") or entry.get("totals"))
    return entry
