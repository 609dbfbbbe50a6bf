"""Stage 8, evaluate: candidates answer the evaluation set, the recipe's LLM judge scores them, a report is written.

1. **Items**: the held-out notes' questions (`eval_questions` stage) or a user's file (asclepius.evaluate.dataset).
   No item's note may have reached this run's training data (instructions or pretraining notes): checked by id
   and text hash, and the stage stops on any overlap.
2. **Answers**: every candidate is an OpenAI-compatible endpoint reached through the teacher client (rate limits,
   ledger, cost, privacy guard): our own served models through `/v1/answer` (the recipe's model prompt, applied
   by the server), any other model through chat completions with the recipe's model prompt as the user message.
   Or the answers come with the dataset (`column`). A failed request is recorded as a missing answer for that
   model and item: it is never judged and never scored.
3. **Judge**: the recipe's prompt, the available answers as Agent A, B, ... in a seeded order per item,
   temperature 0; with `reverse_order` (default) each item is judged a second time in the reverse order and an
   item's score is the mean of both. A reply that is not exactly one integer 1-4 per answer is re-asked (up to
   `judge.max_reasks` times, the bad reply shown back with the rule restated); still unreadable, the judgement is
   unscored: counted, and left out of every mean.
4. **Report**: `<run>/eval/scores.parquet` (item, task, model, order, score, judge request key),
   `report.md`, `per_task.png`, `scores.png`, `summary.json`.

Every request is journaled in `<run>/ledger/evaluate/...`: a rerun after a kill pays for nothing twice.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import posixpath
import tempfile
import time
from collections import Counter
from pathlib import Path

import pandas as pd

from asclepius.config import CandidateConfig, Config, TeacherConfig, recipe_departures
from asclepius.decontamination import check_not_trained_on
from asclepius.evaluate import report as reporting
from asclepius.evaluate.report import is_gpt4_class, signal_lines
from asclepius.evaluate.dataset import EvalDatasetError, items_from_file, items_from_run
from asclepius.evaluate.judge import LABELS, agent_order, judge_prompt, parse_scores, repair_message
from asclepius.recipe import load_recipe
from asclepius.run import Stage, StageRun, file_fingerprint, stable_fraction
from asclepius.storage import uri_join
from asclepius.teacher.client import endpoint_id, token_counter
from asclepius.teacher.ray_data import (
    ask_rows,
    guard_privacy,
    ledger_dir,
    spent_so_far,
    teacher_identity,
    teacher_totals,
    user_messages,
)

log = logging.getLogger("asclepius.evaluate")
ORDERS = ("forward", "reversed")


# ----------------------------------------------------------------------------------------------- endpoints
def served_endpoint(cfg: Config, base_url: str, model: str) -> TeacherConfig:
    """One of this run's served models, as the teacher client reaches it (with the app's own key, if any)."""
    key = {"api_key_env": cfg.serve.api_key_env, "api_key_file": cfg.serve.api_key_file} if cfg.serve else {}
    return TeacherConfig(provider="openai_compatible", base_url=base_url, model=model, requests_per_minute=100000,
                         tokens_per_minute=10**9, num_actors=1, concurrency_per_actor=16, timeout_s=600, max_attempts=3,
                         **{k: v for k, v in key.items() if v} or {"api_key_env": None})  # fmt: skip


def candidate_endpoint(c: CandidateConfig, ctx: StageRun) -> TeacherConfig:
    if c.teacher:
        return ctx.teacher()
    if c.served:
        return served_endpoint(ctx.cfg, ctx.extra["served_url"](), c.served)
    return c.endpoint


def judge_endpoint(ctx: StageRun) -> TeacherConfig:
    judge = ctx.cfg.evaluate.judge
    return judge.endpoint if judge.endpoint is not None else ctx.teacher()


def judge_identity(cfg: Config) -> dict:
    """What decides the scores besides the answers: the judge model, and the candidates' endpoints and models."""
    ec = cfg.evaluate

    def ident(t: TeacherConfig | None) -> str:
        return f"{endpoint_id(t)}|{t.model}" if t else "-"

    return {
        "judge": ident(ec.judge.endpoint) if ec.judge.endpoint else teacher_identity(cfg),
        "teacher": teacher_identity(cfg),
        "candidates": [ident(c.endpoint) if c.endpoint else (c.served or c.column or "teacher") for c in ec.candidates],
    }


# ----------------------------------------------------------------------------------------------- answers
def answer_requests(cfg: Config, items: pd.DataFrame, c: CandidateConfig) -> pd.DataFrame:
    """The candidate's requests, one per item. Served models: /v1/answer. Others: the recipe's model prompt."""
    recipe = load_recipe()
    generation = recipe.generation_for_eval
    temperature = float(generation["temperature"]) if c.generation == "recipe" else 0.0
    max_tokens = c.max_tokens or int(generation["max_new_tokens"])
    rows = []
    for r in items.itertuples():
        note, question = r.note.strip("\n"), r.question.strip("\n")
        row = {"item_id": r.item_id, "max_tokens": max_tokens, "temperature": temperature, "sample_index": r.item_id,
               "seed": int(stable_fraction(cfg.seed, f"evaluate:{c.name}:{r.item_id}") * 2**31)}  # fmt: skip
        if c.api == "answer":
            row["messages"] = "[]"
            # the recipe's evaluation settings: no stop sequences, no repetition cut (/v1/answer's defaults for people)
            row["answer_request"] = json.dumps({"note": note, "question": question, "stop": [], "cut_repetition": False}, ensure_ascii=False)
        else:
            row["messages"] = user_messages(recipe.model_prompt.format(note=note, question=question))
        rows.append(row)
    return pd.DataFrame(rows)


def collect_answers(ctx: StageRun, items: pd.DataFrame, answer_columns: dict) -> tuple[dict, dict, dict]:
    """{model: {item_id: answer}}, {model: {item_id: error}}, {who: cost totals}."""
    cfg = ctx.cfg
    answers: dict[str, dict] = {}
    errors: dict[str, dict] = {}
    costs: dict[str, dict] = {}
    for c in cfg.evaluate.candidates:
        if c.column is not None:
            column = f"answer:{c.column}"
            if column not in items:
                raise EvalDatasetError(f"evaluate.candidates: {c.name} reads column {c.column}_answer, which the dataset lacks "
                                       f"(answer columns: {sorted(answer_columns)})")  # fmt: skip
            answers[c.name] = {i: a for i, a in zip(items.item_id, items[column]) if isinstance(a, str) and a.strip()}
            errors[c.name] = {i: "no answer in the dataset" for i in items.item_id if i not in answers[c.name]}
            continue
        endpoint = candidate_endpoint(c, ctx)
        guard_privacy(endpoint, items)
        out = ask_rows(endpoint, f"evaluate-{c.name}", answer_requests(cfg, items, c), ledger_dir(cfg, ctx.run, f"evaluate/{c.name}"),
                       spent_usd=spent_so_far(ctx.run, exclude=ctx.stage.name) + sum(v.get("cost_usd_this_run", 0) for v in costs.values()))  # fmt: skip
        answers[c.name], errors[c.name] = {}, {}
        for r in out.itertuples():
            text = (r.response or "").strip() if r.status == "ok" else ""
            if r.status != "ok":
                errors[c.name][r.item_id] = r.error or "error"
            elif r.finish_reason == "content_filter" or not text:
                errors[c.name][r.item_id] = r.finish_reason or "empty answer"
            else:
                answers[c.name][r.item_id] = text
        costs[f"candidate {c.name}"] = teacher_totals(out)
        if errors[c.name]:
            log.warning("evaluate: %s has no answer for %d of %d items (%s)", c.name, len(errors[c.name]), len(items),
                        dict(Counter(errors[c.name].values())))  # fmt: skip
    return answers, errors, costs


# ----------------------------------------------------------------------------------------------- judge
def judge_requests(cfg: Config, items: pd.DataFrame, answers: dict) -> pd.DataFrame:
    ec = cfg.evaluate
    names = [c.name for c in ec.candidates]
    rows = []
    for r in items.itertuples():
        available = [n for n in names if r.item_id in answers[n]]
        if not available:
            continue
        orders = ORDERS if ec.reverse_order and len(available) > 1 else ORDERS[:1]
        for order_name in orders:
            order = agent_order(cfg.seed, r.item_id, len(available), reverse=order_name == "reversed")
            agents = [available[k] for k in order]
            prompt = judge_prompt(ec.judge.prompt, r.note, r.question, [answers[m][r.item_id] for m in agents])
            rows.append({"item_id": r.item_id, "task": r.task, "order": order_name, "agents": json.dumps(agents),
                         "messages": user_messages(prompt), "max_tokens": ec.judge.max_tokens, "temperature": 0.0,
                         "sample_index": f"{r.item_id}:{order_name}", "extra_body": guided(ec, len(agents))})  # fmt: skip
    return pd.DataFrame(rows)


def guided(ec, n: int) -> str | None:
    """vLLM's guided_choice: every valid first line ("1 1" ... "4 4"), so a small judge can only answer in form."""
    if not ec.judge.guided_choice or n > 4:
        return None
    return json.dumps({"guided_choice": [" ".join(map(str, c)) for c in itertools.product(range(1, 5), repeat=n)]})


def run_judge(ctx: StageRun, judge: TeacherConfig, rows: pd.DataFrame) -> tuple[pd.DataFrame, Counter, list[dict]]:
    """Judge every row; re-ask the unreadable ones. Returns (final rows with `scores`, counts, costs per round)."""
    ec = ctx.cfg.evaluate
    directory = ledger_dir(ctx.cfg, ctx.run, "evaluate/judge")
    counts: Counter = Counter()
    final, pending, rounds = [], rows, []
    for attempt in range(ec.judge.max_reasks + 1):
        if pending.empty:
            break
        out = ask_rows(judge, "evaluate-judge", pending, directory, spent_usd=spent_so_far(ctx.run, exclude=ctx.stage.name))
        rounds.append(teacher_totals(out))
        retry = []
        for r in out.to_dict(orient="records"):
            n = len(json.loads(r["agents"]))
            parsed = parse_scores(r["response"], n) if r["status"] == "ok" else None
            if parsed is not None and parsed.scores is not None:
                final.append({**r, "scores": parsed.scores, "parse_error": None, "reasks": attempt})
                continue
            error = parsed.error if parsed is not None else f"judge request failed ({r['error']})"
            if attempt < ec.judge.max_reasks and r["status"] == "ok":
                # the bad reply shown back, the rule restated: a new prompt (a new ledger key), still temperature 0
                messages = json.loads(r["messages"]) + [{"role": "assistant", "content": r["response"] or ""},
                                                         {"role": "user", "content": repair_message(n)}]  # fmt: skip
                retry.append({k: r[k] for k in rows.columns} | {"messages": json.dumps(messages, ensure_ascii=False),
                                                                 "sample_index": f"{r['sample_index']}:reask{attempt + 1}"})  # fmt: skip
                counts["reasked"] += 1
            else:
                final.append({**r, "scores": None, "parse_error": error, "reasks": attempt})
                counts["unscored"] += 1
                counts[f"unscored:{error.split(' (')[0]}"] += 1
        pending = pd.DataFrame(retry, columns=rows.columns)
    return pd.DataFrame(final), counts, rounds


def scores_table(judged: pd.DataFrame, items: pd.DataFrame, names: list[str], errors: dict) -> pd.DataFrame:
    rows = []
    for r in judged.itertuples():
        for k, model in enumerate(json.loads(r.agents)):
            rows.append({"item_id": r.item_id, "task": r.task, "model": model, "order": r.order, "agent": LABELS[k],
                         "score": float(r.scores[k]) if r.scores is not None else None,
                         "judge_request_key": r.request_key, "parse_error": r.parse_error})  # fmt: skip
    task_of = dict(zip(items.item_id, items.task))
    for model in names:  # missing answers: a row that says so, never a score
        for item_id, error in errors.get(model, {}).items():
            rows.append({"item_id": item_id, "task": task_of[item_id], "model": model, "order": "no answer", "agent": None,
                         "score": None, "judge_request_key": None, "parse_error": f"no answer: {error}"})  # fmt: skip
    columns = ["item_id", "task", "model", "order", "agent", "score", "judge_request_key", "parse_error"]
    return pd.DataFrame(rows, columns=columns).astype({"score": "float64"})


# ----------------------------------------------------------------------------------------------- the stage
def load_items(ctx: StageRun) -> tuple[pd.DataFrame, dict, dict, str]:
    ec = ctx.cfg.evaluate
    if ec.dataset is not None:
        items, answer_columns, dropped = items_from_file(ec.dataset.path, ec.dataset.credentialed)
        described = f"`{ec.dataset.path}`"
    else:
        items, answer_columns, dropped = items_from_run(ctx.run), {}, {}
        described = "this run's held-out notes (one question each, made by the questions stage's prompt)"
    if ec.limit is not None:
        dropped["over_limit"] = max(0, len(items) - ec.limit)
        items = items.sort_values("item_id").head(ec.limit).reset_index(drop=True)
    if items.empty:
        raise EvalDatasetError("evaluate: no evaluation items — set evaluate.dataset.path, or run the split and eval_questions "
                               "stages (the default evaluation set is the held-out notes' questions)")  # fmt: skip
    return items, answer_columns, dropped, described


def evaluate(ctx: StageRun) -> dict:
    cfg, ec = ctx.cfg, ctx.cfg.evaluate
    started = time.time()
    items, answer_columns, dropped, described = load_items(ctx)
    decontamination = check_not_trained_on(ctx.run, items, cfg.synthesize.case_report_sources)
    names = [c.name for c in ec.candidates]
    answers, errors, costs = collect_answers(ctx, items, answer_columns)

    judge = judge_endpoint(ctx)
    guard_privacy(judge, items)
    judged, counts, rounds = run_judge(ctx, judge, judge_requests(cfg, items, answers))
    costs["judge"] = {k: sum(r.get(k, 0) for r in rounds) for k in ("requests", "prompt_tokens", "completion_tokens", "cost_usd")}
    scores = scores_table(judged, items, names, errors)

    counter = token_counter(judge)
    lengths = {m: (sum(counter.count_text(a) for a in answers[m].values()) / len(answers[m])) if answers[m] else None for m in names}
    report_counts = {
        "items": len(items), "judgements": len(judged), "unscored": counts["unscored"], "reasked": counts["reasked"],
        "missing_answers": {m: len(errors.get(m, {})) for m in names}, "dropped": {k: v for k, v in dropped.items() if v},
        "unscored_by_model": {m: int(((scores.model == m) & scores.score.isna() & (scores.order != "no answer")).sum()) for m in names},
    }  # fmt: skip
    numbers = reporting.build(scores, lengths, report_counts, costs, judge.model, described, ec.reverse_order, ec.bootstrap_samples, cfg.seed,
                             models=names)
    out = ctx.output("eval")
    ctx.run.write_frame(out, scores, "scores.parquet")
    with tempfile.TemporaryDirectory() as tmp:  # matplotlib writes local files; the run may be in object storage
        reporting.plot_tasks(numbers["tasks"], os.path.join(tmp, "per_task.png"))
        reporting.plot_histogram(numbers["dist"], os.path.join(tmp, "scores.png"))
        for name in ("per_task.png", "scores.png"):
            if os.path.exists(os.path.join(tmp, name)):
                with ctx.run.fs.open_output_stream(posixpath.join(out, name)) as f:
                    f.write(Path(tmp, name).read_bytes())
    text = reporting.markdown(**numbers, departures=recipe_departures(cfg))
    with ctx.run.fs.open_output_stream(posixpath.join(out, "report.md")) as f:
        f.write(text.encode())
    per_model = {r.model: {"mean": _num(r.mean), "ci95": [_num(r.ci_low), _num(r.ci_high)], "scored_items": r.scored_items,
                           "items": r.items, "missing_answers": report_counts["missing_answers"][r.model],
                           "mean_answer_tokens": _num(lengths[r.model])} for r in numbers["models"].itertuples()}  # fmt: skip
    summary = {"models": per_model, "judge": judge.model, "items": len(items), "counts": {k: v for k, v in counts.items()},
               "position_bias": numbers["bias"], "judge_signal": numbers["signal"], "decontamination": decontamination,
               "costs": costs}  # fmt: skip
    with ctx.run.fs.open_output_stream(posixpath.join(out, "summary.json")) as f:
        f.write(json.dumps(summary, indent=1).encode())
    return {**summary, "dataset": described, "report": uri_join(ctx.output_uri("eval"), "report.md"), "seconds": round(time.time() - started, 2)}


def _num(x):
    return None if x is None or pd.isna(x) else round(float(x), 4)


def format_summary(entry: dict) -> str:
    parts = [f"{m} {v['mean'] if v['mean'] is not None else '–'} [{v['ci95'][0]}, {v['ci95'][1]}]" for m, v in entry["models"].items()]
    bias = entry["position_bias"].get("share")
    line = (f"evaluate: {entry['items']} items judged by {entry['judge']}: mean score (95% CI) " + "; ".join(parts)
            + f"\n  unscored {entry['counts'].get('unscored', 0)}, re-asked {entry['counts'].get('reasked', 0)}"
            + (f", position bias {bias:.0%}" if bias is not None else "") + f"; report {entry['report']}")  # fmt: skip
    if not is_gpt4_class(entry["judge"]) and entry.get("judge_signal"):
        lengths = {m: v.get("mean_answer_tokens") for m, v in entry["models"].items()}
        said = signal_lines(entry["judge_signal"], entry["position_bias"], lengths)
        line += "\n  a weak judge's judgements: " + "\n  ".join(said)
    return line


def _dataset_file(cfg: Config):
    ds = cfg.evaluate.dataset
    if ds is None:
        return None
    import pyarrow.fs as pafs

    fs, inner = pafs.FileSystem.from_uri(ds.path) if "://" in ds.path else (pafs.LocalFileSystem(), ds.path)
    return file_fingerprint(fs, inner)


STAGE = Stage(
    name="evaluate",
    work=evaluate,
    sections=("evaluate", "seed"),
    upstream=("split", "answers", "eval_questions", "pretrain", "finetune"),
    outputs=("eval",),
    identity=judge_identity,
    external_inputs=_dataset_file,
    summary=format_summary,
)
