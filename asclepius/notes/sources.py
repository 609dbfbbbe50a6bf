"""What each note source looks like, and the cleaning of one batch of its rows — plain pyarrow, no Ray.

`clean_batch` is the whole notes stage for one batch: it decides with vectorised pyarrow compute which rows are
kept and why the others are dropped (first reason wins), then de-identifies and normalises the kept rows into the
notes table's one schema. Every input row is either kept or counted under a reason: read == kept + dropped.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from asclepius.config import NotesConfig, NoteSourceConfig
from asclepius.notes.deid import PlaceholderTagger, replace_mimic3_placeholders, replace_mimic4_placeholders

# The notes table: one schema for every source, so later stages read one table. Columns a source does not have
# are null; generic sources' extra columns go into `extra` as JSON.
NOTES_SCHEMA = pa.schema(
    [
        ("note_id", pa.string()),
        ("source", pa.string()),
        ("text", pa.string()),
        ("text_sha1", pa.string()),
        ("subject_id", pa.string()),
        ("hadm_id", pa.string()),
        ("category", pa.string()),
        ("description", pa.string()),
        ("chart_time", pa.string()),
        ("title", pa.string()),
        ("age", pa.string()),
        ("gender", pa.string()),
        ("extra", pa.string()),
        ("utf8_repaired", pa.bool_()),
        ("deid_placeholders", pa.int32()),
        ("deid_unknown", pa.int32()),
        ("credentialed", pa.bool_()),  # provenance: under a data use agreement (MIMIC, or flagged in the config)
    ]
)

# Why a row was dropped. Every reason is counted in the stage summary and the manifest.
DROP_REASONS = (
    "malformed_row",  # the parser could not split the row into the header's columns (counted by the reader)
    "missing_id",  # no note id, or a MIMIC-III ROW_ID that is not an integer
    "category",  # MIMIC-III CATEGORY / MIMIC-IV note_type not kept
    "is_error",  # MIMIC-III ISERROR = 1 (the note was marked erroneous by a physician)
    "eval_set",  # MIMIC-III ROW_ID in the recipe's evaluation sets (or the configured list)
    "empty_text",  # no text, or fewer than min_chars after stripping whitespace
    "bad_utf8",  # undecodable bytes, with on_bad_utf8 = drop
    "duplicate",  # a note id seen before (the same ROW_ID twice; for generic sources without ids, the same text)
)


@dataclass(frozen=True)
class SourceColumns:
    """Input column names of one source: which must be present, which are read if present."""

    id: str
    text: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    # input column → notes-table column, for metadata that is kept
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def read(self) -> list[str]:
        return list(dict.fromkeys(self.required + self.optional))


def source_columns(source: NoteSourceConfig) -> SourceColumns:
    if source.kind == "mimic3":
        required = ("ROW_ID", "CATEGORY", "TEXT") + (("ISERROR",) if source.drop_iserror else ())
        return SourceColumns(
            id="ROW_ID",
            text="TEXT",
            required=required,
            optional=("SUBJECT_ID", "HADM_ID", "CHARTDATE", "DESCRIPTION"),
            metadata={
                "SUBJECT_ID": "subject_id",
                "HADM_ID": "hadm_id",
                "CATEGORY": "category",
                "DESCRIPTION": "description",
                "CHARTDATE": "chart_time",
            },
        )
    if source.kind == "mimic4":
        return SourceColumns(
            id="note_id",
            text="text",
            required=("note_id", "note_type", "text"),
            optional=("subject_id", "hadm_id", "charttime"),
            metadata={"subject_id": "subject_id", "hadm_id": "hadm_id", "note_type": "category", "charttime": "chart_time"},
        )
    if source.kind == "pmc":
        return SourceColumns(
            id="patient_uid",
            text="patient",
            required=("patient_uid", "patient"),
            optional=("title", "age", "gender"),
            metadata={"title": "title", "age": "age", "gender": "gender"},
        )
    assert source.text_column  # checked by the config
    id_col = source.id_column or source.text_column
    return SourceColumns(
        id=id_col,
        text=source.text_column,
        required=tuple(dict.fromkeys((source.text_column, id_col, *source.keep_columns))),
    )


@dataclass
class CleanResult:
    kept: pa.Table
    counts: Counter  # read, kept, dropped:<reason>, utf8_repaired, deid_placeholders, deid_unknown
    unknown_placeholder_types: Counter  # placeholder labels (digits removed) that the tag map does not know


def _as_string(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray:
    if isinstance(column, pa.Array):
        column = pa.chunked_array([column])
    if pa.types.is_string(column.type):
        return column
    if pa.types.is_large_string(column.type):
        return column.cast(pa.string())
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return column  # decoded (and repaired if needed) by _repair_utf8
    return pc.cast(column, pa.string())


def _repair_utf8(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, pa.Array]:
    """Valid UTF-8 strings and a per-row flag of rows whose bytes had to be repaired.

    The reader does not validate UTF-8 (one bad byte would otherwise fail a whole file); here the common case is
    one vectorised validation, and only a batch that fails it is decoded row by row with replacement.
    """
    n = len(column)
    if pa.types.is_string(column.type):
        try:
            column.validate(full=True)
            return column, pa.array([False] * n, pa.bool_())
        except pa.ArrowInvalid:
            pass
    raw = pc.cast(column, pa.binary()) if not pa.types.is_binary(column.type) else column
    values, flags = [], []
    for b in raw.to_pylist():
        if b is None:
            values.append(None)
            flags.append(False)
            continue
        try:
            values.append(b.decode("utf-8"))
            flags.append(False)
        except UnicodeDecodeError:
            values.append(b.decode("utf-8", errors="replace"))
            flags.append(True)
    return pa.chunked_array([pa.array(values, pa.string())]), pa.array(flags, pa.bool_())


def _column(table: pa.Table, name: str) -> pa.ChunkedArray:
    if name in table.column_names:
        return _as_string(table[name])
    return pa.chunked_array([pa.nulls(len(table), pa.string())])


def _blank(values: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0), True)


_DIGITS = re.compile(r"\d+")


def clean_batch(
    table: pa.Table,
    source: NoteSourceConfig,
    notes: NotesConfig,
    excluded_row_ids: frozenset[int] = frozenset(),
) -> CleanResult:
    cols = source_columns(source)
    n = table.num_rows
    counts: Counter = Counter(read=n)
    unknown_types: Counter = Counter()

    text, repaired = _repair_utf8(_column(table, cols.text))
    counts["utf8_repaired"] = int(pc.sum(repaired).as_py() or 0)
    ids = pc.utf8_trim_whitespace(_column(table, cols.id))

    # One drop reason per row; checks run from the lowest priority to the highest, so the first reason in
    # DROP_REASONS order wins and a row is counted exactly once.
    reason = pa.chunked_array([pa.nulls(n, pa.string())])

    def mark(mask, name: str) -> None:
        nonlocal reason
        reason = pc.if_else(pc.fill_null(mask, False), pa.scalar(name), reason)

    if notes.on_bad_utf8 == "drop":
        mark(repaired, "bad_utf8")
    text_len = pc.utf8_length(pc.utf8_trim_whitespace(text))
    mark(pc.fill_null(pc.less(text_len, notes.min_chars), True), "empty_text")

    if source.kind == "mimic3":
        row_id_valid = pc.fill_null(pc.utf8_is_digit(ids), False)
        row_ids = pc.cast(pc.if_else(row_id_valid, ids, pa.scalar(None, pa.string())), pa.int64())
        if excluded_row_ids:
            mark(pc.is_in(row_ids, value_set=pa.array(sorted(excluded_row_ids), pa.int64())), "eval_set")
        if source.drop_iserror:
            mark(pc.equal(pc.utf8_trim_whitespace(_column(table, "ISERROR")), "1"), "is_error")
        keep = pa.array(source.keep_categories, pa.string())
        mark(pc.invert(pc.is_in(pc.utf8_trim_whitespace(_column(table, "CATEGORY")), value_set=keep)), "category")
        mark(pc.invert(row_id_valid), "missing_id")
    else:
        if source.kind == "mimic4":
            keep = pa.array(source.keep_note_types, pa.string())
            note_type = pc.utf8_trim_whitespace(_column(table, "note_type"))
            mark(pc.invert(pc.is_in(note_type, value_set=keep)), "category")
        if source.id_column or source.kind != "generic":
            mark(_blank(ids), "missing_id")

    for item in pc.value_counts(reason).to_pylist() if n else []:
        if item["values"] is not None:
            counts[f"dropped:{item['values']}"] += item["counts"]

    kept_mask = pc.is_null(reason)
    kept_text = pc.filter(text, kept_mask).to_pylist()
    kept_ids = pc.filter(ids, kept_mask).to_pylist()
    kept_repaired = pc.filter(repaired, kept_mask)
    counts["kept"] = len(kept_text)

    out_text, sha1, n_placeholders, n_unknown = [], [], [], []
    tagger = PlaceholderTagger(notes.deid_tag_map, notes.deid_fallback_tag) if source.kind == "mimic3" else None
    for t in kept_text:
        if source.kind == "mimic3":
            res = replace_mimic3_placeholders(t, notes.deid_tag_map, notes.deid_fallback_tag, tagger)
            # The label of an unknown placeholder type (digits masked) helps extend the tag map; it is a type
            # name such as "Doctor Something 12", not patient text.
            for span in res.unknown_spans:
                unknown_types[_DIGITS.sub("#", span).strip()[:40]] += 1
        elif source.kind == "mimic4":
            res = replace_mimic4_placeholders(t, notes.mimic4_placeholder_tag)
        else:
            res = None
        new_text = res.text if res else t
        out_text.append(new_text)
        sha1.append(hashlib.sha1(new_text.encode("utf-8")).hexdigest())
        n_placeholders.append(res.placeholders if res else 0)
        n_unknown.append(res.unknown if res else 0)
    counts["deid_placeholders"] = sum(n_placeholders)
    counts["deid_unknown"] = sum(n_unknown)

    note_ids = [_note_id(source, i, h) for i, h in zip(kept_ids, sha1)]
    columns: dict[str, pa.Array | pa.ChunkedArray] = {
        "note_id": pa.array(note_ids, pa.string()),
        "source": pa.array([source.source_name] * len(note_ids), pa.string()),
        "text": pa.array(out_text, pa.string()),
        "text_sha1": pa.array(sha1, pa.string()),
        "utf8_repaired": kept_repaired,
        "deid_placeholders": pa.array(n_placeholders, pa.int32()),
        "deid_unknown": pa.array(n_unknown, pa.int32()),
        "credentialed": pa.array([source.is_credentialed] * len(note_ids), pa.bool_()),
    }
    for in_col, out_col in cols.metadata.items():
        columns[out_col] = pc.filter(_repair_utf8(_column(table, in_col))[0], kept_mask)
    if source.kind == "generic" and source.keep_columns:
        extra = {c: pc.filter(_repair_utf8(_column(table, c))[0], kept_mask).to_pylist() for c in source.keep_columns}
        columns["extra"] = pa.array(
            [json.dumps({c: extra[c][i] for c in source.keep_columns}) for i in range(len(note_ids))], pa.string()
        )
    kept = pa.table(
        {f.name: columns.get(f.name, pa.nulls(len(note_ids), f.type)) for f in NOTES_SCHEMA}, schema=NOTES_SCHEMA
    )
    return CleanResult(kept=kept, counts=counts, unknown_placeholder_types=unknown_types)


def _note_id(source: NoteSourceConfig, raw_id: str | None, text_sha1: str) -> str:
    if source.kind == "mimic4":
        return str(raw_id)
    if source.kind == "generic" and not source.id_column:
        return f"{source.source_name}-{text_sha1[:16]}"  # no id column: the text's hash is a stable id
    return f"{source.source_name}-{raw_id}"


class DuplicateFilter:
    """Keeps the first row of every note id across the batches it is shown; counts the rest. A generic source
    without an id column has text-hash ids, so the same note twice is sent to the teacher (and trained on) once."""

    def __init__(self):
        self.seen: set[str] = set()

    def keep_mask(self, note_ids: list[str]) -> list[bool]:
        keep = []
        for note_id in note_ids:
            keep.append(note_id not in self.seen)
            self.seen.add(note_id)
        return keep

    def __call__(self, table: pa.Table) -> tuple[pa.Table, int]:
        keep = self.keep_mask(table.column("note_id").to_pylist())
        dropped = len(keep) - sum(keep)
        return (table.filter(pa.array(keep)) if dropped else table), dropped
