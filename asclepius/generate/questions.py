"""Stage 3, questions: one question per note for one of the recipe's 8 tasks, bootstrapped from seed questions and a
growing pool of generated ones (asclepius.generate.pool), with self-instruct's ROUGE-L similarity filter.

A note's task is drawn from (seed, note id); its prompt's examples are chosen when the request is sent, from the
pool as it is then. The pool lives in one Ray actor and journals every decision under the stage's config hash, so
a cut-off run resumes with the same prompts (answered from the teacher ledger, unpaid) while a changed config (a
new seed, threshold or task list) starts a fresh pool.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import heapq
import json
import logging
import posixpath
import time
from collections import Counter

import pandas as pd
import pyarrow as pa
import ray

from asclepius.coalesced import Coalesced
from asclepius.config import Config
from asclepius.generate.common import count_drop, fit, format_summary, reply_drop_reason, request_seed
from asclepius.generate.pool import QuestionPoolService, recorded_plans
from asclepius.generate.postprocess import clean_question
from asclepius.generate.prompts import question_prompt, task_for
from asclepius.generate.split import held_out_notes
from asclepius.run import RunDir, Stage, StageRun, TableParts
from asclepius.storage import uri_join
from asclepius.teacher.client import token_counter
from asclepius.teacher.ray_data import (
    TeacherStream,
    ask_rows,
    guard_privacy,
    ledger_dir,
    spent_so_far,
    teacher_identity,
    teacher_totals,
    user_messages,
)

log = logging.getLogger("asclepius.generate")
COLUMNS = ["note_id", "source", "note_sha1", "credentialed", "task", "note", "note_truncated", "question",
           "question_outcome", "examples", "pool_examples_used", "pool_size_at_prompt", "accepted_in_pool", "max_rouge_l"]  # fmt: skip


# the pool in one actor (one caller at a time: its decisions depend on their order); its class lives in
# asclepius.generate.pool, which is all its process imports
QuestionPoolActor = ray.remote(num_cpus=0, max_concurrency=1)(QuestionPoolService)


class QuestionHooks:
    """Builds a note's question prompt when it is sent (with the pool as it is then), and offers the answer back.

    A teacher actor has tens of requests in flight and each needs the pool twice; one actor call each would make the
    pool's round trips, not the teacher, set the stage's pace. What the requests ask while a call is in flight goes
    together in the next one (Coalesced): the pool sees the same calls in the same order, in fewer trips."""

    def __init__(self, pool_name: str, template: str):
        pool = ray.get_actor(pool_name, namespace="asclepius")
        self.template = template
        self.plans = Coalesced(lambda calls: pool.examples.remote(calls))
        self.decisions = Coalesced(lambda calls: pool.offer.remote(calls))

    async def before(self, row: dict) -> dict:
        return prompt_fields(self.template, row, await self.plans.submit((row["note_id"], row["task"])))

    async def after(self, row: dict, outcome) -> dict:
        fields = reply_fields(outcome.text if outcome.status == "ok" else None, outcome.status, outcome.finish_reason)
        if fields["offer"]:
            decision = await self.decisions.submit((row["note_id"], row["task"], fields["question"]))
            fields.update(accepted_in_pool=decision["accepted"], max_rouge_l=decision["rouge_l"])
        del fields["offer"]
        return fields


def prompt_fields(template: str, row: dict, plan: dict) -> dict:
    """A note's question prompt with the examples its plan chose (the pool as it was then)."""
    content = question_prompt(template, row["task"], row["note"], plan["examples"])
    return {"messages": user_messages(content), "examples": json.dumps(plan["examples"]),
            "pool_examples_used": len(plan["pool_indices"]), "pool_size_at_prompt": plan["pool_size"]}  # fmt: skip


def reply_fields(text: str | None, status: str, finish_reason: str | None) -> dict:
    """The question in a reply, and whether to offer it to the pool (a complete one only)."""
    question, q_outcome = clean_question(text)
    complete = bool(question) and (finish_reason != "length" or question.endswith("?"))
    return {"question": question, "question_outcome": q_outcome if status == "ok" else "teacher_error", "accepted_in_pool": None,
            "max_rouge_l": None, "offer": complete}  # fmt: skip


def ask_in_waves(cfg: Config, teacher, rows: list[dict], directory: str, pool, stage: str, spent_usd: float) -> pd.DataFrame:
    """Batch mode: the pool needs the questions before it, so the notes go in waves of `batch_wave_size` — one
    batch each, the pool updated between waves (a wave's prompts see the pool as it was when the wave began)."""
    frames = []
    size = teacher.batch_wave_size
    for i in range(0, len(rows), size):
        wave = [dict(r) for r in rows[i : i + size]]
        plans = ray.get(pool.examples.remote([(r["note_id"], r["task"]) for r in wave]))
        wave = [{**r, **prompt_fields(cfg.questions.prompt, r, plan)} for r, plan in zip(wave, plans)]
        out = ask_rows(teacher, stage, pd.DataFrame(wave), directory, spent_usd=spent_usd)
        answered = out.to_dict(orient="records")
        extra = [reply_fields(r["response"] if r["status"] == "ok" else None, r["status"], r["finish_reason"]) for r in answered]
        offered = [(r["note_id"], r["task"], f["question"]) for r, f in zip(answered, extra) if f["offer"]]
        decisions = iter(ray.get(pool.offer.remote(offered)))  # the wave's offers in one call, in the wave's order
        for fields in extra:
            if fields.pop("offer"):
                decision = next(decisions)
                fields.update(accepted_in_pool=decision["accepted"], max_rouge_l=decision["rouge_l"])
        frames.append(pd.concat([out.reset_index(drop=True), pd.DataFrame(extra)], axis=1))
        log.info("teacher %s: wave %d of %d done", stage, i // size + 1, -(-len(rows) // size))
    return pd.concat(frames, ignore_index=True)


def _rejected(accepted) -> bool:
    """The pool turned the question down (False), as opposed to accepted (True) or never offered (None/NaN)."""
    return accepted is not None and not pd.isna(accepted) and not bool(accepted)


NOTE_COLUMNS = ["note_id", "source", "text", "text_sha1", "credentialed"]


def question_notes(cfg: Config, run: RunDir, columns: list[str] = NOTE_COLUMNS, batch_rows: int = 10_000):
    """The notes to ask about, a frame at a time (each in note id order): real notes of the chosen sources (all but
    case reports by default) and synthetic ones."""
    wanted = cfg.questions.note_sources
    for folder in ("notes", "synthetic_notes"):
        for frame in run.iter_frames(folder, columns, batch_rows=batch_rows):
            if wanted:
                frame = frame[frame.source.isin(wanted)]
            elif folder == "notes":
                frame = frame[~frame.source.isin(cfg.synthesize.case_report_sources)]
            if len(frame):
                yield frame.sort_values("note_id")


def question_requests(cfg: Config, notes: pd.DataFrame, counter, counts: Counter, stage: str = "questions",
                      plans: dict | None = None) -> list[dict]:  # fmt: skip
    """One request row per note: the task drawn for it, the note fitted to the context. The prompt is the one the
    journal recorded for the note (a resumed stage), else an estimate (seed examples only) — the real one is built
    when the request is sent, with the pool's examples as they are then."""
    qc = cfg.questions
    tasks = [t.task for t in qc.tasks]
    budget = qc.context_tokens - qc.max_tokens - 160  # an allowance for the pool's examples
    rows = []
    for r in notes.itertuples():
        task = tasks[task_for(r.note_id, cfg.seed, len(tasks))]
        seeds = next(t.seed_questions for t in qc.tasks if t.task == task)[: qc.seed_examples]
        render = functools.partial(lambda n, t, s: question_prompt(qc.prompt, t, n, s), t=task, s=seeds)
        fitted, truncated = fit(counter, render, r.text, budget, qc.on_too_long)
        if fitted is None:
            counts["dropped:too_long"] += 1
            continue
        counts["note_truncated"] += truncated
        plan = (plans or {}).get(r.note_id)
        prompt = question_prompt(qc.prompt, task, fitted, plan["examples"]) if plan and plan["task"] == task else render(fitted)
        rows.append({
            "note_id": r.note_id, "source": r.source, "note_sha1": r.text_sha1, "credentialed": bool(r.credentialed),
            "task": task, "note": fitted, "note_truncated": truncated, "messages": user_messages(prompt),
            "max_tokens": qc.max_tokens, "temperature": qc.temperature, "sample_index": r.note_id,
            "seed": request_seed(cfg, stage, r.note_id),
        })  # fmt: skip
    return rows


def journal_dir(directory: str, journal_key: str) -> str:
    return uri_join(directory + "_pool", journal_key)


@contextlib.contextmanager
def question_pool(cfg: Config, directory: str, journal_key: str):
    """The bootstrapping pool's actor, named after its journal (one per stage and config), killed when done.
    Yields (actor, name)."""
    qc = cfg.questions
    journal = journal_dir(directory, journal_key)
    pool_name = f"asclepius-question-pool-{hashlib.sha256(journal.encode()).hexdigest()[:12]}"
    pool = QuestionPoolActor.options(name=pool_name, namespace="asclepius", get_if_exists=True).remote(
        tasks={t.task: t.seed_questions for t in qc.tasks}, threshold=qc.similarity_threshold,
        seed_examples=qc.seed_examples, pool_examples=qc.pool_examples, seed=cfg.seed, journal_dir=journal,
    )  # fmt: skip
    try:
        yield pool, pool_name
    finally:
        ray.kill(pool)


def ask_questions(cfg: Config, teacher, rows: list[dict], directory: str, journal_key: str, stage: str = "questions", spent_usd: float = 0.0):
    """Send the question requests through the bootstrapping pool; returns (replies, pool statistics)."""
    with question_pool(cfg, directory, journal_key) as (pool, pool_name):
        if teacher.mode == "batch":
            out = ask_in_waves(cfg, teacher, rows, directory, pool, stage, spent_usd)
        else:
            hooks = functools.partial(QuestionHooks, pool_name=pool_name, template=cfg.questions.prompt)
            out = ask_rows(teacher, stage, pd.DataFrame(rows), directory, hooks=hooks, spent_usd=spent_usd)
        return out, ray.get(pool.stats.remote())


def _cleaned(out: pd.DataFrame, counts: Counter):
    """The replies with a usable question: one cut off before its "?" is incomplete, one cut off after it is kept."""
    for r in out.itertuples() if len(out) else []:
        question = r.question if isinstance(r.question, str) else None  # null when the reply held none
        complete = question is not None and (r.finish_reason != "length" or question.endswith("?"))
        if not count_drop(counts, reply_drop_reason(r, True, question) or (None if complete else "cut_off")):
            yield r


def questions(ctx: StageRun) -> dict:
    """Streams in online mode: the notes are read, asked about and filtered a block at a time and the table is written
    part by part, so no process holds the stage's rows; what grows with the notes is the pool itself (its questions,
    in one actor) and, on a resumed run, the journal's plans. Batch mode sends the requests in waves from the driver."""
    cfg, qc, run = ctx.cfg, ctx.cfg.questions, ctx.run
    started = time.time()
    held_out = set(run.read_frame("eval_notes", ["note_id"]).note_id)
    chosen = None  # `limit`: the notes with the smallest ids, as when the whole table was sorted
    if qc.limit is not None:
        ids = (i for f in question_notes(cfg, run, ["note_id", "source"]) for i in f.note_id if i not in held_out)
        chosen = set(heapq.nsmallest(qc.limit, ids))

    def selected(frame: pd.DataFrame) -> pd.Series:
        return ~frame.note_id.isin(held_out) & (frame.note_id.isin(chosen) if chosen is not None else True)

    counts: Counter = Counter(read=0, held_out_for_eval=0)
    to_ask = 0
    for f in question_notes(cfg, run, ["note_id", "source"]):
        held = f.note_id.isin(held_out)
        counts["read"] += len(f)
        counts["held_out_for_eval"] += int(held.sum())
        to_ask += int(selected(f).sum())
    if qc.limit is not None:
        counts["not_selected_over_limit"] = counts["read"] - counts["held_out_for_eval"] - to_ask
    teacher = ctx.teacher() if to_ask else None
    writer = TableParts(run, ctx.output("questions"), "questions", COLUMNS, types=NULLABLE_TYPES, tally="task")
    totals, pool_stats = {"requests": 0}, {}
    if teacher is not None:
        guard_privacy(teacher, (f[selected(f)] for f in question_notes(cfg, run, ["note_id", "source", "credentialed"])))
        directory = ledger_dir(cfg, run, "questions")
        plans = recorded_plans(journal_dir(directory, ctx.config_hash))
        counter = token_counter(teacher)
        spent_usd = spent_so_far(run, exclude=ctx.stage.name)
        with question_pool(cfg, directory, ctx.config_hash) as (pool, pool_name):
            if teacher.mode == "batch":  # the pool needs each wave's questions before the next: rows on the driver
                rows = [r for f in question_notes(cfg, run) for r in question_requests(cfg, f[selected(f)], counter, counts, plans=plans)]
                out = ask_in_waves(cfg, teacher, rows, directory, pool, "questions", spent_usd) if rows else pd.DataFrame()
                writer.write(_kept_questions(out, qc, counts))
                totals = teacher_totals(out)
            else:
                hooks = functools.partial(QuestionHooks, pool_name=pool_name, template=qc.prompt)
                stream = TeacherStream(teacher, "questions", directory, posixpath.join(ctx.output("questions"), "_requests"), run.fs,
                                       hooks=hooks, spent_usd=spent_usd, expected_rows=to_ask)  # fmt: skip
                chunks = (pd.DataFrame(rows) for f in question_notes(cfg, run, batch_rows=stream.block_rows)
                          if (rows := question_requests(cfg, f[selected(f)], counter, counts, plans=plans)))  # fmt: skip
                for out in stream.answers(chunks):
                    writer.write(_kept_questions(out, qc, counts))
                stream.cleanup()
                totals = stream.totals()
            pool_stats = ray.get(pool.stats.remote())
    counts["kept"] = writer.close()
    return {"counts": dict(counts), "tasks": dict(writer.tallied.most_common()), "similarity": pool_stats,
            "teacher": totals, "incomplete_rows": totals.get("retryable_failures", 0), "seconds": round(time.time() - started, 2)}  # fmt: skip


def _kept_questions(out: pd.DataFrame, qc, counts: Counter) -> pd.DataFrame:
    """The replies that hold a usable question (and, with `drop_similar`, one the pool accepted), as table rows."""
    kept = []
    for r in _cleaned(out, counts):
        if _rejected(r.accepted_in_pool) and qc.drop_similar:
            counts["dropped:too_similar"] += 1
            continue
        counts["multiple_questions_kept_first"] += r.question_outcome == "multiple"
        counts["cut_off_after_a_complete_question"] += r.finish_reason == "length"
        counts["too_similar_kept"] += _rejected(r.accepted_in_pool)
        kept.append(r._asdict())
    return pd.DataFrame(kept)[COLUMNS] if kept else pd.DataFrame(columns=COLUMNS)


# Columns a part of the table may hold only nulls in (no question offered to the pool in it)
NULLABLE_TYPES = {"accepted_in_pool": pa.bool_(), "max_rouge_l": pa.float64(), "question": pa.string(), "examples": pa.string()}


def _identity(cfg):
    return {"teacher": teacher_identity(cfg), "case_report_sources": cfg.synthesize.case_report_sources}


STAGE = Stage(
    name="questions",
    work=questions,
    sections=("questions", "seed"),
    upstream=("notes", "synthesize", "split"),
    requires=("split",),
    outputs=("questions",),
    identity=_identity,
    summary=format_summary("questions"),
)


# ----------------------------------------------------------------------------------------------- evaluation questions
EVAL_COLUMNS = ["note_id", "source", "note_sha1", "credentialed", "task", "note", "question"]


def eval_questions(ctx: StageRun) -> dict:
    """One question per held-out note, with the questions stage's own prompt and task draw (its own pool), for the
    evaluation set. Never filtered for similarity: every held-out note with a question is an evaluation item."""
    cfg = ctx.cfg
    started = time.time()
    notes = held_out_notes(ctx.run).sort_values("note_id")
    counts: Counter = Counter(read=len(notes))
    if cfg.evaluate.limit is not None:
        counts["not_selected_over_limit"] = max(0, len(notes) - cfg.evaluate.limit)
        notes = notes.head(cfg.evaluate.limit)
    teacher = ctx.teacher() if len(notes) else None
    rows = []
    if teacher is not None:
        guard_privacy(teacher, notes)
        plans = recorded_plans(journal_dir(ledger_dir(cfg, ctx.run, "eval_questions"), ctx.config_hash))
        rows = question_requests(cfg, notes, token_counter(teacher), counts, stage="eval_questions", plans=plans)
    out = pd.DataFrame()
    if rows:
        out, _ = ask_questions(cfg, teacher, rows, ledger_dir(cfg, ctx.run, "eval_questions"), ctx.config_hash, stage="eval_questions",
                               spent_usd=spent_so_far(ctx.run, exclude=ctx.stage.name))  # fmt: skip
    kept = [{c: getattr(r, c) for c in EVAL_COLUMNS} for r in _cleaned(out, counts)]
    table = pd.DataFrame(kept, columns=EVAL_COLUMNS)
    counts["kept"] = len(table)
    ctx.run.write_frame(ctx.output("eval_questions"), table, "eval_questions.parquet")
    totals = teacher_totals(out)
    return {"counts": dict(counts), "tasks": {str(k): int(v) for k, v in table.task.value_counts().items()},
            "teacher": totals, "incomplete_rows": totals.get("retryable_failures", 0), "seconds": round(time.time() - started, 2)}  # fmt: skip


def _eval_identity(cfg):
    return {"teacher": teacher_identity(cfg), "limit": cfg.evaluate.limit if cfg.evaluate else None}


EVAL_STAGE = Stage(
    name="eval_questions",
    work=eval_questions,
    sections=("questions", "seed"),
    upstream=("split",),
    requires=("split",),
    outputs=("eval_questions",),
    identity=_eval_identity,
    summary=format_summary("eval_questions"),
)
