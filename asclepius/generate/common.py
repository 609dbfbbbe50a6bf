"""What the generating stages share: the teacher's identity in their hash, sending a table of requests, the reply
cascade that decides whether a reply is usable, and the counts every stage records.

The tables here are small next to the teacher's work (one row per note), so they are shaped with pandas on the
driver; the requests go out from a pool of Ray actors (asclepius.teacher.ray_data).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from typing import Callable

import pandas as pd
import ray

from asclepius.config import Config, TeacherConfig
from asclepius.generate.prompts import fit_note, stable_fraction
from asclepius.run import RunDir, make_private_dir
from asclepius.teacher.client import check_privacy, endpoint_id
from asclepius.teacher.ray_data import Progress, plan_requests, run_requests

log = logging.getLogger("asclepius.generate")
TeacherGetter = Callable[[], TeacherConfig]
INSTRUCTION_COLUMNS = ["note", "question", "answer", "task", "note_id", "source"]


def ledger_dir(cfg: Config, run: RunDir, stage: str) -> str:
    """Where a stage's teacher requests are journaled: kept across attempts, so a rerun never pays twice."""
    if cfg.teacher and cfg.teacher.ledger_dir:
        path = os.path.join(cfg.teacher.ledger_dir, stage)
    elif not run.is_local:
        raise ValueError("the run directory is an object store URI: set teacher.ledger_dir to a shared POSIX path")
    else:
        path = os.path.join(run.root, "ledger", stage)
    make_private_dir(os.path.dirname(path))
    return make_private_dir(path)


def teacher_identity(cfg: Config) -> str:
    """Which model answers (not how fast or how it is reached): another teacher means another stage output."""
    if cfg.teacher_from_serve:
        served = next((m for m in (cfg.serve.models if cfg.serve else []) if m.name == cfg.teacher_from_serve), None)
        return f"served:{cfg.teacher_from_serve}:{served.source if served else '?'}"
    if cfg.teacher is None:
        return "none"
    return f"{endpoint_id(cfg.teacher)}|{cfg.teacher.model}"


def request_seed(cfg: Config, stage: str, note_id: str) -> int:
    """A sampling seed per request (OpenAI, vLLM and our Serve app honour it): reruns ask the same thing."""
    return int(stable_fraction(cfg.seed, f"{stage}:{note_id}") * 2**31)


def fit(counter, render, note: str, budget: int, mode: str):
    """(note fitted to the budget, truncated) — or (None, False) if it does not fit and may not be shortened."""
    fitted = fit_note(note, render, counter, budget)
    if fitted is None or (fitted[1] and mode == "skip"):
        return None, False
    return fitted


def guard_privacy(teacher: TeacherConfig, rows: pd.DataFrame) -> None:
    """Every row carries its provenance (`credentialed`); the guard counts those rows, whatever their source's name."""
    credentialed = int(rows["credentialed"].fillna(True).astype(bool).sum()) if "credentialed" in rows else len(rows)
    check_privacy(teacher, credentialed, set(rows["source"]) if "source" in rows else set())


def ask(cfg: TeacherConfig, stage: str, df: pd.DataFrame, directory: str, hooks=None) -> pd.DataFrame:
    """Send the rows' requests (columns messages, max_tokens, sample_index, ...) and return them with answers."""
    if df.empty:
        return df
    ds = ray.data.from_pandas(df)
    plan = plan_requests(ds, cfg, stage, directory)
    with Progress(cfg, stage, plan):
        return run_requests(ds, cfg, stage, plan, hooks=hooks).to_pandas()


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
