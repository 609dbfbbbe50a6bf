"""Stage 4, answers: (note, question) → the teacher's answer, the recipe's filters → the `instructions` table.

max_tokens is 400 new tokens (the recipe asked for prompt + 400, a bug: see asclepius/config.py). The recipe's
filters drop pairs that mention a model in any field or whose answer ends with "?". The table is checked against
the held-out evaluation notes before it is published, and exported in the recipe's JSON format too.
"""

from __future__ import annotations

import functools
import json
import posixpath
import time
from collections import Counter

import pandas as pd

from asclepius.config import Config
from asclepius.decontamination import HeldOutNotes
from asclepius.generate.common import INSTRUCTION_COLUMNS, count_drop, fit, format_summary, reply_drop_reason, request_seed
from asclepius.generate.postprocess import compile_filter, instruction_drop_reason
from asclepius.generate.prompts import answer_prompt
from asclepius.run import Stage, StageRun, TableParts
from asclepius.teacher.client import token_counter
from asclepius.teacher.ray_data import (
    STREAM_BLOCK_ROWS,
    TeacherStream,
    guard_privacy,
    ledger_dir,
    spent_so_far,
    teacher_identity,
    user_messages,
)

TABLE_COLUMNS = INSTRUCTION_COLUMNS + ["note_sha1", "credentialed"]


def answers(ctx: StageRun) -> dict:
    """Streams: the questions are read, asked and filtered a block at a time, and the table is written part by part,
    so no process holds the stage's rows (a hospital's run can have millions)."""
    cfg, ac, run = ctx.cfg, ctx.cfg.answers, ctx.run
    started = time.time()
    counts: Counter = Counter(read=run.count_rows("questions"))
    teacher = ctx.teacher() if counts["read"] else None
    writer = InstructionsWriter(ctx, export_json=ac.export_recipe_json)
    totals: dict = {"requests": 0}
    if teacher is not None:
        guard_privacy(teacher, run.iter_frames("questions", ["credentialed", "source"], batch_rows=100_000))
        stream = TeacherStream(teacher, "answers", ledger_dir(cfg, run, "answers"), posixpath.join(ctx.output("instructions"), "_requests"),
                               run.fs, spent_usd=spent_so_far(run, exclude=ctx.stage.name), expected_rows=counts["read"])  # fmt: skip
        regex = compile_filter(ac.filter_regex)
        for out in stream.answers(_answer_requests(ctx, token_counter(teacher), counts, stream.block_rows)):
            writer.write(_kept_answers(out, ac, regex, counts))
        stream.cleanup()
        totals = stream.totals()
    entry = writer.close(counts)
    return {**entry, "teacher": totals, "incomplete_rows": totals.get("retryable_failures", 0), "seconds": round(time.time() - started, 2)}


def _answer_requests(ctx: StageRun, counter, counts: Counter, batch_rows: int):
    """The questions as request rows, a frame per batch: the note fitted to what the answer leaves of the context."""
    cfg, ac = ctx.cfg, ctx.cfg.answers
    for questions in ctx.run.iter_frames("questions", batch_rows=batch_rows):
        rows = []
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
        if rows:
            yield pd.DataFrame(rows)


def _kept_answers(out: pd.DataFrame, ac, regex, counts: Counter) -> pd.DataFrame:
    """The answered rows that pass the reply cascade and the recipe's filters, as table rows; the others counted."""
    kept = []
    for r in out.itertuples():
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
    return pd.DataFrame(kept, columns=TABLE_COLUMNS)


class InstructionsWriter:
    """The instructions table, written part by part into the stage's output (each part checked against the held-out
    evaluation notes first), and the recipe's JSON export beside it, written as the parts come."""

    def __init__(self, ctx: StageRun, export_json: bool):
        self.table = TableParts(ctx.run, ctx.output("instructions"), "instructions", TABLE_COLUMNS, tally="task")
        self.held_out = HeldOutNotes(ctx.run)
        self.export = None
        if export_json:  # the recipe's own format, for existing training scripts: a JSON list of {note, question, answer}
            self.export = ctx.run.fs.open_output_stream(f"{ctx.output('export')}/instructions.json")
            self.export.write(b"[")

    def write(self, table: pd.DataFrame) -> None:
        self.held_out.check(table)
        if self.export is not None:
            for i, record in enumerate(table[["note", "question", "answer"]].to_dict(orient="records")):
                separator = "," if self.table.rows or i else ""
                self.export.write(f"{separator}\n{json.dumps(record, ensure_ascii=False)}".encode())
        self.table.write(table)

    def close(self, counts: Counter) -> dict:
        counts["kept"] = self.table.close()
        if self.export is not None:
            self.export.write(b"\n]\n")
            self.export.close()
        return {"counts": dict(counts), "tasks": dict(self.table.tallied.most_common()), "decontamination": self.held_out.result()}


def publish_instructions(ctx: StageRun, table: pd.DataFrame, counts: Counter, export_json: bool) -> dict:
    """Write a whole instructions table (an import) as the answers stage writes its parts."""
    writer = InstructionsWriter(ctx, export_json)
    for start in range(0, max(1, len(table)), STREAM_BLOCK_ROWS):
        writer.write(table.iloc[start : start + STREAM_BLOCK_ROWS])
    return writer.close(counts)


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
