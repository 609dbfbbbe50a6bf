"""Released instruction data → the same `instructions` table, instead of generating it (no teacher).

`asclepius_r`: PhysioNet's Asclepius-R `mimiciii_discharge.csv` (ROW_ID, Question, Answer, Task), joined with the
notes stage's MIMIC-III notes by ROW_ID (rows with no note are counted). `synthetic`: the public synthetic set
(patient_id, note, question, answer, task). The stage takes the `answers` stage's place in the pipeline.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import pandas as pd

from asclepius.generate.answers import TABLE_COLUMNS, publish_instructions
from asclepius.generate.common import format_summary, text_sha1
from asclepius.run import Stage, StageRun, file_fingerprint

log = logging.getLogger("asclepius.generate")


def import_instructions(ctx: StageRun) -> dict:
    ic = ctx.cfg.instructions_import
    started = time.time()
    counts: Counter = Counter()
    if ic.kind == "asclepius_r":
        released = pd.read_csv(ic.path, dtype={"ROW_ID": "Int64"}, keep_default_na=False)
        missing = [c for c in ("ROW_ID", "Question", "Answer", "Task") if c not in released.columns]
        if missing:
            raise ValueError(f"instructions_import.path: {ic.path} lacks column(s) {missing}")
        counts["read"] = len(released)
        notes = ctx.run.read_frame("notes", ["note_id", "text", "text_sha1", "source", "credentialed"])
        notes = notes[notes.source == ic.notes_source]
        released["note_id"] = ic.notes_source + "-" + released.ROW_ID.astype(str)
        joined = released.merge(notes, on="note_id", how="left")
        no_note = joined.text.isna()
        counts["dropped:no_note_for_row_id"] = int(no_note.sum())
        if no_note.any():  # ROW_IDs are identifiers of the release, not note text
            log.warning("import: %d rows have a ROW_ID with no note in the notes table (first ids: %s)", int(no_note.sum()),
                        joined.loc[no_note, "ROW_ID"].head(5).tolist())  # fmt: skip
        joined = joined[~no_note]
        table = pd.DataFrame({"note": joined.text, "question": joined.Question, "answer": joined.Answer, "task": joined.Task,
                              "note_id": joined.note_id, "source": joined.source, "note_sha1": joined.text_sha1,
                              "credentialed": joined.credentialed.astype(bool)})  # fmt: skip
    else:
        released = pd.read_parquet(ic.path) if ic.path.endswith(".parquet") else pd.read_csv(ic.path, keep_default_na=False)
        missing = [c for c in ("patient_id", "note", "question", "answer", "task") if c not in released.columns]
        if missing:
            raise ValueError(f"instructions_import.path: {ic.path} lacks column(s) {missing}")
        counts["read"] = len(released)
        empty = (released.note.astype(str).str.strip() == "") | (released.answer.astype(str).str.strip() == "")
        counts["dropped:empty_field"] = int(empty.sum())
        released = released[~empty]
        table = pd.DataFrame({"note": released.note, "question": released.question, "answer": released.answer,
                              "task": released.task, "note_id": "synthetic-" + released.patient_id.astype(str),
                              "source": "asclepius_synthetic", "note_sha1": released.note.map(lambda t: text_sha1(str(t))),
                              "credentialed": False})  # fmt: skip
    entry = publish_instructions(ctx, table[TABLE_COLUMNS].reset_index(drop=True), counts, export_json=True)
    return {**entry, "imported_from": {"kind": ic.kind, "path": ic.path}, "seconds": round(time.time() - started, 2)}


def _released_file(cfg):
    import pyarrow.fs as pafs

    path = cfg.instructions_import.path
    fs, inner = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    return file_fingerprint(fs, inner)


STAGE = Stage(
    name="answers",  # takes the answers stage's place: its output is the same instructions table
    work=import_instructions,
    sections=("instructions_import",),
    upstream=("notes", "split"),
    requires=("split",),
    outputs=("instructions", "export"),
    external_inputs=_released_file,
    summary=format_summary("import"),
)
