"""The evaluation split: which notes are held out of every training stage, and the check that none leaked.

Its own stage, so that pretraining depends on the split and not on the questions stage (a change of a question
temperature must not cost GPU-hours of pretraining). A note is held out by a hash of its id (`split.seed`,
`split.eval_fraction`): the decision does not depend on which other notes exist, so adding notes never moves one
across the split. Case reports are inputs of synthesis, not notes to ask about, and are never held out.
"""

from __future__ import annotations

import time

import pandas as pd

from asclepius.generate.prompts import is_eval_note
from asclepius.run import RunDir, Stage, StageRun, TableParts

EVAL_COLUMNS = ["note_id", "source", "text", "text_sha1", "credentialed"]


def candidate_notes(cfg, run: RunDir, batch_rows: int = 1000):
    """Discharge notes, real and synthetic, a frame at a time: everything the training stages may use, before the
    split (read in batches: a hospital's notes need not fit in one process)."""
    for folder in ("notes", "synthetic_notes"):
        for frame in run.iter_frames(folder, EVAL_COLUMNS, batch_rows=batch_rows):
            if folder == "notes":
                frame = frame[~frame.source.isin(cfg.synthesize.case_report_sources)]
            if len(frame):
                yield frame


def held_out_mask(note_ids: pd.Series, cfg) -> pd.Series:
    return note_ids.map(lambda n: is_eval_note(n, cfg.split.eval_fraction, cfg.split.seed)).astype(bool)


PART_ROWS = 1000  # notes read at a time, and held-out notes per part written


def split(ctx: StageRun) -> dict:
    """The held-out notes, written in parts of about PART_ROWS rows, each in note id order (the readers sort them)."""
    started = time.time()
    counts = {"read": 0, "held_out_for_eval": 0}
    parts, waiting = TableParts(ctx.run, ctx.output("eval_notes"), "eval_notes", EVAL_COLUMNS), []
    for notes in candidate_notes(ctx.cfg, ctx.run, batch_rows=PART_ROWS):
        held = held_out_mask(notes.note_id, ctx.cfg)
        counts["read"] += len(notes)
        counts["held_out_for_eval"] += int(held.sum())
        if held.any():
            waiting.append(notes[held])
        if sum(map(len, waiting)) >= PART_ROWS:
            parts.write(pd.concat(waiting, ignore_index=True).sort_values("note_id"))
            waiting = []
    if waiting:
        parts.write(pd.concat(waiting, ignore_index=True).sort_values("note_id"))
    parts.close()
    counts["kept"] = counts["read"] - counts["held_out_for_eval"]
    return {"counts": counts, "seconds": round(time.time() - started, 2)}


def held_out_notes(run: RunDir) -> pd.DataFrame:
    return run.read_frame("eval_notes", EVAL_COLUMNS)


def _identity(cfg):
    return {"case_report_sources": cfg.synthesize.case_report_sources}


STAGE = Stage(
    name="split",
    work=split,
    sections=("split",),
    upstream=("notes", "synthesize"),
    outputs=("eval_notes",),
    identity=_identity,
    summary=lambda e: f"split: {e['counts']['read']} notes, {e['counts']['held_out_for_eval']} held out for evaluation",
)
