"""Stage 4, answers: (note, question) → the teacher's answer, the recipe's filters → the `instructions` table.

max_tokens is 400 new tokens (the recipe asked for prompt + 400, a bug: see asclepius/config.py). The recipe's
filters drop pairs that mention a model in any field or whose answer ends with "?". The table is checked against
the held-out evaluation notes before it is published, and exported in the recipe's JSON format too.
"""

from __future__ import annotations

import functools
import json
import time
from collections import Counter

import pandas as pd

from asclepius.config import Config
from asclepius.decontamination import check_decontamination
from asclepius.generate.common import INSTRUCTION_COLUMNS, count_drop, fit, format_summary, reply_drop_reason, request_seed
from asclepius.generate.postprocess import compile_filter, instruction_drop_reason
from asclepius.generate.prompts import answer_prompt
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

TABLE_COLUMNS = INSTRUCTION_COLUMNS + ["note_sha1", "credentialed"]


def answers(ctx: StageRun) -> dict:
    cfg, ac = ctx.cfg, ctx.cfg.answers
    started = time.time()
    questions = ctx.run.read_frame("questions")
    counts: Counter = Counter(read=len(questions))
    teacher = ctx.teacher() if len(questions) else None
    rows = []
    if teacher is not None:
        guard_privacy(teacher, questions)
        counter = token_counter(teacher)
        for r in questions.itertuples():
            render = functools.partial(lambda n, q: answer_prompt(ac.prompt, n, q), q=r.question)
            fitted, truncated = fit(counter, render, r.note, ac.context_tokens - ac.max_tokens, ac.on_too_long)
            if fitted is None:
                counts["dropped:too_long"] += 1
                continue
            counts["note_truncated"] += truncated
            rows.append({
                "note_id": r.note_id, "source": r.source, "note_sha1": r.note_sha1, "credentialed": bool(r.credentialed),
                "task": r.task, "note": fitted, "question": r.question, "messages": user_messages(render(fitted)),
                "max_tokens": ac.max_tokens, "temperature": ac.temperature, "sample_index": r.note_id,
                "seed": request_seed(cfg, "answers", r.note_id),
            })  # fmt: skip
    out = ask_rows(teacher, "answers", pd.DataFrame(rows), ledger_dir(cfg, ctx.run, "answers"), spent_usd=spent_so_far(ctx.run, exclude=ctx.stage.name)) if rows else pd.DataFrame()
    regex = compile_filter(ac.filter_regex)
    kept = []
    for r in out.itertuples() if len(out) else []:
        answer = (r.response or "").strip() if r.status == "ok" else ""
        if count_drop(counts, reply_drop_reason(r, ac.keep_cut_off, answer)):
            continue
        reason = instruction_drop_reason(r.note, r.question, answer, regex, ac.drop_if_answer_endswith)
        if reason:
            counts[f"filtered:{reason}"] += 1
            continue
        counts["cut_off_kept"] += r.finish_reason == "length"
        kept.append({"note": r.note, "question": r.question, "answer": answer, "task": r.task, "note_id": r.note_id,
                     "source": r.source, "note_sha1": r.note_sha1, "credentialed": bool(r.credentialed)})  # fmt: skip
    entry = publish_instructions(ctx, pd.DataFrame(kept, columns=TABLE_COLUMNS), counts, export_json=ac.export_recipe_json)
    totals = teacher_totals(out)
    return {**entry, "teacher": totals, "incomplete_rows": totals.get("retryable_failures", 0), "seconds": round(time.time() - started, 2)}


def publish_instructions(ctx: StageRun, table: pd.DataFrame, counts: Counter, export_json: bool) -> dict:
    """Write the instructions table (after the decontamination check) and the recipe's JSON export."""
    counts["kept"] = len(table)
    decontamination = check_decontamination(ctx.run, table)
    ctx.run.write_frame(ctx.output("instructions"), table, "instructions.parquet")
    export = ctx.output("export")
    if export_json:  # the recipe's own format, for existing training scripts: a JSON list of {note, question, answer}
        with ctx.run.fs.open_output_stream(f"{export}/instructions.json") as f:
            f.write(json.dumps(table[["note", "question", "answer"]].to_dict(orient="records"), ensure_ascii=False, indent=1).encode())
    return {"counts": dict(counts), "tasks": {str(k): int(v) for k, v in table.task.value_counts().items()},
            "decontamination": decontamination}  # fmt: skip


def _identity(cfg: Config):
    return {"teacher": teacher_identity(cfg)}


STAGE = Stage(
    name="answers",
    work=answers,
    sections=("answers", "seed"),
    upstream=("questions", "split"),
    requires=("split",),
    outputs=("instructions", "export"),
    identity=_identity,
    summary=format_summary("answers"),
)
