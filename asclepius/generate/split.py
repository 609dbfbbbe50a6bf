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
from asclepius.run import RunDir, Stage, StageRun

EVAL_COLUMNS = ["note_id", "source", "text", "text_sha1", "credentialed"]


def candidate_notes(cfg, run: RunDir) -> pd.DataFrame:
    """Discharge notes, real and synthetic: everything the training stages may use, before the split."""
    notes = run.read_frame("notes")
    if len(notes):
        notes = notes[~notes.source.isin(cfg.synthesize.case_report_sources)]
    synthetic = run.read_frame("synthetic_notes")
    frames = [f[EVAL_COLUMNS] for f in (notes, synthetic) if len(f)]
    if not frames:
        return pd.DataFrame(columns=EVAL_COLUMNS)
    return pd.concat(frames, ignore_index=True).sort_values("note_id").reset_index(drop=True)


def held_out_mask(note_ids: pd.Series, cfg) -> pd.Series:
    return note_ids.map(lambda n: is_eval_note(n, cfg.split.eval_fraction, cfg.split.seed)).astype(bool)


def split(ctx: StageRun) -> dict:
    started = time.time()
    notes = candidate_notes(ctx.cfg, ctx.run)
    held = held_out_mask(notes.note_id, ctx.cfg) if len(notes) else pd.Series(dtype=bool)
    eval_notes = notes[held] if len(notes) else notes
    ctx.run.write_frame(ctx.output("eval_notes"), eval_notes, "eval_notes.parquet")
    counts = {"read": len(notes), "held_out_for_eval": int(len(eval_notes)), "kept": int(len(notes) - len(eval_notes))}
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
