"""The notes stage on Ray Data: stream each source, clean it block by block, write `<run>/notes/` as Parquet.

Each block goes read → clean_batch → Parquet file in one fused task, so note text crosses no object store and
the work spreads over every node that has a CPU (one read task per file; shard big inputs into several files to
use more than one core). A task returns only a small summary row — its file name and counts — so the driver
sums exact counts for free, in the same single pass over the input. Files are written under a private working
folder and only those named in a summary are moved into the stage's staging output: a retried task's orphan file
is never published. Then every note id is kept once (a second row with the same id — for a generic source without
ids, the same text — is dropped and counted: it would be sent to the teacher and trained on twice); only the ids
are read for that, and a file is rewritten only if it holds a repeated id.
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
from asclepius.notes.sources import DROP_REASONS, NOTES_SCHEMA, DuplicateFilter, clean_batch
from asclepius.run import RunDir, Stage, StageRun, file_fingerprint, run_stage
from asclepius.storage import ensure_dir

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


# The stages after this one read the notes a row group at a time (RunDir.iter_frames): a row group is what one read
# decodes at once, so a file of a whole read block in one group (Parquet's default, up to 1M rows) would make every
# later stage hold up to a block of note text (~128 MiB) however small its batches.
ROW_GROUP_ROWS = 1000


def _clean_and_write(
    batch: pa.Table,
    *,
    index: int,
    source: NoteSourceConfig,
    notes: NotesConfig,
    excluded: frozenset[int],
    fs: pafs.FileSystem,
    out_dir: str,
) -> pa.Table:
    result = clean_batch(batch, source, notes, excluded)
    file = None
    if result.kept.num_rows:
        file = posixpath.join(out_dir, f"{index:02d}-{uuid.uuid4().hex}.parquet")
        with fs.open_output_stream(file) as f:
            pq.write_table(result.kept, f, compression="zstd", row_group_size=ROW_GROUP_ROWS)
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


def _source_files(cfg: Config) -> list[list[SourceFile]]:
    return [resolve_source(s, i) for i, s in enumerate(cfg.notes.sources)]  # fails fast on bad input


def source_fingerprints(cfg: Config) -> dict:
    return {str(i): [file_fingerprint(f.fs, f.path) for f in files] for i, files in enumerate(_source_files(cfg))}


def notes_work(ctx: StageRun) -> dict:
    cfg, run = ctx.cfg, ctx.run
    files_by_source = _source_files(cfg)
    started = time.time()
    out_dir = ctx.output(STAGE)
    # Tasks write under a private folder; only files a finished task named are published (a retried task's
    # orphan never is).
    work_dir = posixpath.join(out_dir, "_tasks", uuid.uuid4().hex)
    ensure_dir(run.fs, work_dir)
    reject_name = f"asclepius-notes-rejects-{uuid.uuid4().hex[:12]}"
    rejects = RejectLog.options(name=reject_name).remote()
    sink = _RejectSink(reject_name)

    per_source: dict[str, Counter] = {}
    unknown_types: Counter = Counter()
    written: list[tuple[int, str]] = []
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
                fn_kwargs=dict(index=i, source=source, notes=cfg.notes, excluded=excluded, fs=run.fs, out_dir=work_dir),
            ).take_all()
            counts: Counter = Counter()
            for row in summaries:
                counts.update(json.loads(row["counts"]))
                unknown_types.update(json.loads(row["unknown_types"]))
                if row["file"]:
                    written.append((i, row["file"]))
            per_source[f"{i}:{source.source_name}"] = counts
        malformed = ray.get(rejects.summary.remote())
    finally:
        ray.kill(rejects)

    # Malformed rows were skipped by the parser, so no batch saw them: add them to the sources they came from.
    for i, (source, files) in enumerate(zip(cfg.notes.sources, files_by_source)):
        n = sum(malformed.by_file.get(f.path, 0) for f in files)
        per_source[f"{i}:{source.source_name}"].update({"read": n, "dropped:malformed_row": n})

    _place(run, work_dir, out_dir, sorted(written), per_source, [f"{i}:{s.source_name}" for i, s in enumerate(cfg.notes.sources)])
    if unknown_types:
        # Placeholder labels the tag map does not know help extend it; they come from the notes, so they stay in
        # the (private) run directory with the notes — never in the manifest or a log line.
        with run.fs.open_output_stream(posixpath.join(out_dir, "_deid_unknown_types.json")) as f:
            f.write(json.dumps(dict(unknown_types.most_common()), indent=1).encode())
    totals: Counter = Counter()
    for counts in per_source.values():
        totals.update(counts)
    dropped = {r: totals.get(f"dropped:{r}", 0) for r in DROP_REASONS}
    entry = {
        "sources": {k: dict(v) for k, v in per_source.items()},
        "totals": {"read": totals["read"], "kept": totals["kept"], "dropped": dropped},
        "utf8_repaired": totals.get("utf8_repaired", 0),
        "deid": {"placeholders": totals.get("deid_placeholders", 0), "unknown": totals.get("deid_unknown", 0),
                 "unknown_types": len(unknown_types)},  # fmt: skip
        "malformed_rows": {"count": malformed.count, "first": malformed.first},
        "files": len(written),
        "seconds": round(time.time() - started, 2),
    }
    if entry["totals"]["read"] != entry["totals"]["kept"] + sum(dropped.values()):
        raise AssertionError(f"notes: counts do not add up: {entry['totals']}")  # a bug, never expected
    return entry


def _place(run: RunDir, work_dir: str, out_dir: str, written: list[tuple[int, str]], per_source: dict, keys: list[str]) -> None:
    """Move the named files into the output folder, dropping rows whose note id an earlier file already had."""
    dedupe = DuplicateFilter()
    for i, path in written:
        target = posixpath.join(out_dir, posixpath.basename(path))
        with run.fs.open_input_file(path) as f:
            keep = dedupe.keep_mask(pq.read_table(f, columns=["note_id"]).column("note_id").to_pylist())
        dropped = len(keep) - sum(keep)
        if not dropped:
            run.fs.move(path, target)
            continue
        # rare: rewrite this one file without the repeated ids (its text is read by the driver once)
        with run.fs.open_input_file(path) as f:
            table = pq.read_table(f).filter(pa.array(keep))
        with run.fs.open_output_stream(target) as f:
            pq.write_table(table, f, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        run.fs.delete_file(path)
        per_source[keys[i]].update({"dropped:duplicate": dropped, "kept": -dropped})
    if not written:  # an empty table still has the schema, so later stages read 0 rows instead of failing
        with run.fs.open_output_stream(posixpath.join(out_dir, "empty.parquet")) as f:
            pq.write_table(NOTES_SCHEMA.empty_table(), f)
    run.fs.delete_dir(posixpath.dirname(work_dir))


def run_notes_stage(cfg: Config, run: RunDir, force: bool = False) -> dict:
    """The notes stage alone, under the stage contract (for tests and scripts; the pipeline calls run_stage)."""
    return run_stage(NOTES_STAGE, cfg, run, force=force)


def read_notes(run: RunDir) -> pa.Table:
    """The notes table of a run, for small runs and tests (later stages read it with Ray Data)."""
    table = run.read_table(STAGE)
    return table if table is not None else NOTES_SCHEMA.empty_table()


def format_summary(entry: dict) -> str:
    lines = [f"notes: {entry['totals']['read']} read, {entry['totals']['kept']} kept in {entry['seconds']} s"]
    for name, counts in entry["sources"].items():
        drops = ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in sorted(counts.items()) if k.startswith("dropped:") and v)
        lines.append(f"  {name}: read {counts.get('read', 0)}, kept {counts.get('kept', 0)}" + (f"; dropped: {drops}" if drops else ""))
    if entry["deid"]["unknown"]:
        lines.append(f"  de-id: {entry['deid']['unknown']} placeholders of {entry['deid']['unknown_types']} unknown types -> fallback "
                     f"tag (labels in notes/_deid_unknown_types.json)")  # fmt: skip
    if entry["utf8_repaired"]:
        lines.append(f"  {entry['utf8_repaired']} rows had undecodable bytes (replaced, flagged in utf8_repaired)")
    for r in entry["malformed_rows"]["first"][:5]:
        lines.append(f"  malformed row skipped: {r['file']} row {r['row']} ({r['actual_columns']} of {r['expected_columns']} columns)")
    return "\n".join(lines)


NOTES_STAGE = Stage(
    name=STAGE,
    work=notes_work,
    sections=("notes",),
    outputs=(STAGE,),
    external_inputs=source_fingerprints,
    summary=format_summary,
)
