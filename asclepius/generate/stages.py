"""The synthetic data stages on Ray: synthesize, questions, answers (and importing released instruction data).

Each stage reads its input table, builds the recipe's prompts, sends them through the teacher on Ray Data (rate
limited, journaled exactly once in the ledger), cleans and filters the replies, writes its Parquet table and
records in the manifest every count: rows in, rows out, and why each dropped row was dropped. The tables here
are small next to the teacher's work (one row per note), so they are shaped with pandas on the driver; the
requests go out from a pool of Ray actors.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import posixpath
import time
from collections import Counter
from typing import Callable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from asclepius.config import Config, TeacherConfig
from asclepius.generate.pool import QuestionPool
from asclepius.generate.postprocess import clean_question, compile_filter, instruction_drop_reason
from asclepius.generate.prompts import (
    answer_prompt,
    fit_note,
    is_eval_note,
    question_prompt,
    stable_fraction,
    synthesis_prompt,
    task_for,
    user_messages,
)
from asclepius.teacher.client import check_privacy, endpoint_id, token_counter
from asclepius.teacher.ray_data import Progress, plan_requests, run_requests
from asclepius.run import RunDir

log = logging.getLogger("asclepius.generate")
TeacherGetter = Callable[[], TeacherConfig]
INSTRUCTION_COLUMNS = ["note", "question", "answer", "task", "note_id", "source"]


# ----------------------------------------------------------------------------------------------- shared helpers
def _read_table(run: RunDir, stage: str) -> pd.DataFrame:
    try:
        return pq.read_table(run.path(stage), filesystem=run.fs).to_pandas()
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return pd.DataFrame()


def _write_table(run: RunDir, stage: str, df: pd.DataFrame, name: str | None = None) -> str:
    out_dir = run.path(stage)
    run.fs.create_dir(out_dir, recursive=True)
    path = posixpath.join(out_dir, name or f"{stage}.parquet")
    tmp = path + ".tmp"
    with run.fs.open_output_stream(tmp) as f:
        pq.write_table(pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False), f)
    run.fs.move(tmp, path)  # readers never see half a table
    return path


def ledger_dir(cfg: Config, run: RunDir, stage: str) -> str:
    if cfg.teacher and cfg.teacher.ledger_dir:
        return os.path.join(cfg.teacher.ledger_dir, stage)
    if "://" in run.uri:
        raise ValueError("the run directory is an object store URI: set teacher.ledger_dir to a shared POSIX path")
    return os.path.join(run.root, "ledger", stage)


def _upstream(run: RunDir, *stages: str) -> dict:
    """What a stage's inputs are: the upstream stages' recorded runs (a rerun upstream reruns downstream)."""
    out = {}
    for s in stages:
        entry = run.stage_entry(s) or {}
        out[s] = entry.get("recorded_at")
    return out


def _teacher_identity(cfg: Config) -> str:
    """Which model answers (not how fast or how it is reached): another teacher means another stage output."""
    if cfg.teacher_from_serve:
        served = next((m for m in (cfg.serve.models if cfg.serve else []) if m.name == cfg.teacher_from_serve), None)
        return f"served:{cfg.teacher_from_serve}:{served.source if served else '?'}"
    if cfg.teacher is None:
        return "none"
    return f"{endpoint_id(cfg.teacher)}|{cfg.teacher.model}"


def _stage_hash(cfg: Config, *sections: str) -> str:
    parts = [cfg.stage_hash(s) for s in sections]
    parts.append(hashlib.sha256(_teacher_identity(cfg).encode()).hexdigest()[:12])
    return "-".join(parts)


def teacher_totals(df: pd.DataFrame) -> dict:
    """What the teacher did for a stage: requests, answers from the ledger, tokens, dollars, failures."""
    if df.empty:
        return {"requests": 0}
    errors = df[df.status != "ok"]
    return {
        "requests": int(len(df)),
        "from_ledger": int(df.cached.sum()),
        "ok": int((df.status == "ok").sum()),
        "errors": {str(k): int(v) for k, v in errors.error.fillna("unknown").value_counts().items()},
        "finish_reasons": {str(k): int(v) for k, v in df.finish_reason.dropna().value_counts().items()},
        "prompt_tokens": int(df.prompt_tokens.fillna(0).sum()),
        "completion_tokens": int(df.completion_tokens.fillna(0).sum()),
        "cost_usd": round(float(df.cost_usd.fillna(0).sum()), 6),
        "cost_usd_this_run": round(float(df.loc[~df.cached, "cost_usd"].fillna(0).sum()), 6),
        "attempts": int(df.attempts.fillna(0).sum()),
    }


def _ask(cfg: TeacherConfig, stage: str, df: pd.DataFrame, directory: str, hooks=None) -> pd.DataFrame:
    """Send the rows' requests (columns messages, max_tokens, sample_index, ...) and return them with answers."""
    if df.empty:
        return df
    ds = ray.data.from_pandas(df)
    plan = plan_requests(ds, cfg, stage, directory)
    with Progress(cfg, stage, plan):
        out = run_requests(ds, cfg, stage, plan, hooks=hooks).to_pandas()
    return out


def _request_seed(cfg: Config, stage: str, note_id: str) -> int:
    """A sampling seed per request (OpenAI, vLLM and our Serve app honour it): reruns ask the same thing."""
    return int(stable_fraction(cfg.seed, f"{stage}:{note_id}") * 2**31)


def _fit(counter, render, note: str, budget: int, mode: str):
    fitted = fit_note(note, render, counter, budget)
    if fitted is None or (fitted[1] and mode == "skip"):
        return None, False
    return fitted


def _source_kinds(cfg: Config, names) -> set[str]:
    kinds = {s.source_name: s.kind for s in cfg.notes.sources}
    return {kinds.get(n, n) for n in names}  # synthetic notes are their own kind


# ----------------------------------------------------------------------------------------------- synthesize
def run_synthesize_stage(cfg: Config, run: RunDir, get_teacher: TeacherGetter, force: bool = False) -> dict:
    sc = cfg.synthesize
    config_hash = _stage_hash(cfg, "synthesize")
    inputs = _upstream(run, "notes")
    if (done := run.skip_if_complete("synthesize", config_hash, inputs, force)) is not None:
        return done
    started = time.time()
    notes = _read_table(run, "notes")
    reports = notes[notes.source.isin(sc.case_report_sources)].sort_values("note_id") if len(notes) else notes
    counts: Counter = Counter(read=len(reports))
    if sc.limit is not None:
        counts["not_selected_over_limit"] = max(0, len(reports) - sc.limit)
        reports = reports.head(sc.limit)
    teacher = get_teacher() if len(reports) else None
    rows = []
    if teacher is not None:
        check_privacy(teacher, _source_kinds(cfg, set(reports.source)))
        counter = token_counter(teacher)
        for r in reports.itertuples():
            render = functools.partial(synthesis_prompt, sc.prompt)
            # room for the summary: at least min_completion_tokens, so the case report gets at most the rest
            fitted, truncated = _fit(counter, render, r.text, sc.context_tokens - sc.min_completion_tokens, sc.on_too_long)
            if fitted is None:
                counts["dropped:too_long"] += 1
                continue
            budget = sc.context_tokens - counter.count_messages([{"role": "user", "content": render(fitted)}])
            max_tokens = min(budget, sc.max_tokens_cap) if sc.max_tokens_cap else budget
            rows.append({
                "case_report_id": r.note_id, "case_report_source": r.source, "input_truncated": truncated,
                "messages": user_messages(render(fitted)), "max_tokens": int(max_tokens), "temperature": sc.temperature,
                "sample_index": r.note_id, "seed": _request_seed(cfg, "synthesize", r.note_id),
            })  # fmt: skip
            counts["input_truncated"] += truncated
    out = _ask(teacher, "synthesize", pd.DataFrame(rows), ledger_dir(cfg, run, "synthesize")) if rows else pd.DataFrame()
    kept = []
    for r in out.itertuples() if len(out) else []:
        if r.status != "ok":
            counts["dropped:teacher_error"] += 1
        elif r.finish_reason == "content_filter":
            counts["dropped:content_filter"] += 1
        elif not (r.response or "").strip():
            counts["dropped:empty_reply"] += 1
        elif r.finish_reason == "length" and not sc.keep_cut_off:
            counts["dropped:cut_off"] += 1
        else:
            text = r.response.strip()
            kept.append({
                "note_id": f"synthetic-{r.case_report_id}", "source": "synthetic", "case_report_id": r.case_report_id,
                "text": text, "text_sha1": hashlib.sha1(text.encode()).hexdigest(), "finish_reason": r.finish_reason,
                "input_truncated": bool(r.input_truncated), "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            })  # fmt: skip
    counts["kept"] = len(kept)
    _write_table(run, "synthetic_notes", pd.DataFrame(kept, columns=["note_id", "source", "case_report_id", "text", "text_sha1",
                                                                       "finish_reason", "input_truncated", "prompt_tokens", "completion_tokens"]))  # fmt: skip
    entry = {"status": "complete", "config_hash": config_hash, "inputs": inputs, "counts": dict(counts),
             "teacher": teacher_totals(out), "seconds": round(time.time() - started, 2)}  # fmt: skip
    run.record_stage("synthesize", entry)
    return entry


# ----------------------------------------------------------------------------------------------- questions
@ray.remote(num_cpus=0, max_concurrency=1)
class QuestionPoolActor:
    def __init__(self, **kwargs):
        self.pool = QuestionPool(**kwargs)

    def examples(self, note_id, task):
        return self.pool.examples(note_id, task)

    def offer(self, note_id, task, question):
        return self.pool.offer(note_id, task, question)

    def stats(self):
        return self.pool.stats()


class QuestionHooks:
    """Builds a note's question prompt when it is sent (with the pool as it is then), and offers the answer back."""

    def __init__(self, pool_name: str, template: str):
        self.pool = ray.get_actor(pool_name, namespace="asclepius")
        self.template = template

    async def before(self, row: dict) -> dict:
        plan = await self.pool.examples.remote(row["note_id"], row["task"])
        content = question_prompt(self.template, row["task"], row["note"], plan["examples"])
        return {"messages": user_messages(content), "examples": json.dumps(plan["examples"]),
                "pool_examples_used": len(plan["pool_indices"]), "pool_size_at_prompt": plan["pool_size"]}  # fmt: skip

    async def after(self, row: dict, outcome) -> dict:
        question, q_outcome = clean_question(outcome.text if outcome.status == "ok" else None)
        fields = {"question": question, "question_outcome": q_outcome if outcome.status == "ok" else "teacher_error",
                  "accepted_in_pool": None, "max_rouge_l": None}  # fmt: skip
        if question and (outcome.finish_reason != "length" or question.endswith("?")):
            decision = await self.pool.offer.remote(row["note_id"], row["task"], question)
            fields.update(accepted_in_pool=decision["accepted"], max_rouge_l=decision["rouge_l"])
        return fields


def _rejected(accepted) -> bool:
    """The pool turned the question down (False), as opposed to accepted (True) or never offered (None/NaN)."""
    return accepted is not None and not pd.isna(accepted) and not bool(accepted)


def _question_notes(cfg: Config, run: RunDir) -> pd.DataFrame:
    notes = _read_table(run, "notes")
    if len(notes):
        wanted = cfg.questions.note_sources
        notes = notes[notes.source.isin(wanted)] if wanted else notes[~notes.source.isin(cfg.synthesize.case_report_sources)]
    synthetic = _read_table(run, "synthetic_notes")
    if cfg.questions.note_sources and len(synthetic):
        synthetic = synthetic[synthetic.source.isin(cfg.questions.note_sources)]
    frames = [f[["note_id", "source", "text", "text_sha1"]] for f in (notes, synthetic) if len(f)]
    return pd.concat(frames, ignore_index=True).sort_values("note_id") if frames else pd.DataFrame(columns=["note_id", "source", "text", "text_sha1"])


def run_questions_stage(cfg: Config, run: RunDir, get_teacher: TeacherGetter, force: bool = False) -> dict:
    qc = cfg.questions
    config_hash = _stage_hash(cfg, "questions", "split", "synthesize")
    inputs = _upstream(run, "notes", "synthesize")
    if (done := run.skip_if_complete("questions", config_hash, inputs, force)) is not None:
        return done
    started = time.time()
    notes = _question_notes(cfg, run)
    counts: Counter = Counter(read=len(notes))
    held_out = notes.note_id.map(lambda n: is_eval_note(n, cfg.split.eval_fraction, cfg.split.seed)) if len(notes) else pd.Series(dtype=bool)
    eval_notes = notes[held_out] if len(notes) else notes
    _write_table(run, "eval_notes", eval_notes)
    counts["held_out_for_eval"] = len(eval_notes)
    notes = notes[~held_out] if len(notes) else notes
    if qc.limit is not None:
        counts["not_selected_over_limit"] = max(0, len(notes) - qc.limit)
        notes = notes.head(qc.limit)
    tasks = [t.task for t in qc.tasks]
    teacher = get_teacher() if len(notes) else None
    rows = []
    if teacher is not None:
        check_privacy(teacher, _source_kinds(cfg, set(notes.source)))
        counter = token_counter(teacher)
        # Room for the prompt: the context minus the reply, minus an allowance for the pool's examples (they are
        # chosen when the request is sent).
        budget = qc.context_tokens - qc.max_tokens - 160
        for r in notes.itertuples():
            task = tasks[task_for(r.note_id, cfg.seed, len(tasks))]
            seeds = next(t.seed_questions for t in qc.tasks if t.task == task)[: qc.seed_examples]
            render = functools.partial(lambda n, t, s: question_prompt(qc.prompt, t, n, s), t=task, s=seeds)
            fitted, truncated = _fit(counter, render, r.text, budget, qc.on_too_long)
            if fitted is None:
                counts["dropped:too_long"] += 1
                continue
            counts["note_truncated"] += truncated
            rows.append({
                "note_id": r.note_id, "source": r.source, "note_sha1": r.text_sha1, "task": task, "note": fitted,
                "note_truncated": truncated, "messages": user_messages(render(fitted)),  # an estimate; rebuilt when sent
                "max_tokens": qc.max_tokens, "temperature": qc.temperature, "sample_index": r.note_id,
                "seed": _request_seed(cfg, "questions", r.note_id),
            })  # fmt: skip
    directory = ledger_dir(cfg, run, "questions")
    out, pool_stats = pd.DataFrame(), {}
    if rows:
        pool_name = f"asclepius-question-pool-{hashlib.sha256(directory.encode()).hexdigest()[:12]}"
        pool = QuestionPoolActor.options(name=pool_name, namespace="asclepius", get_if_exists=True).remote(
            tasks={t.task: t.seed_questions for t in qc.tasks}, threshold=qc.similarity_threshold,
            seed_examples=qc.seed_examples, pool_examples=qc.pool_examples, seed=cfg.seed, journal_dir=directory + "_pool",
        )  # fmt: skip
        try:
            hooks = functools.partial(QuestionHooks, pool_name=pool_name, template=qc.prompt)
            out = _ask(teacher, "questions", pd.DataFrame(rows), directory, hooks=hooks)
            pool_stats = ray.get(pool.stats.remote())
        finally:
            ray.kill(pool)
    kept = []
    for r in out.itertuples() if len(out) else []:
        if r.status != "ok":
            counts["dropped:teacher_error"] += 1
        elif r.finish_reason == "content_filter":
            counts["dropped:content_filter"] += 1
        elif r.question is None:
            counts["dropped:empty_reply"] += 1
        elif r.finish_reason == "length" and not r.question.endswith("?"):
            counts["dropped:cut_off"] += 1  # the reply stopped before its question was complete
        elif _rejected(r.accepted_in_pool) and qc.drop_similar:
            counts["dropped:too_similar"] += 1
        else:
            counts["multiple_questions_kept_first"] += r.question_outcome == "multiple"
            counts["cut_off_after_a_complete_question"] += r.finish_reason == "length"
            counts["too_similar_kept"] += _rejected(r.accepted_in_pool)
            kept.append(r._asdict())
    columns = ["note_id", "source", "note_sha1", "task", "note", "note_truncated", "question", "question_outcome",
               "examples", "pool_examples_used", "pool_size_at_prompt", "accepted_in_pool", "max_rouge_l"]  # fmt: skip
    table = pd.DataFrame(kept)[columns] if kept else pd.DataFrame(columns=columns)
    counts["kept"] = len(table)
    _write_table(run, "questions", table)
    entry = {"status": "complete", "config_hash": config_hash, "inputs": inputs, "counts": dict(counts),
             "tasks": {str(k): int(v) for k, v in table.task.value_counts().items()}, "similarity": pool_stats,
             "teacher": teacher_totals(out), "seconds": round(time.time() - started, 2)}  # fmt: skip
    run.record_stage("questions", entry)
    return entry


# ----------------------------------------------------------------------------------------------- answers
def run_answers_stage(cfg: Config, run: RunDir, get_teacher: TeacherGetter, force: bool = False) -> dict:
    ac = cfg.answers
    config_hash = _stage_hash(cfg, "answers")
    inputs = _upstream(run, "questions")
    if (done := run.skip_if_complete("answers", config_hash, inputs, force)) is not None:
        return done
    started = time.time()
    questions = _read_table(run, "questions")
    counts: Counter = Counter(read=len(questions))
    teacher = get_teacher() if len(questions) else None
    rows = []
    if teacher is not None:
        check_privacy(teacher, _source_kinds(cfg, set(questions.source)))
        counter = token_counter(teacher)
        for r in questions.itertuples():
            render = functools.partial(lambda n, q: answer_prompt(ac.prompt, n, q), q=r.question)
            fitted, truncated = _fit(counter, render, r.note, ac.context_tokens - ac.max_tokens, ac.on_too_long)
            if fitted is None:
                counts["dropped:too_long"] += 1
                continue
            counts["note_truncated"] += truncated
            rows.append({
                "note_id": r.note_id, "source": r.source, "note_sha1": r.note_sha1, "task": r.task, "note": fitted,
                "question": r.question, "messages": user_messages(render(fitted)), "max_tokens": ac.max_tokens,
                "temperature": ac.temperature, "sample_index": r.note_id, "seed": _request_seed(cfg, "answers", r.note_id),
            })  # fmt: skip
    out = _ask(teacher, "answers", pd.DataFrame(rows), ledger_dir(cfg, run, "answers")) if rows else pd.DataFrame()
    regex = compile_filter(ac.filter_regex)
    kept = []
    for r in out.itertuples() if len(out) else []:
        answer = (r.response or "").strip() if r.status == "ok" else ""
        if r.status != "ok":
            counts["dropped:teacher_error"] += 1
        elif r.finish_reason == "content_filter":
            counts["dropped:content_filter"] += 1
        elif not answer:
            counts["dropped:empty_reply"] += 1
        elif r.finish_reason == "length" and not ac.keep_cut_off:
            counts["dropped:cut_off"] += 1
        else:
            reason = instruction_drop_reason(r.note, r.question, answer, regex, ac.drop_if_answer_endswith)
            if reason:
                counts[f"filtered:{reason}"] += 1
                continue
            counts["cut_off_kept"] += r.finish_reason == "length"
            kept.append({"note": r.note, "question": r.question, "answer": answer, "task": r.task, "note_id": r.note_id,
                         "source": r.source, "note_sha1": r.note_sha1})  # fmt: skip
    table = pd.DataFrame(kept, columns=INSTRUCTION_COLUMNS + ["note_sha1"])
    entry = _publish_instructions(cfg, run, table, counts, config_hash, inputs, started, export_json=ac.export_recipe_json)
    entry["teacher"] = teacher_totals(out)
    run.record_stage("answers", entry)
    return entry


def _publish_instructions(cfg: Config, run: RunDir, table: pd.DataFrame, counts: Counter, config_hash: str, inputs: dict,
                          started: float, export_json: bool) -> dict:
    counts["kept"] = len(table)
    decontamination = check_decontamination(run, table)
    _write_table(run, "instructions", table)
    if export_json:  # the recipe's own format, for existing training scripts: a JSON list of {note, question, answer}
        run.fs.create_dir(run.path("export"), recursive=True)
        with run.fs.open_output_stream(run.path("export", "instructions.json")) as f:
            f.write(json.dumps(table[["note", "question", "answer"]].to_dict(orient="records"), ensure_ascii=False, indent=1).encode())
    return {"status": "complete", "config_hash": config_hash, "inputs": inputs, "counts": dict(counts),
            "tasks": {str(k): int(v) for k, v in table.task.value_counts().items()}, "decontamination": decontamination,
            "seconds": round(time.time() - started, 2)}  # fmt: skip


class ContaminationError(RuntimeError):
    pass


def check_decontamination(run: RunDir, instructions: pd.DataFrame) -> dict:
    """No held-out evaluation note (by id or by the hash of its text) may be in the instruction data."""
    eval_notes = _read_table(run, "eval_notes")
    if eval_notes.empty or instructions.empty:
        return {"eval_notes": int(len(eval_notes)), "overlap_ids": 0, "overlap_text": 0, "clean": True}
    ids = set(eval_notes.note_id) & set(instructions.note_id)
    hashes = set(eval_notes.text_sha1) & set(instructions.get("note_sha1", pd.Series(dtype=str)).dropna())
    result = {"eval_notes": int(len(eval_notes)), "overlap_ids": len(ids), "overlap_text": len(hashes), "clean": not ids and not hashes}
    if not result["clean"]:
        raise ContaminationError(f"instruction data contains {len(ids)} held-out note ids and {len(hashes)} held-out note texts")
    return result


# ----------------------------------------------------------------------------------------------- import
def run_import_stage(cfg: Config, run: RunDir, force: bool = False) -> dict:
    """Released instruction data → the same `instructions` table (no teacher)."""
    ic = cfg.instructions_import
    config_hash = cfg.stage_hash("instructions_import")
    inputs = _upstream(run, "notes")
    if (done := run.skip_if_complete("answers", config_hash, inputs, force)) is not None:
        return done
    started = time.time()
    counts: Counter = Counter()
    if ic.kind == "asclepius_r":
        released = pd.read_csv(ic.path, dtype={"ROW_ID": "Int64"}, keep_default_na=False)
        missing = [c for c in ("ROW_ID", "Question", "Answer", "Task") if c not in released.columns]
        if missing:
            raise ValueError(f"instructions_import.path: {ic.path} lacks column(s) {missing}")
        counts["read"] = len(released)
        notes = _read_table(run, "notes")
        notes = notes[notes.source == ic.notes_source] if len(notes) else notes
        released["note_id"] = ic.notes_source + "-" + released.ROW_ID.astype(str)
        joined = released.merge(notes[["note_id", "text", "text_sha1", "source"]] if len(notes) else pd.DataFrame(columns=["note_id", "text", "text_sha1", "source"]),
                                on="note_id", how="left")  # fmt: skip
        no_note = joined.text.isna()
        counts["dropped:no_note_for_row_id"] = int(no_note.sum())
        if no_note.any():
            log.warning("import: %d rows have a ROW_ID with no note in the notes table (first ids: %s)", int(no_note.sum()),
                        joined.loc[no_note, "ROW_ID"].head(5).tolist())  # fmt: skip
        joined = joined[~no_note]
        table = pd.DataFrame({"note": joined.text, "question": joined.Question, "answer": joined.Answer, "task": joined.Task,
                              "note_id": joined.note_id, "source": joined.source, "note_sha1": joined.text_sha1})  # fmt: skip
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
                              "source": "asclepius_synthetic",
                              "note_sha1": released.note.map(lambda t: hashlib.sha1(str(t).encode()).hexdigest())})  # fmt: skip
    entry = _publish_instructions(cfg, run, table.reset_index(drop=True), counts, config_hash, inputs, started, export_json=True)
    entry["imported_from"] = {"kind": ic.kind, "path": ic.path}
    run.record_stage("answers", entry)
    return entry


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
