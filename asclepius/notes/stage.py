"""The notes stage on Ray Data: stream each source, clean it block by block, write `<run>/notes/` as Parquet.

Each block goes read → clean_batch → Parquet file in one fused task, so note text crosses no object store and
the work spreads over every node that has a CPU (one read task per file; shard big inputs into several files to
use more than one core). A task returns only a small summary row — its file name and counts — so the driver
sums exact counts for free, in the same single pass over the input. Files are written under a private attempt
directory and only those named in a summary are moved into place: a retried task's orphan file is never
published, so the output holds every kept note exactly once.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
import uuid
from collections import Counter

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from asclepius.config import Config, NotesConfig, NoteSourceConfig
from asclepius.notes.readers import SourceFile, csv_options, excluded_row_ids, json_array_table, resolve_source, select_columns
from asclepius.notes.sources import DROP_REASONS, NOTES_SCHEMA, clean_batch
from asclepius.run import RunDir, file_fingerprint

log = logging.getLogger("asclepius.notes")
STAGE = "notes"


@ray.remote(num_cpus=0)
class RejectLog:
    """Collects, cluster-wide, the locations of rows the CSV parser skipped (never their text)."""

    def __init__(self):
        from asclepius.notes.readers import RejectedRows

        self.rows = RejectedRows()

    def add(self, file, number, expected, actual):
        self.rows.add(file, number, expected, actual)

    def summary(self):
        return self.rows


class _RejectSink:
    """Picklable stand-in for the RejectLog handle inside pyarrow's invalid-row callback."""

    def __init__(self, actor_name: str):
        self.actor_name = actor_name
        self._actor = None

    def add(self, file, number, expected, actual):
        if self._actor is None:
            self._actor = ray.get_actor(self.actor_name)
        # Waited for, so every location is in the log before the driver asks for the summary; malformed rows
        # are rare, so the round trip costs nothing in practice.
        ray.get(self._actor.add.remote(file, number, expected, actual))

    def __getstate__(self):
        return {"actor_name": self.actor_name, "_actor": None}


def _clean_and_write(
    batch: pa.Table,
    *,
    source: NoteSourceConfig,
    notes: NotesConfig,
    excluded: frozenset[int],
    fs: pafs.FileSystem,
    out_dir: str,
) -> pa.Table:
    result = clean_batch(batch, source, notes, excluded)
    file = None
    if result.kept.num_rows:
        file = posixpath.join(out_dir, f"{source.source_name}-{uuid.uuid4().hex}.parquet")
        with fs.open_output_stream(file) as f:
            pq.write_table(result.kept, f, compression="zstd")
    return pa.table(
        {
            "file": [file],
            "counts": [json.dumps(result.counts)],
            "unknown_types": [json.dumps(result.unknown_placeholder_types)],
        }
    )


def _dataset(file: SourceFile, sink) -> ray.data.Dataset:
    # override_num_blocks=1: a file is one streaming read task anyway; letting Ray split its blocks afterwards
    # would stop it from fusing the read with the cleaning, and push all note text through the object store.
    if file.format == "csv":
        return ray.data.read_csv(file.path, filesystem=file.fs, override_num_blocks=1, **csv_options(file, sink))
    if file.format == "parquet":
        return ray.data.read_parquet(file.path, filesystem=file.fs, columns=list(file.columns), override_num_blocks=1)
    if file.format == "jsonl":
        ds = ray.data.read_json(file.path, filesystem=file.fs, file_extensions=None)
        return ds.map_batches(select_columns, fn_kwargs={"columns": file.columns}, batch_format="pyarrow")
    # a top-level JSON array cannot be streamed; it is parsed once on the driver (use CSV/JSONL for big files)
    return ray.data.from_arrow(json_array_table(file))


def run_notes_stage(cfg: Config, run: RunDir, force: bool = False) -> dict:
    config_hash = cfg.stage_hash("notes")
    files_by_source = [resolve_source(s, i) for i, s in enumerate(cfg.notes.sources)]  # fails fast on bad input
    inputs = {str(i): [file_fingerprint(f.fs, f.path) for f in files] for i, files in enumerate(files_by_source)}
    if (done := run.skip_if_complete(STAGE, config_hash, inputs, force)) is not None:
        log.info("notes: up to date in %s (%d notes), skipped", run.uri, done["totals"]["kept"])
        return done

    started = time.time()
    attempt_dir = run.path(STAGE, "_attempts", uuid.uuid4().hex)
    run.fs.create_dir(attempt_dir, recursive=True)
    reject_name = f"asclepius-notes-rejects-{uuid.uuid4().hex[:12]}"
    rejects = RejectLog.options(name=reject_name).remote()
    sink = _RejectSink(reject_name)

    per_source: dict[str, dict] = {}
    unknown_types: Counter = Counter()
    written: list[str] = []
    try:
        for i, (source, files) in enumerate(zip(cfg.notes.sources, files_by_source)):
            excluded = excluded_row_ids(source, i)
            datasets = [_dataset(f, sink) for f in files]
            ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
            ds.context.target_max_block_size = cfg.notes.block_mb << 20
            summaries = ds.map_batches(
                _clean_and_write,
                batch_format="pyarrow",
                batch_size=None,  # one file per block: big enough Parquet files, no re-chunking copies
                zero_copy_batch=True,
                fn_kwargs=dict(source=source, notes=cfg.notes, excluded=excluded, fs=run.fs, out_dir=attempt_dir),
            ).take_all()
            counts: Counter = Counter()
            for row in summaries:
                counts.update(json.loads(row["counts"]))
                unknown_types.update(json.loads(row["unknown_types"]))
                if row["file"]:
                    written.append(row["file"])
            per_source[f"{i}:{source.source_name}"] = dict(counts)
        malformed = ray.get(rejects.summary.remote())
    finally:
        ray.kill(rejects)

    # Malformed rows were skipped by the parser, so no batch saw them: add them to the sources they came from.
    for i, (source, files) in enumerate(zip(cfg.notes.sources, files_by_source)):
        n = sum(malformed.by_file.get(f.path, 0) for f in files)
        key = f"{i}:{source.source_name}"
        per_source[key]["read"] = per_source[key].get("read", 0) + n
        per_source[key]["dropped:malformed_row"] = per_source[key].get("dropped:malformed_row", 0) + n

    _publish(run, attempt_dir, written)
    totals: Counter = Counter()
    for counts in per_source.values():
        totals.update(counts)
    dropped = {r: totals.get(f"dropped:{r}", 0) for r in DROP_REASONS}
    entry = {
        "status": "complete",
        "config_hash": config_hash,
        "inputs": inputs,
        "sources": per_source,
        "totals": {"read": totals["read"], "kept": totals["kept"], "dropped": dropped},
        "utf8_repaired": totals.get("utf8_repaired", 0),
        "deid": {
            "placeholders": totals.get("deid_placeholders", 0),
            "unknown": totals.get("deid_unknown", 0),
            "unknown_types": dict(unknown_types.most_common(20)),
        },
        "malformed_rows": {"count": malformed.count, "first": malformed.first},
        "files": len(written),
        "seconds": round(time.time() - started, 2),
    }
    if entry["totals"]["read"] != entry["totals"]["kept"] + sum(dropped.values()):
        raise AssertionError(f"notes: counts do not add up: {entry['totals']}")  # a bug, never expected
    run.record_stage(STAGE, entry)
    return entry


def _publish(run: RunDir, attempt_dir: str, written: list[str]) -> None:
    """Replace the stage's previous output with this attempt's files; drop anything a retried task left."""
    out_dir = run.path(STAGE)
    for info in run.fs.get_file_info(pafs.FileSelector(out_dir, recursive=False)):
        if info.type == pafs.FileType.File and info.path.endswith(".parquet"):
            run.fs.delete_file(info.path)
    for path in written:
        run.fs.move(path, posixpath.join(out_dir, posixpath.basename(path)))
    if not written:  # an empty table still has the schema, so later stages read 0 rows instead of failing
        with run.fs.open_output_stream(posixpath.join(out_dir, "empty.parquet")) as f:
            pq.write_table(NOTES_SCHEMA.empty_table(), f)
    run.fs.delete_dir(run.path(STAGE, "_attempts"))


def read_notes(run: RunDir) -> pa.Table:
    """The notes table of a run, for small runs and tests (later stages read it with Ray Data)."""
    return pq.read_table(run.path(STAGE), filesystem=run.fs, schema=NOTES_SCHEMA)


def format_summary(entry: dict) -> str:
    lines = [f"notes: {entry['totals']['read']} read, {entry['totals']['kept']} kept in {entry['seconds']} s"]
    for name, counts in entry["sources"].items():
        drops = ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in sorted(counts.items()) if k.startswith("dropped:") and v)
        lines.append(f"  {name}: read {counts.get('read', 0)}, kept {counts.get('kept', 0)}" + (f"; dropped: {drops}" if drops else ""))
    if entry["deid"]["unknown"]:
        lines.append(f"  de-id: {entry['deid']['unknown']} placeholders of unknown type -> fallback tag: {entry['deid']['unknown_types']}")
    if entry["utf8_repaired"]:
        lines.append(f"  {entry['utf8_repaired']} rows had undecodable bytes (replaced, flagged in utf8_repaired)")
    for r in entry["malformed_rows"]["first"][:5]:
        lines.append(f"  malformed row skipped: {r['file']} row {r['row']} ({r['actual_columns']} of {r['expected_columns']} columns)")
    return "\n".join(lines)
