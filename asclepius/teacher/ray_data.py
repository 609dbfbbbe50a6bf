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
import math
import threading
import time
import uuid
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from asclepius.config import Config, TeacherConfig
from asclepius.progress import live_bar
from asclepius.run import RunDir, make_private_dir
from asclepius.storage import ensure_dir, uri_join
from asclepius.teacher.client import (
    ActorLimiter,
    ChatRequest,
    TeacherClient,
    check_batch_privacy,
    check_privacy,
    default_limiter_name,
    is_self_hosted,
    key_identity,
    token_counter,
)
from asclepius.teacher.cost import SpendEstimate, check_budget, cost_usd, price_for
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
    "retryable": pa.bool_(),
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
    """One Ray Data actor: an async client, its own ledger part, the shared limiter (`concurrency` in flight).

    `hooks` (a class, instantiated in the actor) lets a stage build a row's prompt at the moment it is sent and
    act on its answer at once — the questions stage's bootstrapping pool needs both: `await hooks.before(row)`
    returns fields to set (e.g. `messages`), `await hooks.after(row, outcome)` returns fields to add."""

    def __init__(self, cfg: TeacherConfig, stage: str, ledger_dir: str, limiter_name: str, defaults: dict, hooks=None, concurrency: int = 32):
        self.cfg = cfg
        self.stage = stage
        self.defaults = defaults
        actor = ray.get_actor(limiter_name, namespace="asclepius")
        self.ledger = Ledger(ledger_dir, writer_id=f"{uuid.uuid4().hex[:12]}")
        self.client = TeacherClient(cfg, ActorLimiter(actor), ledger=self.ledger)
        self.in_flight = asyncio.Semaphore(concurrency)
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
            "retryable": [o.status != "ok" and o.retryable for o in outcomes],
            "cached": [o.cached for o in outcomes],
        }
        # without hooks the rows keep the input's schema (typed even when a column is all null); hooks add columns
        table = pa.Table.from_pylist(rows, schema=None if self.hooks else batch.schema)
        for name, typ in OUTPUT_COLUMNS.items():
            table = table.append_column(pa.field(name, typ), pa.array(out[name], typ))
        return table


def _count_batch(batch: pa.Table, cfg: TeacherConfig, stage: str, defaults: dict, finished: frozenset) -> pa.Table:
    return pa.table({k: [v] for k, v in count_requests(batch.to_pylist(), cfg, stage, defaults, finished).items()})


def count_requests(rows: list[dict], cfg: TeacherConfig, stage: str, defaults: dict, finished: frozenset) -> dict[str, int]:
    """What the plan needs of some requests, summed: how many, how many the ledger holds (`cached`), and the prompt and
    completion tokens of the others (what is still to pay for)."""
    counter = token_counter(cfg)
    endpoint = key_identity(cfg)
    sums = {"requests": 0, "cached": 0, "prompt": 0, "completion": 0}
    for row in rows:
        req = _request(row, stage, defaults)
        sums["requests"] += 1
        if req.key(endpoint, cfg.model) in finished:
            sums["cached"] += 1
            continue
        sums["prompt"] += req.prompt_tokens(counter)
        sums["completion"] += req.max_tokens * req.n
    return sums


def add_counts(total: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    return {k: total.get(k, 0) + int(more.get(k, 0)) for k in ("requests", "cached", "prompt", "completion")}


@dataclass
class Plan:
    estimate: SpendEstimate  # for the requests still to send
    already_done: int
    limiter_name: str
    ledger_dir: str
    concurrency: int = 32  # requests in flight per actor


def concurrency_for(cfg: TeacherConfig, mean_tokens: float, requests: int) -> int:
    """Requests in flight per actor. `auto`, by Little's law: the quota allows min(RPM, TPM / tokens per request)
    requests a minute; each takes `expected_latency_s`; so that many × latency / 60 must be in flight (with a
    quarter more to cover the spread of latencies), spread over the actors."""
    if cfg.concurrency_per_actor != "auto":
        return int(cfg.concurrency_per_actor)
    per_minute = min(cfg.requests_per_minute, cfg.tokens_per_minute / max(1.0, mean_tokens)) * 60 / cfg.window_s
    in_flight = math.ceil(per_minute / 60 * cfg.expected_latency_s * 1.25)
    return max(1, min(512, math.ceil(min(in_flight, max(1, requests)) / cfg.num_actors)))


def plan_requests(rows: ray.data.Dataset | pd.DataFrame, cfg: TeacherConfig, stage: str, ledger_dir: str, defaults: dict | None = None,
                  spent_usd: float = 0.0) -> Plan:
    """Before spending: count requests, tokens and dollars (minus what the ledger already holds), print them,
    and stop if the budget (pipeline-wide: `spent_usd` were spent by earlier stages) would be exceeded.
    `rows`: a Dataset (counted in Ray Data tasks) or rows already in this process (counted here: ~40 µs a row, less
    than starting the tasks — the plan once took longer than sending 3,000 requests to a fast teacher)."""
    defaults = defaults or {}
    scan = scan_ledger(ledger_dir, compact_parts=True)  # before any actor writes: many small objects become one
    count_args = dict(cfg=cfg, stage=stage, defaults=defaults, finished=frozenset(scan.records))
    if isinstance(rows, pd.DataFrame):
        # through Arrow, as Ray Data hands the rows to the actors (NaN becomes None): the same request keys
        counts = count_requests(pa.Table.from_pandas(rows, preserve_index=False).to_pylist(), **count_args)
    else:
        counts = {}
        parts = rows.map_batches(
            _count_batch, batch_format="pyarrow", fn_kwargs=count_args,
            num_cpus=0.1,  # counting tokens is light; a whole CPU may not be free while the teacher is served here
        ).take_all()  # fmt: skip
        for part in parts:
            counts = add_counts(counts, part)
    return plan_from_counts(counts, scan, cfg, stage, ledger_dir, spent_usd)


def plan_from_counts(counts: dict[str, int], scan, cfg: TeacherConfig, stage: str, ledger_dir: str, spent_usd: float = 0.0) -> Plan:
    """The plan for requests already counted (`count_requests`) against the ledger `scan`: the estimate, the budget
    check, the cluster's limiter, the requests in flight per actor."""
    counts = add_counts({}, counts)
    to_send = counts["requests"] - counts["cached"]
    price = teacher_price(cfg)
    est = SpendEstimate(to_send, counts["prompt"], counts["completion"], cost_usd(counts["prompt"], counts["completion"], price))
    mean_tokens = (counts["prompt"] + counts["completion"]) / to_send if to_send else 1.0
    concurrency = concurrency_for(cfg, mean_tokens, to_send)
    log.info("teacher %s: %s; %d already in the ledger; %d actors × %d in flight", stage, est.line(cfg.model),
             counts["cached"], cfg.num_actors, concurrency)  # fmt: skip
    # paid already: the earlier stages (spent_usd) and what this ledger holds (answered once, never paid again); and
    # the requests in flight at once, which a lost node would send (and the provider bill) a second time
    paid_here = sum(float(r.get("cost_usd") or 0) for r in scan.records.values())
    reserve = est.usd_max / max(1, est.requests) * min(est.requests, cfg.num_actors * concurrency)
    check_budget(est, cfg.budget_usd, spent_usd + paid_here, reserve)
    name = default_limiter_name(cfg)
    limiter_actor(name, cfg.requests_per_minute, cfg.tokens_per_minute, cfg.rate_safety, window_s=cfg.window_s, accounting=cfg.rate_accounting)
    return Plan(est, counts["cached"], name, ledger_dir, concurrency)


def run_requests(ds: ray.data.Dataset, cfg: TeacherConfig, stage: str, plan: Plan, defaults: dict | None = None,
                 hooks=None) -> ray.data.Dataset:
    """The rows of `ds` with OUTPUT_COLUMNS added. Lazy: the requests go out as the result is consumed."""
    batch = max(1, plan.concurrency // 2)
    return ds.map_batches(
        TeacherUDF,
        fn_constructor_kwargs=dict(cfg=cfg, stage=stage, ledger_dir=plan.ledger_dir, limiter_name=plan.limiter_name,
                                   defaults=defaults or {}, hooks=hooks, concurrency=plan.concurrency),
        batch_size=batch,
        batch_format="pyarrow",
        # A few batches per actor at once keep `concurrency_per_actor` requests in flight despite slow stragglers.
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors, max_tasks_in_flight_per_actor=4, max_concurrent_calls_per_actor=4),
        num_cpus=0.1,  # network-bound: do not hold CPUs the rest of the pipeline needs
        **({"resources": dict(cfg.actor_resources)} if cfg.actor_resources else {}),
    )


HEARTBEAT_TICKS = 6  # an unchanged progress line is repeated every 6 intervals (a minute at the default 10 s)


class Progress:
    """A driver-side line every few seconds: done/total, tokens/min vs the limit, 429s, retries, spend, ETA."""

    def __init__(self, cfg: TeacherConfig, stage: str, plan: Plan):
        self.cfg, self.stage, self.plan = cfg, stage, plan
        self.actor = ray.get_actor(plan.limiter_name, namespace="asclepius")
        self._stop = threading.Event()
        self._start = None
        self.last: dict = {}

    COUNTERS = ("finished", "failed", "granted", "rate_limited", "retries", "cost_usd", "prompt_tokens", "completion_tokens")

    def _delta(self) -> dict:
        """The limiter's snapshot, with its counters relative to this stage's start (the limiter is shared)."""
        now = ray.get(self.actor.snapshot.remote())
        return {k: now[k] - self._start.get(k, 0) if k in self.COUNTERS else now[k] for k in now}

    def line(self) -> str:
        """Rows done of the rows to send (a retry is not a row), attempts and retries apart; tokens/min as the
        provider counts them (what is in its window now); the ETA from the rows' rate."""
        d = self._delta()
        self.last = d
        total = self.plan.estimate.requests
        elapsed = max(1e-6, time.time() - self._t0)
        rate = d["finished"] / elapsed
        eta = f"{(total - d['finished']) / rate:.0f} s" if rate > 0 and total > d["finished"] else ("–" if total > d["finished"] else "0 s")
        return (
            f"teacher {self.stage}: {d['finished']}/{total} rows done ({d['failed']} failed), {d['granted']} attempts, "
            f"{d['retries']} retries, {d['tokens_last_60s']:,.0f} of {self.cfg.tokens_per_minute * 60 / self.cfg.window_s:,.0f} "
            f"tokens/min, {d['in_flight']} in flight, 429s {d['rate_limited']}, ${d['cost_usd']:.4f} spent, ETA {eta}"
        )

    def _loop(self):
        bar = live_bar(self.stage, self.plan.estimate.requests)
        every = 1.0 if bar else self.cfg.progress_every_s  # a live bar in a terminal; a line every few seconds otherwise
        shown_state, quiet_ticks = (0, 0, 0, 0), 0  # nothing answered yet: no line until something moves
        while not self._stop.wait(every):
            try:
                line = self.line()
                if bar:
                    bar.update(self.last["finished"], line.split(": ", 1)[1])
                    continue
                # a line when something moved (rows, retries, 429s — not the first sends, which the stage's plan line
                # already said), else one every HEARTBEAT_TICKS: a long wait for slow answers still shows the stage
                # is alive, without a screen of identical lines
                state = tuple(self.last.get(k) for k in ("finished", "failed", "retries", "rate_limited"))
                quiet_ticks = 0 if state != shown_state else quiet_ticks + 1
                if state != shown_state or quiet_ticks % HEARTBEAT_TICKS == 0:
                    log.info("%s", line, extra={"console": True})
                    shown_state = state
            except Exception:  # progress must never break the stage
                pass
        if bar:
            bar.close()

    def __enter__(self):
        self._start = ray.get(self.actor.snapshot.remote())
        self._t0 = time.time()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        log.info("%s", self.line())  # the file has the last line; the console, the stage's summary


# ----------------------------------------------------------------------------------------------- for the stages
def user_messages(content: str) -> str:
    """The recipe sent every prompt as one user message; the adapter takes messages as JSON."""
    return json.dumps([{"role": "user", "content": content}], ensure_ascii=False)


def ledger_dir(cfg: Config, run: RunDir, stage: str) -> str:
    """Where a stage's teacher requests are journaled: kept across attempts, so a rerun never pays twice."""
    if cfg.teacher and cfg.teacher.ledger_dir:
        return uri_join(cfg.teacher.ledger_dir, stage)
    if run.is_local:
        make_private_dir(run.path("ledger"))
    return run.uri_of("ledger", stage)


def teacher_identity(cfg: Config) -> str:
    """Which model answers (not how fast or how it is reached): another teacher means another stage output."""
    if cfg.teacher_from_serve:
        served = next((m for m in (cfg.serve.models if cfg.serve else []) if m.name == cfg.teacher_from_serve), None)
        return f"served:{cfg.teacher_from_serve}:{served.source if served else '?'}"
    if cfg.teacher is None:
        return "none"
    return f"{key_identity(cfg.teacher)}|{cfg.teacher.model}"  # the model, not its address (see key_identity)


def guard_privacy(teacher: TeacherConfig, rows) -> None:
    """Every row carries its provenance (`credentialed`); the guard counts those rows, whatever their source's name.
    `rows`: a frame, or frames one after another (a table read in batches)."""
    credentialed, sources = 0, set()
    for frame in [rows] if isinstance(rows, pd.DataFrame) else rows:
        credentialed += int(frame["credentialed"].fillna(True).astype(bool).sum()) if "credentialed" in frame else len(frame)
        sources |= set(frame["source"]) if "source" in frame else set()
    check_privacy(teacher, credentialed, sources)
    check_batch_privacy(teacher, credentialed)


def ask_rows(cfg: TeacherConfig, stage: str, df: pd.DataFrame, directory: str, hooks=None, spent_usd: float = 0.0) -> pd.DataFrame:
    """Send the rows' requests (columns messages, max_tokens, sample_index, ...) and return them with answers.
    The rows are split into blocks so that every actor has work (one block would feed one actor)."""
    if df.empty:
        return df
    # Split here, on the driver, rather than with Dataset.repartition: its split tasks each need a whole CPU, which a
    # cluster busy serving the teacher may not have free (a deadlock the demo's evaluate stage once hit).
    parts = max(1, min(len(df), cfg.num_actors * 4))
    bounds = [round(i * len(df) / parts) for i in range(parts + 1)]
    ds = ray.data.from_pandas([df.iloc[a:b] for a, b in zip(bounds, bounds[1:]) if b > a])
    plan = plan_requests(df, cfg, stage, directory, spent_usd=spent_usd)
    if cfg.mode == "batch":
        out = ask_batch(cfg, stage, df, directory, plan)
    else:
        with Progress(cfg, stage, plan):
            out = run_requests(ds, cfg, stage, plan, hooks=hooks).to_pandas()
    out.attrs["plan"] = plan_summary(plan, cfg)
    return out


def plan_summary(plan: Plan, cfg: TeacherConfig) -> dict:
    """What the estimate said before spending (it knew the ledger), for the manifest."""
    return {"to_send": plan.estimate.requests, "in_ledger": plan.already_done, "usd_max": round(plan.estimate.usd_max, 6),
            "mode": cfg.mode, "actors": cfg.num_actors, "in_flight_per_actor": plan.concurrency}  # fmt: skip


STREAM_BLOCK_ROWS = 1000  # rows per request file and per batch handed back: what one process holds at a time


def _read_request_file(batch: pa.Table, fs) -> pa.Table:
    with fs.open_input_file(batch.column("path")[0].as_py()) as f:
        return pq.read_table(f)


class TeacherStream:
    """`ask_rows` for any number of rows, with nothing of their number held in one process: the stage hands its
    request rows over in chunks; they are written as Parquet files under `work_dir` (in the run directory, which
    every node reads) while the plan's counts are summed; then Ray Data streams the files through the actors and the
    answered rows come back a block at a time, in the order they were given, for the stage to filter and write.

        stream = TeacherStream(teacher, "answers", ledger, work_dir, run.fs, expected_rows=n)
        for answered in stream.answers(chunks):   # pandas frames of ≤ block_rows rows
            ...
        stream.totals()                             # teacher_totals over every row, with the plan

    Batch mode (`teacher.mode: batch`) holds the rows on the driver: the Batch API's one input file holds them too.
    """

    def __init__(self, cfg: TeacherConfig, stage: str, directory: str, work_dir: str, fs, hooks=None, spent_usd: float = 0.0,
                 expected_rows: int | None = None, block_rows: int = STREAM_BLOCK_ROWS):  # fmt: skip
        self.cfg, self.stage, self.directory, self.work_dir, self.fs = cfg, stage, directory, work_dir, fs
        self.hooks, self.spent_usd = hooks, spent_usd
        # every actor must have blocks to work on (a block goes to one actor): a few per actor, as ask_rows splits
        per_actor = -(-(expected_rows or block_rows) // (cfg.num_actors * 4))
        self.block_rows = max(1, min(block_rows, per_actor))
        self.plan: Plan | None = None
        self._totals: list[dict] = []

    def _write_requests(self, chunks) -> tuple[list[str], dict]:
        scan = scan_ledger(self.directory, compact_parts=True)  # before any actor writes
        count_args = dict(cfg=self.cfg, stage=self.stage, defaults={}, finished=frozenset(scan.records))
        ensure_dir(self.fs, self.work_dir)
        files, counts = [], {}
        for chunk in chunks:
            for start in range(0, len(chunk), self.block_rows):
                table = pa.Table.from_pandas(chunk.iloc[start : start + self.block_rows], preserve_index=False)
                counts = add_counts(counts, count_requests(table.to_pylist(), **count_args))
                path = f"{self.work_dir}/requests-{len(files):07d}.parquet"  # names sort in the rows' order
                with self.fs.open_output_stream(path) as f:
                    pq.write_table(table, f)
                files.append(path)
        self.plan = plan_from_counts(counts, scan, self.cfg, self.stage, self.directory, self.spent_usd)
        return files, counts

    def answers(self, chunks):
        """Yields the answered rows (the request rows with OUTPUT_COLUMNS) as pandas frames, in the given order."""
        files, _ = self._write_requests(chunks)
        if not files:
            return
        if self.cfg.mode == "batch":
            rows = pd.concat([self._read(p) for p in files], ignore_index=True)
            yield from self._counted(self._pieces(ask_batch(self.cfg, self.stage, rows, self.directory, self.plan)))
            return
        # A block per file, read by one task at a time: read_parquet reads small files as one block (one actor's
        # work), and a read fused into the actors' calls would take several files per call (Ray Data fuses maps whose
        # remote arguments are equal, so this one asks for a different sliver of a CPU than the actors' 0.1). One at a
        # time, because each concurrent task is a Python worker to start (~150 MiB, seconds of CPU) and reading a
        # file takes milliseconds: twelve at once held the actors back ~20 s on 2 CPUs.
        ds = ray.data.from_items([{"path": p} for p in files], override_num_blocks=len(files)).map_batches(
            _read_request_file, batch_size=1, batch_format="pyarrow", fn_kwargs={"fs": self.fs}, num_cpus=0.05,
            concurrency=1)  # fmt: skip
        # in order: the table a stage writes is the same whatever order the answers came in (a rerun that reads
        # everything from the ledger writes what the first run wrote); blocks are small, so a straggler holds little
        ds.context.execution_options.preserve_order = True
        with Progress(self.cfg, self.stage, self.plan):
            out = run_requests(ds, self.cfg, self.stage, self.plan, hooks=self.hooks)
            yield from self._counted(out.iter_batches(batch_size=self.block_rows, batch_format="pandas"))

    def _read(self, path: str) -> pd.DataFrame:
        with self.fs.open_input_file(path) as f:
            return pq.read_table(f).to_pandas()

    def _pieces(self, df: pd.DataFrame):
        for start in range(0, len(df), self.block_rows):
            yield df.iloc[start : start + self.block_rows].reset_index(drop=True)

    def _counted(self, batches):
        for batch in batches:
            self._totals.append(teacher_totals(batch))
            yield batch

    def totals(self) -> dict:
        """`teacher_totals` over every row answered, with the plan (call after the rows were consumed)."""
        totals = merge_totals(self._totals)
        if self.plan is not None and totals.get("requests"):
            totals["plan"] = plan_summary(self.plan, self.cfg)
        return totals

    def cleanup(self) -> None:
        """Delete the request files (the ledger, not they, is what a rerun reads)."""
        if self.fs.get_file_info(self.work_dir).type != pafs.FileType.NotFound:
            self.fs.delete_dir(self.work_dir)


def merge_totals(parts: list[dict]) -> dict:
    """`teacher_totals` of several batches as one: counts and money summed, the per-kind counts merged."""
    parts = [p for p in parts if p.get("requests")]
    if not parts:
        return {"requests": 0}
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            if key == "plan":
                continue
            if isinstance(value, dict):
                merged = out.setdefault(key, {})
                for k, v in value.items():
                    merged[k] = merged.get(k, 0) + v
            else:
                out[key] = out.get(key, 0) + value
    for key in ("cost_usd", "cost_usd_this_run"):
        out[key] = round(out[key], 6)
    out["plan"] = {}
    return out


def teacher_totals(df: pd.DataFrame) -> dict:
    """What the teacher did for a stage: requests, answers from the ledger, tokens, dollars, failures."""
    if df.empty:
        return {"requests": 0}
    errors = df[df.status != "ok"]
    return {
        "requests": len(df),
        "from_ledger": int(df.cached.sum()),
        "ok": int((df.status == "ok").sum()),
        "errors": {str(k): int(v) for k, v in errors.error.fillna("unknown").value_counts().items()},
        "finish_reasons": {str(k): int(v) for k, v in df.finish_reason.dropna().value_counts().items()},
        "prompt_tokens": int(df.prompt_tokens.fillna(0).sum()),
        "completion_tokens": int(df.completion_tokens.fillna(0).sum()),
        "cost_usd": round(float(df.cost_usd.fillna(0).sum()), 6),
        "cost_usd_this_run": round(float(df.loc[~df.cached, "cost_usd"].fillna(0).sum()), 6),
        "attempts": int(df.attempts.fillna(0).sum()),
        "retryable_failures": int(df.retryable.fillna(False).astype(bool).sum()) if "retryable" in df else 0,
        "plan": df.attrs.get("plan", {}),  # what the estimate said before spending (it knew the ledger)
    }


def spent_so_far(run: RunDir, exclude: str | None = None) -> float:
    """Dollars the run's stages have spent on teachers so far, from the manifest: `budget_usd` caps the pipeline.
    `exclude`: the stage asking — what it paid is in its own ledger, counted when it plans."""
    stages = [e for name, e in run.read_manifest()["stages"].items() if name != exclude]
    return sum(float((e.get("teacher") or {}).get("cost_usd", 0) or 0) for e in stages) + sum(
        float(c.get("cost_usd", 0) or 0) for e in stages for c in (e.get("costs") or {}).values() if isinstance(c, dict)
    )


def teacher_price(cfg: TeacherConfig) -> tuple[float, float]:
    """USD per 1M prompt / completion tokens, at batch prices in batch mode."""
    from asclepius.teacher.batch import BATCH_DISCOUNT

    price = price_for(cfg.model, {k: (p.prompt_per_1m, p.completion_per_1m) for k, p in cfg.prices.items()}, is_self_hosted(cfg))
    return (price[0] * BATCH_DISCOUNT, price[1] * BATCH_DISCOUNT) if cfg.mode == "batch" else price


def outcome_columns(rows: list[dict], outcomes) -> pd.DataFrame:
    """The rows with OUTPUT_COLUMNS, as the online path returns them."""
    out = pd.DataFrame(rows)
    out["request_key"] = [o.key for o in outcomes]
    out["status"] = [o.status for o in outcomes]
    out["response"] = [o.text for o in outcomes]
    out["responses_json"] = [json.dumps(o.texts) for o in outcomes]
    out["finish_reason"] = [o.finish_reason for o in outcomes]
    out["prompt_tokens"] = [o.prompt_tokens for o in outcomes]
    out["completion_tokens"] = [o.completion_tokens for o in outcomes]
    out["cost_usd"] = [o.cost_usd for o in outcomes]
    out["http_status"] = [o.http_status for o in outcomes]
    out["error"] = [o.error for o in outcomes]
    out["attempts"] = [o.attempts for o in outcomes]
    out["retryable"] = [o.status != "ok" and o.retryable for o in outcomes]
    out["cached"] = [o.cached for o in outcomes]
    return out


def ask_batch(cfg: TeacherConfig, stage: str, df: pd.DataFrame, directory: str, plan: Plan | None = None) -> pd.DataFrame:
    """`teacher.mode: batch`: the rows' requests through the Batch API (driver-side; the provider does the work)."""
    from asclepius.teacher.batch import BatchRunner

    rows = df.to_dict(orient="records")
    requests = [_request(r, stage, {}) for r in rows]
    base = price_for(cfg.model, {k: (p.prompt_per_1m, p.completion_per_1m) for k, p in cfg.prices.items()}, is_self_hosted(cfg))
    outcomes = BatchRunner(cfg, stage, directory, base).run(requests)
    return outcome_columns(rows, outcomes)
