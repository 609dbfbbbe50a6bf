"""What a run will ask its teacher (and judge) before anything is spent: per stage the requests, prompt and
completion tokens, dollars online and through the Batch API, and the time the configured quota needs.

The notes come from the run directory if its notes stage is complete, else from the configured sources read
here without Ray (the bundled samples, or your files), or — for a preset whose data is not on this machine — from
stated assumptions (`assume_notes`, `assume_note_tokens`). Counts follow each stage's own rules: case reports and
their limit for synthesis, the split's held-out share, one question and one answer per remaining note (the
synthetic notes counted at their maximum length), the evaluation's candidates and judge (twice with
reverse_order). Completion tokens are the most each request may use (max_tokens), as providers reserve them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import pandas as pd

from asclepius.config import Config, TeacherConfig
from asclepius.generate.prompts import is_eval_note
from asclepius.recipe import load_recipe
from asclepius.teacher.batch import BATCH_DISCOUNT
from asclepius.teacher.client import is_self_hosted, token_counter
from asclepius.teacher.cost import cost_usd, price_for


@dataclass
class StageEstimate:
    stage: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    usd_online: float
    usd_batch: float | None  # None: the endpoint has no Batch API (self-hosted)
    minutes_at_quota: float

    def row(self) -> dict:
        return asdict(self)


def _price(t: TeacherConfig) -> tuple[float, float]:
    return price_for(t.model, {k: (p.prompt_per_1m, p.completion_per_1m) for k, p in t.prices.items()}, is_self_hosted(t))


def _stage(stage: str, t: TeacherConfig, prompts: list[int], completions: list[int]) -> StageEstimate:
    prompt, completion = sum(prompts), sum(completions)
    price = _price(t)
    online = cost_usd(prompt, completion, price)
    batch = online * BATCH_DISCOUNT if t.provider in ("openai", "azure") else None
    minutes = max(len(prompts) / t.requests_per_minute, (prompt + completion) / t.tokens_per_minute) * t.window_s / 60
    return StageEstimate(stage, t.model, len(prompts), prompt, completion, round(online, 4), None if batch is None else round(batch, 4), round(minutes, 1))


def input_notes(cfg: Config, run_notes: pd.DataFrame | None = None, assume_notes: int | None = None,
                assume_note_tokens: int | None = None) -> pd.DataFrame:  # fmt: skip
    """(note_id, source, text) of the configured sources: the run's notes, the sources read here, or assumptions."""
    if assume_notes:
        words = "Pt admitted with CHF exacerbation, diuresed, discharged home on lasix. "
        text = (words * ((assume_note_tokens or 1500) * 4 // len(words) + 1))[: (assume_note_tokens or 1500) * 4]
        case = cfg.synthesize.case_report_sources[0] if cfg.synthesize.case_report_sources else "pmc"
        discharge = [s.source_name for s in cfg.notes.sources if s.source_name not in cfg.synthesize.case_report_sources]
        source = discharge[0] if discharge else case
        return pd.DataFrame({"note_id": [f"{source}-{i}" for i in range(assume_notes)], "source": source, "text": text})
    if run_notes is not None:
        return run_notes[["note_id", "source", "text"]]
    from asclepius.notes.readers import read_source_locally

    frames = []
    for i, source in enumerate(cfg.notes.sources):
        kept, *_ = read_source_locally(source, cfg.notes, i)
        frames.append(kept.select(["note_id", "source", "text"]).to_pandas())
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["note_id", "source", "text"])


def estimate_run(cfg: Config, notes: pd.DataFrame, teacher: TeacherConfig | None = None) -> list[StageEstimate]:
    teacher = teacher or cfg.teacher
    if teacher is None:
        return []
    count = token_counter(teacher)
    tok = count.count_text
    out: list[StageEstimate] = []
    msg = 6  # chat formatting per message + reply (OpenAI's cookbook)
    sc, qc, ac = cfg.synthesize, cfg.questions, cfg.answers

    reports = notes[notes.source.isin(sc.case_report_sources)].sort_values("note_id")
    others = notes[~notes.source.isin(sc.case_report_sources)]
    synthetic_tokens = 0
    if cfg.instructions_import is None:
        if sc.limit is not None:
            reports = reports.head(sc.limit)
        prompts = [min(tok(sc.prompt.format(pmc=t)) + msg, sc.context_tokens - sc.min_completion_tokens) for t in reports.text]
        completions = [min(sc.context_tokens - p, sc.max_tokens_cap or sc.context_tokens) for p in prompts]
        out.append(_stage("synthesize", teacher, prompts, completions))
        synthetic_tokens = sum(completions)
        n_synthetic = len(prompts)
    else:
        n_synthetic = 0
    held = others.note_id.map(lambda n: is_eval_note(n, cfg.split.eval_fraction, cfg.split.seed)).astype(bool)
    train_notes = others[~held]
    held_out = others[held]
    synth_per = synthetic_tokens // n_synthetic if n_synthetic else 0
    synth_kept = n_synthetic - round(n_synthetic * cfg.split.eval_fraction)
    seeds = [q for task in qc.tasks for q in task.seed_questions]
    example_tokens = (qc.seed_examples + qc.pool_examples) * (sum(tok(q) for q in seeds) / max(1, len(seeds)))
    question_tokens = qc.max_tokens
    if cfg.instructions_import is None:
        lengths = [tok(t) for t in train_notes.text] + [synth_per] * synth_kept
        if qc.limit is not None:
            lengths = lengths[: qc.limit]
        q_base = tok(qc.prompt.format(task="Named Entity Recognition", note="", samples=""))
        prompts = [min(q_base + n + example_tokens, qc.context_tokens - qc.max_tokens) + msg for n in lengths]
        out.append(_stage("questions", teacher, [int(p) for p in prompts], [qc.max_tokens] * len(prompts)))
        a_base = tok(ac.prompt.format(note="", question=""))
        prompts = [min(a_base + n + question_tokens, ac.context_tokens - ac.max_tokens) + msg for n in lengths]
        out.append(_stage("answers", teacher, [int(p) for p in prompts], [ac.max_tokens] * len(prompts)))
    ev = cfg.evaluate
    if ev is not None:
        held_lengths = [tok(t) for t in held_out.text] + [synth_per] * (n_synthetic - synth_kept)
        if ev.limit is not None:
            held_lengths = held_lengths[: ev.limit]
        if ev.dataset is None:
            q_base = tok(qc.prompt.format(task="Summarization", note="", samples=""))
            prompts = [int(min(q_base + n + example_tokens, qc.context_tokens - qc.max_tokens) + msg) for n in held_lengths]
            out.append(_stage("eval_questions", teacher, prompts, [qc.max_tokens] * len(prompts)))
        recipe = load_recipe()
        max_answer = int(recipe.generation_for_eval["max_new_tokens"])
        model_base = tok(recipe.model_prompt.format(note="", question=""))
        for c in ev.candidates:
            if c.column is not None or c.served:
                continue  # answers in the file, or our own served model: nothing to pay
            endpoint = teacher if c.teacher else c.endpoint
            answer = c.max_tokens or max_answer
            prompts = [model_base + n + question_tokens + msg for n in held_lengths]
            out.append(_stage(f"evaluate: {c.name}", endpoint, prompts, [answer] * len(prompts)))
        judge = ev.judge.endpoint or teacher
        answers = sum(c.max_tokens or max_answer for c in ev.candidates)
        j_base = tok(ev.judge.prompt.format(note="", question="", answers="", num_samples=len(ev.candidates)))
        times = 2 if ev.reverse_order and len(ev.candidates) > 1 else 1
        prompts = [j_base + n + question_tokens + answers + msg for n in held_lengths for _ in range(times)]
        out.append(_stage("evaluate: judge", judge, prompts, [ev.judge.max_tokens] * len(prompts)))
    return out


def format_table(rows: list[StageEstimate], teacher: TeacherConfig | None) -> str:
    if not rows:
        return "no teacher requests (no teacher configured)"
    header = f"{'stage':<22}{'model':<26}{'requests':>9}{'prompt tok':>12}{'compl. tok':>12}{'$ online':>11}{'$ batch':>10}{'minutes':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        batch = f"{r.usd_batch:,.2f}" if r.usd_batch is not None else "–"
        lines.append(f"{r.stage:<22}{r.model[:25]:<26}{r.requests:>9,}{r.prompt_tokens:>12,}{r.completion_tokens:>12,}{r.usd_online:>11,.2f}{batch:>10}"
                     f"{r.minutes_at_quota:>9,.1f}")  # fmt: skip
    total_online = sum(r.usd_online for r in rows)
    total_batch = sum(r.usd_batch if r.usd_batch is not None else r.usd_online for r in rows)
    minutes = sum(r.minutes_at_quota for r in rows)
    lines.append("-" * len(header))
    lines.append(f"{'total':<48}{sum(r.requests for r in rows):>9,}{sum(r.prompt_tokens for r in rows):>12,}"
                 f"{sum(r.completion_tokens for r in rows):>12,}{total_online:>11,.2f}{total_batch:>10,.2f}{minutes:>9,.1f}")  # fmt: skip
    if teacher is not None:
        lines.append(f"(at {teacher.requests_per_minute:,.0f} requests/min and {teacher.tokens_per_minute:,.0f} tokens/min; completion tokens "
                     f"are max_tokens, as providers reserve them; batch results come within 24 h, whatever the quota)")  # fmt: skip
    return "\n".join(lines)


def time_at_quota_hours(rows: list[StageEstimate]) -> float:
    return math.fsum(r.minutes_at_quota for r in rows) / 60
