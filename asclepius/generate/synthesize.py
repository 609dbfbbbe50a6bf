"""Stage 2, synthesize: case reports (PMC-Patients) → synthetic discharge summaries, by the teacher.

max_tokens = the context − the prompt's tokens (the recipe's 4088), optionally capped. A synthetic note keeps its
case report's provenance: one made from a credentialed note is credentialed too.
"""

from __future__ import annotations

import functools
import time
from collections import Counter

import pandas as pd

from asclepius.generate.common import count_drop, fit, format_summary, reply_drop_reason, request_seed, text_sha1
from asclepius.generate.prompts import synthesis_prompt
from asclepius.run import Stage, StageRun
from asclepius.teacher.client import token_counter
from asclepius.teacher.ray_data import (
    ask_rows,
    guard_privacy,
    ledger_dir,
    spent_so_far,
    teacher_identity,
    teacher_totals,
    user_messages,
)

COLUMNS = ["note_id", "source", "case_report_id", "text", "text_sha1", "credentialed", "finish_reason",
           "input_truncated", "prompt_tokens", "completion_tokens"]  # fmt: skip


def case_reports(ctx: StageRun) -> pd.DataFrame:
    notes = ctx.run.read_frame("notes")
    if notes.empty:
        return notes
    return notes[notes.source.isin(ctx.cfg.synthesize.case_report_sources)].sort_values("note_id")


def synthesize(ctx: StageRun) -> dict:
    cfg, sc = ctx.cfg, ctx.cfg.synthesize
    started = time.time()
    reports = case_reports(ctx)
    counts: Counter = Counter(read=len(reports))
    if sc.limit is not None:
        counts["not_selected_over_limit"] = max(0, len(reports) - sc.limit)
        reports = reports.head(sc.limit)
    teacher = ctx.teacher() if len(reports) else None
    rows = []
    if teacher is not None:
        guard_privacy(teacher, reports)
        counter = token_counter(teacher)
        render = functools.partial(synthesis_prompt, sc.prompt)
        for r in reports.itertuples():
            # room for the summary: at least min_completion_tokens, so the case report gets at most the rest
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
    out = ask_rows(teacher, "synthesize", pd.DataFrame(rows), ledger_dir(cfg, ctx.run, "synthesize"), spent_usd=spent_so_far(ctx.run, exclude=ctx.stage.name)) if rows else pd.DataFrame()
    kept = []
    for r in out.itertuples() if len(out) else []:
        text = (r.response or "").strip() if r.status == "ok" else ""
        if count_drop(counts, reply_drop_reason(r, sc.keep_cut_off, text)):
            continue
        kept.append({
            "note_id": f"synthetic-{r.case_report_id}", "source": "synthetic", "case_report_id": r.case_report_id,
            "text": text, "text_sha1": text_sha1(text), "credentialed": bool(r.credentialed), "finish_reason": r.finish_reason,
            "input_truncated": bool(r.input_truncated), "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
        })  # fmt: skip
    counts["kept"] = len(kept)
    ctx.run.write_frame(ctx.output("synthetic_notes"), pd.DataFrame(kept, columns=COLUMNS), "synthetic_notes.parquet")
    totals = teacher_totals(out)
    return {"counts": dict(counts), "teacher": totals, "incomplete_rows": totals.get("retryable_failures", 0), "seconds": round(time.time() - started, 2)}


STAGE = Stage(
    name="synthesize",
    work=synthesize,
    sections=("synthesize", "seed"),
    upstream=("notes",),
    outputs=("synthetic_notes",),
    identity=teacher_identity,
    summary=format_summary("synthesize"),
)
