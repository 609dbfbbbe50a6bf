"""Stage 2, synthesize: case reports (PMC-Patients) → synthetic discharge summaries, by the teacher.

max_tokens = the context − the prompt's tokens (the recipe's 4088), optionally capped. A synthetic note keeps its
case report's provenance: one made from a credentialed note is credentialed too.
"""

from __future__ import annotations

import functools
import heapq
import posixpath
import time
from collections import Counter

import pandas as pd

from asclepius.generate.common import count_drop, fit, format_summary, reply_drop_reason, request_seed, text_sha1
from asclepius.generate.prompts import synthesis_prompt
from asclepius.run import Stage, StageRun, TableParts
from asclepius.teacher.client import token_counter
from asclepius.teacher.ray_data import (
    TeacherStream,
    guard_privacy,
    ledger_dir,
    spent_so_far,
    teacher_identity,
    user_messages,
)

COLUMNS = ["note_id", "source", "case_report_id", "text", "text_sha1", "credentialed", "finish_reason",
           "input_truncated", "prompt_tokens", "completion_tokens"]  # fmt: skip


def case_reports(ctx: StageRun, columns: list[str] | None = None, batch_rows: int = 10_000):
    """The case reports among the notes, a frame at a time (each in note id order)."""
    sources = ctx.cfg.synthesize.case_report_sources
    for frame in ctx.run.iter_frames("notes", columns, batch_rows=batch_rows):
        frame = frame[frame.source.isin(sources)]
        if len(frame):
            yield frame.sort_values("note_id")


def synthesize(ctx: StageRun) -> dict:
    """Streams: the case reports are read, sent and their summaries written a block at a time, so no process holds
    the stage's rows (the recipe sent ~157k case reports, each answered with up to ~4k tokens)."""
    cfg, sc, run = ctx.cfg, ctx.cfg.synthesize, ctx.run
    started = time.time()
    counts: Counter = Counter(read=sum(len(f) for f in case_reports(ctx, ["note_id", "source"])))
    chosen = None  # `limit`: the case reports with the smallest ids
    if sc.limit is not None:
        chosen = set(heapq.nsmallest(sc.limit, (i for f in case_reports(ctx, ["note_id", "source"]) for i in f.note_id)))
        counts["not_selected_over_limit"] = counts["read"] - len(chosen)

    def selected(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[frame.note_id.isin(chosen)] if chosen is not None else frame

    to_send = len(chosen) if chosen is not None else counts["read"]
    teacher = ctx.teacher() if to_send else None
    writer = TableParts(run, ctx.output("synthetic_notes"), "synthetic_notes", COLUMNS)
    totals: dict = {"requests": 0}
    if teacher is not None:
        guard_privacy(teacher, (selected(f) for f in case_reports(ctx, ["note_id", "source", "credentialed"])))
        stream = TeacherStream(teacher, "synthesize", ledger_dir(cfg, run, "synthesize"), posixpath.join(ctx.output("synthetic_notes"), "_requests"),
                               run.fs, spent_usd=spent_so_far(run, exclude=ctx.stage.name), expected_rows=to_send)  # fmt: skip
        counter = token_counter(teacher)
        chunks = (pd.DataFrame(rows) for f in case_reports(ctx, batch_rows=stream.block_rows)
                  if (rows := _synthesis_requests(cfg, selected(f), counter, counts)))  # fmt: skip
        for out in stream.answers(chunks):
            writer.write(_kept_notes(out, sc, counts))
        stream.cleanup()
        totals = stream.totals()
    counts["kept"] = writer.close()
    return {"counts": dict(counts), "teacher": totals, "incomplete_rows": totals.get("retryable_failures", 0), "seconds": round(time.time() - started, 2)}


def _synthesis_requests(cfg, reports: pd.DataFrame, counter, counts: Counter) -> list[dict]:
    """The case reports as request rows: each fitted so that the summary has at least min_completion_tokens."""
    sc = cfg.synthesize
    render = functools.partial(synthesis_prompt, sc.prompt)
    rows = []
    for r in reports.itertuples():
        fitted, truncated = fit(counter, render, r.text, sc.context_tokens - sc.min_completion_tokens, sc.on_too_long)
        if fitted is None:
            counts["dropped:too_long"] += 1
            continue
        budget = sc.context_tokens - counter.count_messages([{"role": "user", "content": render(fitted)}])
        rows.append({
            "case_report_id": r.note_id, "case_report_source": r.source, "credentialed": bool(r.credentialed),
            "input_truncated": truncated, "messages": user_messages(render(fitted)),
            "max_tokens": int(min(budget, sc.max_tokens_cap) if sc.max_tokens_cap else budget),
            "temperature": sc.temperature, "sample_index": r.note_id, "seed": request_seed(cfg, "synthesize", r.note_id),
        })  # fmt: skip
        counts["input_truncated"] += truncated
    return rows


def _kept_notes(out: pd.DataFrame, sc, counts: Counter) -> pd.DataFrame:
    """The replies that make a synthetic note, as table rows; the others counted."""
    kept = []
    for r in out.itertuples():
        text = (r.response or "").strip() if r.status == "ok" else ""
        if count_drop(counts, reply_drop_reason(r, sc.keep_cut_off, text)):
            continue
        kept.append({
            "note_id": f"synthetic-{r.case_report_id}", "source": "synthetic", "case_report_id": r.case_report_id,
            "text": text, "text_sha1": text_sha1(text), "credentialed": bool(r.credentialed), "finish_reason": r.finish_reason,
            "input_truncated": bool(r.input_truncated), "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
        })  # fmt: skip
    return pd.DataFrame(kept, columns=COLUMNS)


STAGE = Stage(
    name="synthesize",
    work=synthesize,
    sections=("synthesize", "seed"),
    upstream=("notes",),
    outputs=("synthetic_notes",),
    identity=teacher_identity,
    summary=format_summary("synthesize"),
)
