"""The teacher on Ray Data: a dataset of requests in, the same rows with responses out.

Input rows carry `messages` (a JSON list of chat messages), `max_tokens`, and optionally `temperature`, `top_p`,
`seed`, `n` and `sample_index` (part of the request key: the same note asked twice is two requests). A pool of
async actors sends them; every actor shares the cluster's one rate limiter and writes its own ledger part, so
throughput comes from many requests in flight within the limit, and a resubmitted job pays for nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import ray

from asclepius.config import Config, TeacherConfig
from asclepius.run import RunDir, make_private_dir
from asclepius.teacher.client import (
    ActorLimiter,
    ChatRequest,
    TeacherClient,
    check_privacy,
    default_limiter_name,
    endpoint_id,
    is_self_hosted,
    token_counter,
)
from asclepius.teacher.cost import SpendEstimate, check_budget, estimate, price_for
from asclepius.teacher.ledger import Ledger, scan_ledger
from asclepius.teacher.limiter import limiter_actor

log = logging.getLogger("asclepius.teacher")

OUTPUT_COLUMNS = {
    "request_key": pa.string(),
    "status": pa.string(),
    "response": pa.string(),
    "responses_json": pa.string(),
    "finish_reason": pa.string(),
    "prompt_tokens": pa.int64(),
    "completion_tokens": pa.int64(),
    "cost_usd": pa.float64(),
    "http_status": pa.int64(),
    "error": pa.string(),
    "attempts": pa.int64(),
    "cached": pa.bool_(),
}


def _request(row: dict, stage: str, defaults: dict) -> ChatRequest:
    def get(name):
        value = row.get(name)
        return defaults.get(name) if value is None else value

    return ChatRequest(
        messages=json.loads(row["messages"]),
        max_tokens=int(get("max_tokens")),
        temperature=float(get("temperature") if get("temperature") is not None else 1.0),
        top_p=get("top_p"),
        seed=get("seed"),
        n=int(get("n") or 1),
        stage=stage,
        sample_index=row.get("sample_index"),
        answer=json.loads(row["answer_request"]) if row.get("answer_request") else None,
        extra_body=json.loads(row["extra_body"]) if row.get("extra_body") else None,
    )


class TeacherUDF:
    """One Ray Data actor: an async client, its own ledger part, the shared limiter.

    `hooks` (a class, instantiated in the actor) lets a stage build a row's prompt at the moment it is sent and
    act on its answer at once — the questions stage's bootstrapping pool needs both: `await hooks.before(row)`
    returns fields to set (e.g. `messages`), `await hooks.after(row, outcome)` returns fields to add."""

    def __init__(self, cfg: TeacherConfig, stage: str, ledger_dir: str, limiter_name: str, defaults: dict, hooks=None):
        self.cfg = cfg
        self.stage = stage
        self.defaults = defaults
        actor = ray.get_actor(limiter_name, namespace="asclepius")
        self.ledger = Ledger(ledger_dir, writer_id=f"{uuid.uuid4().hex[:12]}")
        self.client = TeacherClient(cfg, ActorLimiter(actor), ledger=self.ledger)
        self.in_flight = asyncio.Semaphore(cfg.concurrency_per_actor)
        self.hooks = hooks() if hooks else None

    async def _one(self, row: dict):
        async with self.in_flight:
            if self.hooks:
                row = {**row, **await self.hooks.before(row)}
            outcome = await self.client.complete(_request(row, self.stage, self.defaults))
            if self.hooks:
                row = {**row, **await self.hooks.after(row, outcome)}
            return row, outcome

    async def __call__(self, batch: pa.Table) -> pa.Table:
        done = await asyncio.gather(*(self._one(r) for r in batch.to_pylist()))
        rows = [r for r, _ in done]
        outcomes = [o for _, o in done]
        out = {
            "request_key": [o.key for o in outcomes],
            "status": [o.status for o in outcomes],
            "response": [o.text for o in outcomes],
            "responses_json": [json.dumps(o.texts) for o in outcomes],
            "finish_reason": [o.finish_reason for o in outcomes],
            "prompt_tokens": [o.prompt_tokens for o in outcomes],
            "completion_tokens": [o.completion_tokens for o in outcomes],
            "cost_usd": [o.cost_usd for o in outcomes],
            "http_status": [o.http_status for o in outcomes],
            "error": [o.error for o in outcomes],
            "attempts": [o.attempts for o in outcomes],
            "cached": [o.cached for o in outcomes],
        }
        # without hooks the rows keep the input's schema (typed even when a column is all null); hooks add columns
        table = pa.Table.from_pylist(rows, schema=None if self.hooks else batch.schema)
        for name, typ in OUTPUT_COLUMNS.items():
            table = table.append_column(pa.field(name, typ), pa.array(out[name], typ))
        return table


def _count_batch(batch: pa.Table, cfg: TeacherConfig, stage: str, defaults: dict, finished: frozenset) -> pa.Table:
    counter = token_counter(cfg)
    endpoint = endpoint_id(cfg)
    prompt, completion, cached = [], [], []
    for row in batch.to_pylist():
        req = _request(row, stage, defaults)
        cached.append(req.key(endpoint, cfg.model) in finished)
        prompt.append(req.prompt_tokens(counter))
        completion.append(req.max_tokens * req.n)
    return pa.table({"prompt": prompt, "completion": completion, "cached": cached})


@dataclass
class Plan:
    estimate: SpendEstimate  # for the requests still to send
    already_done: int
    limiter_name: str
    ledger_dir: str


def plan_requests(ds: ray.data.Dataset, cfg: TeacherConfig, stage: str, ledger_dir: str, defaults: dict | None = None,
                  spent_usd: float = 0.0) -> Plan:
    """Before spending: count requests, tokens and dollars (minus what the ledger already holds), print them,
    and stop if the budget would be exceeded."""
    defaults = defaults or {}
    scan = scan_ledger(ledger_dir)
    counts = ds.map_batches(
        _count_batch, batch_format="pyarrow", fn_kwargs=dict(cfg=cfg, stage=stage, defaults=defaults, finished=frozenset(scan.records))
    ).to_pandas()
    todo = counts[~counts["cached"]]
    price = price_for(cfg.model, {k: (p.prompt_per_1m, p.completion_per_1m) for k, p in cfg.prices.items()}, is_self_hosted(cfg))
    est = estimate(todo["prompt"].tolist(), todo["completion"].tolist(), 1, price)
    log.info("teacher %s: %s; %d already in the ledger", stage, est.line(cfg.model), int(counts["cached"].sum()))
    check_budget(est, cfg.budget_usd, spent_usd)
    name = default_limiter_name(cfg)
    limiter_actor(name, cfg.requests_per_minute, cfg.tokens_per_minute, cfg.rate_safety, window_s=cfg.window_s)
    return Plan(est, int(counts["cached"].sum()), name, ledger_dir)


def run_requests(ds: ray.data.Dataset, cfg: TeacherConfig, stage: str, plan: Plan, defaults: dict | None = None,
                 hooks=None) -> ray.data.Dataset:
    """The rows of `ds` with OUTPUT_COLUMNS added. Lazy: the requests go out as the result is consumed."""
    batch = max(1, cfg.concurrency_per_actor // 2)
    return ds.map_batches(
        TeacherUDF,
        fn_constructor_kwargs=dict(cfg=cfg, stage=stage, ledger_dir=plan.ledger_dir, limiter_name=plan.limiter_name,
                                   defaults=defaults or {}, hooks=hooks),
        batch_size=batch,
        batch_format="pyarrow",
        # A few batches per actor at once keep `concurrency_per_actor` requests in flight despite slow stragglers.
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors, max_tasks_in_flight_per_actor=4, max_concurrent_calls_per_actor=4),
        num_cpus=0.1,  # network-bound: do not hold CPUs the rest of the pipeline needs
    )


class Progress:
    """A driver-side line every few seconds: done/total, tokens/min vs the limit, 429s, retries, spend, ETA."""

    def __init__(self, cfg: TeacherConfig, stage: str, plan: Plan):
        self.cfg, self.stage, self.plan = cfg, stage, plan
        self.actor = ray.get_actor(plan.limiter_name, namespace="asclepius")
        self._stop = threading.Event()
        self._start = None
        self.last: dict = {}

    COUNTERS = ("settled", "rate_limited", "retries", "cost_usd", "prompt_tokens", "completion_tokens")

    def _delta(self) -> dict:
        """The limiter's snapshot, with its counters relative to this stage's start (the limiter is shared)."""
        now = ray.get(self.actor.snapshot.remote())
        return {k: now[k] - self._start.get(k, 0) if k in self.COUNTERS else now[k] for k in now}

    def line(self) -> str:
        d = self._delta()
        self.last = d
        total = self.plan.estimate.requests
        elapsed = max(1e-6, time.time() - self._t0)
        rate = d["settled"] / elapsed
        eta = (total - d["settled"]) / rate if rate > 0 and total > d["settled"] else 0
        return (
            f"teacher {self.stage}: {d['settled']}/{total} requests, {d['tokens_last_60s']:,.0f} of "
            f"{self.cfg.tokens_per_minute * 60 / self.cfg.window_s:,.0f} tokens/min, 429s {d['rate_limited']}, "
            f"retries {d['retries']}, ${d['cost_usd']:.4f} spent, ETA {eta:.0f} s"
        )

    def _loop(self):
        while not self._stop.wait(self.cfg.progress_every_s):
            try:
                log.info("%s", self.line())
            except Exception:  # progress must never break the stage
                pass

    def __enter__(self):
        self._start = ray.get(self.actor.snapshot.remote())
        self._t0 = time.time()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        log.info("%s", self.line())


# ----------------------------------------------------------------------------------------------- for the stages
def user_messages(content: str) -> str:
    """The recipe sent every prompt as one user message; the adapter takes messages as JSON."""
    return json.dumps([{"role": "user", "content": content}], ensure_ascii=False)


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


def guard_privacy(teacher: TeacherConfig, rows: pd.DataFrame) -> None:
    """Every row carries its provenance (`credentialed`); the guard counts those rows, whatever their source's name."""
    credentialed = int(rows["credentialed"].fillna(True).astype(bool).sum()) if "credentialed" in rows else len(rows)
    check_privacy(teacher, credentialed, set(rows["source"]) if "source" in rows else set())


def ask_rows(cfg: TeacherConfig, stage: str, df: pd.DataFrame, directory: str, hooks=None) -> pd.DataFrame:
    """Send the rows' requests (columns messages, max_tokens, sample_index, ...) and return them with answers."""
    if df.empty:
        return df
    ds = ray.data.from_pandas(df)
    plan = plan_requests(ds, cfg, stage, directory)
    with Progress(cfg, stage, plan):
        return run_requests(ds, cfg, stage, plan, hooks=hooks).to_pandas()


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
