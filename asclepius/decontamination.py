"""Decontamination: no evaluation note may reach training data, and no trained-on note may be evaluated.

Notes are compared by id and by the SHA-1 of their text (the same note under another id is caught too). Used by
the answers/import stages (the instruction data must not hold a held-out note) and by evaluation (an item's note
must not be in this run's instruction data or, if pretraining ran, its pretraining notes).
"""

from __future__ import annotations

import pandas as pd

from asclepius.run import RunDir


class ContaminationError(RuntimeError):
    pass


def _overlap(a: pd.DataFrame, a_hash: str, b: pd.DataFrame, b_hash: str) -> tuple[int, int]:
    ids = set(a.note_id) & set(b.note_id)
    hashes = set(a[a_hash].dropna()) & set(b[b_hash].dropna())
    return len(ids), len(hashes)


class HeldOutNotes:
    """The held-out evaluation notes' ids and text hashes, read once, to check data part by part as it is written."""

    def __init__(self, run: RunDir):
        eval_notes = run.read_frame("eval_notes", ["note_id", "text_sha1"])
        self.count = len(eval_notes)
        self.ids = set(eval_notes.note_id)
        self.hashes = set(eval_notes.text_sha1.dropna())

    def check(self, used: pd.DataFrame, what: str = "instruction data") -> None:
        """Raise if `used` (columns note_id and note_sha1) holds a held-out note, by id or by the hash of its text."""
        if not self.count or used.empty:
            return
        ids, hashes = len(self.ids & set(used.note_id)), len(self.hashes & set(used.note_sha1.dropna()))
        if ids or hashes:
            raise ContaminationError(f"{what} contains {ids} held-out note ids and {hashes} held-out note texts")

    def result(self) -> dict:
        """What the manifest records once every part passed."""
        return {"eval_notes": int(self.count), "overlap_ids": 0, "overlap_text": 0, "clean": True}


def check_decontamination(run: RunDir, used: pd.DataFrame, what: str = "instruction data") -> dict:
    """No held-out evaluation note (by id or by the hash of its text) may be in `used` (columns note_id and
    note_sha1). Raises on any overlap."""
    held_out = HeldOutNotes(run)
    held_out.check(used, what)
    return held_out.result()


def training_notes(run: RunDir, case_report_sources: list[str]) -> pd.DataFrame:
    """(note_id, note_sha1) of every note this run trained on: its instruction data, and — once pretraining has
    completed — the notes and synthetic notes that were not held out (case reports are never trained on)."""
    frames = [run.read_frame("instructions", ["note_id", "note_sha1"])]
    if (run.stage_entry("pretrain") or {}).get("status") == "complete":
        held_out = set(run.read_frame("eval_notes", ["note_id"]).note_id)
        for folder in ("notes", "synthetic_notes"):
            notes = run.read_frame(folder, ["note_id", "source", "text_sha1"])
            notes = notes[~notes.note_id.isin(held_out) & ~notes.source.isin(case_report_sources)]
            frames.append(notes.rename(columns={"text_sha1": "note_sha1"})[["note_id", "note_sha1"]])
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["note_id", "note_sha1"])


def check_not_trained_on(run: RunDir, items: pd.DataFrame, case_report_sources: list[str]) -> dict:
    """Evaluation items (note_id, note_sha1) must not be notes this run trained on. Raises on any overlap."""
    trained = training_notes(run, case_report_sources)
    ids, hashes = _overlap(items, "note_sha1", trained, "note_sha1") if len(trained) and len(items) else (0, 0)
    result = {"items": int(len(items)), "training_notes": int(len(trained)), "overlap_ids": ids, "overlap_text": hashes,
              "clean": not ids and not hashes}  # fmt: skip
    if not result["clean"]:
        raise ContaminationError(
            f"refusing to evaluate: {ids} evaluation items share a note id and {hashes} a note text with this run's "
            "training data (instructions or pretraining notes); evaluate on held-out notes only"
        )
    return result
