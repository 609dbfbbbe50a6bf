"""What the generating stages share: a request's seed, fitting a note to the context, the reply cascade that
decides whether a reply is usable, and the summary line. Sending requests, the ledger's place, the privacy guard
and the teacher's identity are the teacher layer's (asclepius.teacher.ray_data), shared with evaluation.

The tables here are small next to the teacher's work (one row per note), so they are shaped with pandas on the
driver; the requests go out from a pool of Ray actors.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from typing import Callable

from asclepius.config import Config, TeacherConfig
from asclepius.generate.prompts import fit_note
from asclepius.run import stable_fraction

log = logging.getLogger("asclepius.generate")
TeacherGetter = Callable[[], TeacherConfig]
INSTRUCTION_COLUMNS = ["note", "question", "answer", "task", "note_id", "source"]


def request_seed(cfg: Config, stage: str, note_id: str) -> int:
    """A sampling seed per request (OpenAI, vLLM and our Serve app honour it): reruns ask the same thing."""
    return int(stable_fraction(cfg.seed, f"{stage}:{note_id}") * 2**31)


def fit(counter, render, note: str, budget: int, mode: str):
    """(note fitted to the budget, truncated) — or (None, False) if it does not fit and may not be shortened."""
    fitted = fit_note(note, render, counter, budget)
    if fitted is None or (fitted[1] and mode == "skip"):
        return None, False
    return fitted


def reply_drop_reason(row, keep_cut_off: bool, text: str | None) -> str | None:
    """The cascade every generating stage applies to a teacher reply, first reason wins. `text` is the usable part
    of the reply as the stage sees it (the cleaned question, the stripped answer), None/empty if there is none."""
    if row.status != "ok":
        return "teacher_error"
    if row.finish_reason == "content_filter":
        return "content_filter"
    if not text:
        return "empty_reply"
    if row.finish_reason == "length" and not keep_cut_off:
        return "cut_off"
    return None


def text_sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def count_drop(counts: Counter, reason: str | None) -> bool:
    if reason:
        counts[f"dropped:{reason}"] += 1
    return bool(reason)


def format_summary(name: str):
    def fmt(entry: dict) -> str:
        counts = entry.get("counts", {})
        drops = ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in sorted(counts.items()) if k.startswith(("dropped:", "filtered:")) and v)
        line = f"{name}: {counts.get('read', 0)} in, {counts.get('kept', 0)} out" + (f"; dropped: {drops}" if drops else "")
        for key, label in (("not_selected_over_limit", "not selected (limit)"), ("held_out_for_eval", "held out for evaluation")):
            if counts.get(key):
                line += f"; {label}: {counts[key]}"
        t = entry.get("teacher", {})
        if t.get("requests"):
            line += (f"\n  teacher: {t['requests']} requests ({t['from_ledger']} from the ledger), {t['prompt_tokens']:,} prompt + "
                     f"{t['completion_tokens']:,} completion tokens, ${t['cost_usd_this_run']:.4f} this run, errors {t['errors'] or 0}")  # fmt: skip
        if entry.get("similarity"):
            s = entry["similarity"]
            line += f"\n  similarity filter: {s['rejected_similar']}/{s['offered']} questions too similar (rate {s['rejection_rate']})"
        if entry.get("decontamination"):
            d = entry["decontamination"]
            line += f"\n  decontamination: {d['eval_notes']} held-out notes, overlap {d['overlap_ids']} ids / {d['overlap_text']} texts"
        return line

    return fmt
