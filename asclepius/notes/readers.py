"""Finding a source's files, checking them before any work starts, and the pyarrow options to read them.

Used by the Ray Data adapter (asclepius.notes.stage) and by `read_source_locally`, the same reading without Ray
for tests and debugging. Errors name the config field, the file and the column; no note text is ever put in one.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from asclepius.config import NotesConfig, NoteSourceConfig
from asclepius.notes.sources import NOTES_SCHEMA, DuplicateFilter, clean_batch, source_columns
from asclepius.recipe import mimic3_eval_row_ids

SAMPLES = {
    "mimic3": "noteevents_sample.csv",
    "mimic4": "mimic4_discharge_sample.csv",
    "pmc": "pmc_patients_sample.csv",
}
_EXTENSIONS = {
    ".csv": "csv",
    ".csv.gz": "csv",
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
}
# pyarrow parses CSV in blocks of this size, which must hold the longest row (MIMIC notes are < 100 KB); small
# blocks keep the stage's memory flat (benchmarks/notes_ingest.py: 2 MB gave the lowest peak at full speed).
CSV_BLOCK_BYTES = 2 << 20


class NotesInputError(ValueError):
    """Input that cannot be read as configured: names the config field, the file, and the column or row."""


@dataclass(frozen=True)
class SourceFile:
    fs: pafs.FileSystem
    path: str
    format: str  # csv, jsonl, json (a top-level array), parquet
    columns: tuple[str, ...]  # columns to read: the source's columns that the file has


def sample_path(kind: str) -> str:
    if kind not in SAMPLES:
        raise NotesInputError(f"there is no bundled sample for source kind {kind!r}; samples: {sorted(SAMPLES)}")
    return str(resources.files("asclepius.resources").joinpath(SAMPLES[kind]))


def _format_of(path: str, configured: str) -> str | None:
    if configured != "auto":
        return configured
    lower = path.lower()
    for ext in sorted(_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return _EXTENSIONS[ext]
    return None


def _open_text(fs: pafs.FileSystem, path: str) -> io.TextIOBase:
    stream = fs.open_input_stream(path, compression="detect")
    return io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="")


def _header(fs: pafs.FileSystem, path: str, fmt: str) -> list[str]:
    if fmt == "csv":
        with _open_text(fs, path) as f:
            try:
                return next(csv.reader(f))
            except StopIteration:
                raise NotesInputError(f"{path}: the file is empty (no header row)") from None
    if fmt == "parquet":
        with fs.open_input_file(path) as f:
            return pq.read_schema(f).names
    if fmt == "jsonl":
        with _open_text(fs, path) as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        return list(json.loads(line).keys())
                    except (json.JSONDecodeError, AttributeError):
                        raise NotesInputError(f"{path}: line {line_no} is not a JSON object") from None
            raise NotesInputError(f"{path}: the file has no JSON lines")
    if fmt == "json":
        rows = _load_json_array(fs, path)
        keys: dict[str, None] = {}
        for row in rows[:100]:
            keys.update(dict.fromkeys(row))
        return list(keys)
    raise AssertionError(fmt)


def _load_json_array(fs: pafs.FileSystem, path: str) -> list[dict]:
    with _open_text(fs, path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise NotesInputError(f"{path}: not valid JSON at line {err.lineno} column {err.colno}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise NotesInputError(f"{path}: a .json source must hold a list of objects (use .jsonl for JSON lines)")
    return data


def _expand(fs: pafs.FileSystem, path: str) -> list[str]:
    if any(ch in path for ch in "*?["):
        base = path[: min(path.find(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0] or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return sorted(
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and not posixpath.basename(i.path).startswith((".", "_"))
            and _format_of(i.path, "auto") is not None
        )
    return []


def resolve_source(source: NoteSourceConfig, index: int) -> list[SourceFile]:
    """The files of one configured source, each checked for its format and required columns."""
    where = f"notes.sources.{index}"
    raw = sample_path(source.kind) if source.path.startswith("sample:") else source.path
    if source.path.startswith("sample:") and source.path != f"sample:{source.kind}":
        raise NotesInputError(f"{where}.path: {source.path!r} — the sample of a {source.kind} source is sample:{source.kind}")
    if "://" in raw:
        fs, path = pafs.FileSystem.from_uri(raw)
    else:
        import os

        fs, path = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(raw))
    paths = _expand(fs, path)
    if not paths:
        raise NotesInputError(f"{where}.path: no such file, or no readable files in it: {raw}")
    cols = source_columns(source)
    files = []
    for p in paths:
        fmt = _format_of(p, source.format)
        if fmt is None:
            raise NotesInputError(
                f"{where}.path: cannot tell the format of {p} from its name; set {where}.format "
                f"(csv, jsonl, json, parquet)"
            )
        header = _header(fs, p, fmt)
        missing = [c for c in cols.required if c not in header]
        if missing:
            raise NotesInputError(
                f"{where}: {p} lacks required column(s) {missing} for a {source.kind} source "
                f"(it has {header[:20]}{' ...' if len(header) > 20 else ''})"
            )
        files.append(SourceFile(fs=fs, path=p, format=fmt, columns=tuple(c for c in cols.read if c in header)))
    return files


# ------------------------------------------------------------------------------------------------ CSV options
@dataclass
class RejectedRows:
    """Rows the CSV parser could not split into the header's columns: counted and located, never logged."""

    count: int = 0
    by_file: Counter = field(default_factory=Counter)
    first: list[dict] = field(default_factory=list)

    def add(self, file: str, number: int | None, expected: int, actual: int) -> None:
        self.count += 1
        self.by_file[file] += 1
        if len(self.first) < 20:
            self.first.append({"file": file, "row": number, "expected_columns": expected, "actual_columns": actual})


class SkipInvalidRow:
    """pyarrow `invalid_row_handler`: skip the row and hand its location (never its text) to a sink."""

    def __init__(self, file: str, sink):
        self.file = file
        self.sink = sink  # has .add(file, number, expected, actual)

    def __call__(self, row) -> str:
        self.sink.add(self.file, row.number, row.expected_columns, row.actual_columns)
        return "skip"


def csv_options(file: SourceFile, sink) -> dict:
    """pyarrow CSV options: only the needed columns, all read as strings, UTF-8 checked later per row."""
    return dict(
        read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES, use_threads=True),
        parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=SkipInvalidRow(file.path, sink)),
        convert_options=pacsv.ConvertOptions(
            include_columns=list(file.columns),
            column_types={c: pa.string() for c in file.columns},
            # One undecodable byte must not fail a whole file: clean_batch validates and repairs per row.
            check_utf8=False,
            strings_can_be_null=True,
        ),
    )


def select_columns(table: pa.Table, columns: tuple[str, ...]) -> pa.Table:
    present = [c for c in columns if c in table.column_names]
    return table.select(present)


def iter_file_batches(file: SourceFile, sink) -> Iterator[pa.Table]:
    """Stream one file as pyarrow tables, without Ray."""
    if file.format == "csv":
        with file.fs.open_input_stream(file.path, compression="detect") as stream:
            reader = pacsv.open_csv(stream, **csv_options(file, sink))
            for batch in reader:
                yield pa.Table.from_batches([batch])
    elif file.format == "parquet":
        with file.fs.open_input_file(file.path) as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=list(file.columns)):
                yield pa.Table.from_batches([batch])
    elif file.format == "jsonl":
        with file.fs.open_input_stream(file.path, compression="detect") as stream:
            yield select_columns(pajson.read_json(stream), file.columns)
    else:
        yield json_array_table(file)


def json_array_table(file: SourceFile) -> pa.Table:
    rows = _load_json_array(file.fs, file.path)
    # Values are kept as text: PMC-Patients' `age` is a nested list, ids may be numbers.
    return pa.table(
        {
            c: pa.array([None if r.get(c) is None else (r[c] if isinstance(r[c], str) else json.dumps(r[c])) for r in rows], pa.string())
            for c in file.columns
        }
    )


def excluded_row_ids(source: NoteSourceConfig, index: int) -> frozenset[int]:
    """ROW_IDs a MIMIC-III source must drop: the recipe's 517 evaluation notes, or the configured file."""
    if source.kind != "mimic3":
        return frozenset()
    if source.exclude_row_ids_file is None:
        return mimic3_eval_row_ids()
    path = source.exclude_row_ids_file
    try:
        with open(path, encoding="utf-8") as f:
            tokens = f.read().split()
    except FileNotFoundError:
        raise NotesInputError(f"notes.sources.{index}.exclude_row_ids_file: no such file: {path}") from None
    bad = [t for t in tokens if not t.isdigit()]
    if bad:
        raise NotesInputError(f"notes.sources.{index}.exclude_row_ids_file: {path} has non-integer ids, e.g. {bad[0]!r}")
    return frozenset(int(t) for t in tokens)


def read_source_locally(source: NoteSourceConfig, notes: NotesConfig, index: int = 0):
    """The notes stage for one source without Ray: (kept table, counts, rejected rows, unknown placeholder
    types). For tests and debugging; the Ray adapter does the same per block."""
    excluded = excluded_row_ids(source, index)
    rejected = RejectedRows()
    tables, counts, unknown = [], Counter(), Counter()
    for file in resolve_source(source, index):
        for batch in iter_file_batches(file, rejected):
            result = clean_batch(batch, source, notes, excluded)
            tables.append(result.kept)
            counts.update(result.counts)
            unknown.update(result.unknown_placeholder_types)
    counts["read"] += rejected.count
    counts["dropped:malformed_row"] += rejected.count
    dedupe = DuplicateFilter()
    for i, table in enumerate(tables):
        tables[i], dropped = dedupe(table)
        counts["dropped:duplicate"] += dropped
        counts["kept"] -= dropped
    kept = pa.concat_tables(tables) if tables else NOTES_SCHEMA.empty_table()
    return kept, counts, rejected, unknown


