"""The Batch API of OpenAI and Azure OpenAI (`teacher.mode: batch`): half the price, a quota of its own, results
within 24 hours — the recipe's hundreds of thousands of requests per model are what it is for.

Requests go into JSONL files (one line per request, `custom_id` = our request key), are uploaded, and a batch is
created per file; the runner polls, downloads the output and error files, and journals every outcome in the same
ledger as online requests. Failed lines are retried in a new batch (up to `max_attempts` rounds).

Exactly once, across kills and resubmitted jobs:
- a request already final in the ledger is never put in a batch;
- every batch created is journaled (`<ledger>/batches-*.jsonl`: its id, its file, its keys) and a resubmitted job
  polls the batches it finds there instead of creating new ones;
- a batch carries `metadata.asclepius_chunk`, a hash of its keys: if a job is killed after creating a batch but
  before journaling it, the next one finds it among the provider's batches and adopts it.
So a kill -9 during a batch costs nothing: the provider finishes the batch, and the next run downloads it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import uuid
from dataclasses import dataclass

import openai

from asclepius.config import TeacherConfig
from asclepius.storage import AppendLog, read_log
from asclepius.teacher.client import ChatOutcome, ChatRequest, is_retryable, key_identity, parse_chat_completion, read_api_key
from asclepius.teacher.cost import cost_usd
from asclepius.teacher.ledger import Ledger, scan_ledger

log = logging.getLogger("asclepius.teacher")

BATCH_DISCOUNT = 0.5  # OpenAI's and Azure OpenAI (Global Batch)'s price: half the online one
TERMINAL = {"completed", "failed", "expired", "cancelled"}


def make_sync_client(cfg: TeacherConfig) -> openai.OpenAI:
    common = dict(api_key=read_api_key(cfg), max_retries=3, timeout=cfg.timeout_s)
    if cfg.provider == "azure":
        return openai.AzureOpenAI(azure_endpoint=cfg.azure_endpoint, api_version=cfg.api_version, **common)
    return openai.OpenAI(base_url=cfg.base_url, **common)


def chunk_id(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:32]


@dataclass
class _Tracked:
    batch_id: str
    keys: list[str]


class BatchRunner:
    def __init__(self, cfg: TeacherConfig, stage: str, ledger_dir: str, price: tuple[float, float], client=None):
        self.cfg, self.stage, self.ledger_dir = cfg, stage, ledger_dir
        self.price = (price[0] * BATCH_DISCOUNT, price[1] * BATCH_DISCOUNT)
        self.client = client or make_sync_client(cfg)
        self.ledger = Ledger(ledger_dir, writer_id=f"batch-{uuid.uuid4().hex[:12]}")
        self.journal = AppendLog(ledger_dir, f"batches-{stage}")
        self.identity = key_identity(cfg)
        self.url = "/chat/completions" if cfg.provider == "azure" else "/v1/chat/completions"
        self.model = cfg.azure_deployment if cfg.provider == "azure" else cfg.model

    # ------------------------------------------------------------------------------------------- journal
    def _journaled(self) -> list[dict]:
        """The open batches: every created batch, minus the keys later records took out (a retry round)."""
        records = sorted((json.loads(line) for line, whole in read_log(self.ledger_dir, f"batches-{self.stage}") if whole),
                         key=lambda r: r.get("ts", 0))  # fmt: skip
        batches = []
        for rec in records:
            if "forget" in rec:
                drop = set(rec["forget"])
                for b in batches:
                    b["keys"] = [k for k in b["keys"] if k not in drop]
            else:
                batches.append(rec)
        return batches

    def _journal(self, record: dict) -> None:
        self.journal.append(record)

    # ------------------------------------------------------------------------------------------- the provider
    def _line(self, key: str, req: ChatRequest) -> dict:
        body = {"model": self.model, "messages": req.messages, "max_tokens": req.max_tokens, "temperature": req.temperature, "n": req.n}
        for name in ("top_p", "seed"):
            if getattr(req, name) is not None:
                body[name] = getattr(req, name)
        return {"custom_id": key, "method": "POST", "url": self.url, "body": body}

    def _adopt_or_create(self, keys: list[str], requests: dict[str, ChatRequest]) -> str:
        cid = chunk_id(keys)
        for b in self.client.batches.list(limit=100).data:  # killed between create and journal? adopt it
            if (b.metadata or {}).get("asclepius_chunk") == cid and b.status not in ("failed", "expired", "cancelled"):
                log.info("teacher %s: adopting batch %s (%d requests) created before a restart", self.stage, b.id, len(keys))
                return b.id
        data = "".join(json.dumps(self._line(k, requests[k]), ensure_ascii=False) + "\n" for k in keys).encode()
        upload = self.client.files.create(file=(f"asclepius-{self.stage}-{cid[:12]}.jsonl", io.BytesIO(data)), purpose="batch")
        batch = self.client.batches.create(input_file_id=upload.id, endpoint=self.url, completion_window="24h",
                                           metadata={"asclepius_chunk": cid, "asclepius_stage": self.stage})  # fmt: skip
        log.info("teacher %s: batch %s created: %d requests, file %s (%d bytes)", self.stage, batch.id, len(keys), upload.id, len(data))
        return batch.id

    def _wait(self, batch_id: str):
        while True:
            b = self.client.batches.retrieve(batch_id)
            if b.status in TERMINAL:
                return b
            counts = b.request_counts
            log.info("teacher %s: batch %s %s (%s/%s done)", self.stage, batch_id, b.status, getattr(counts, "completed", "?"), getattr(counts, "total", "?"))
            time.sleep(self.cfg.batch_poll_s)

    def _collect(self, batch, keys: set[str], attempts: dict[str, int]) -> dict[str, ChatOutcome]:
        """Outcomes of a finished batch's lines, journaled in the ledger (final answers and retryable failures).
        A line is read as the online reply is: a 200 that is not a chat completion is a malformed, retryable
        outcome; a line that is not JSON names no request, so its request is retried as having no result."""
        out: dict[str, ChatOutcome] = {}
        unreadable = 0
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            for raw in self.client.files.content(file_id).text.splitlines():
                if not raw.strip():
                    continue
                try:
                    line = json.loads(raw)
                except (ValueError, RecursionError):
                    line = None
                if not isinstance(line, dict):
                    unreadable += 1
                    continue
                key = line.get("custom_id")
                if not isinstance(key, str) or key not in keys:
                    continue
                out[key] = self._outcome(key, line, attempts.get(key, 1))
        if unreadable:
            log.warning("teacher %s: batch %s: %d result lines were not JSON objects; their requests are retried", self.stage, batch.id, unreadable)
        missing = keys - set(out)  # expired or cancelled batches (or unreadable lines) leave requests without a result: retry them
        for key in missing:
            out[key] = ChatOutcome(key=key, status="error", error=f"batch {batch.status}, no result", retryable=True, attempts=attempts.get(key, 1))
        # one durable write per output file (one object on object storage); a kill before it reads the file again,
        # which the provider does not charge twice
        self.ledger.append_many([o.record() for o in out.values()])
        return out

    def _outcome(self, key: str, line: dict, attempts: int) -> ChatOutcome:
        """One result line: {"custom_id", "response": {"status_code", "body"}, "error"} (OpenAI's batch output format)."""
        outcome = ChatOutcome(key=key, status="error", attempts=attempts)
        response = line.get("response") if isinstance(line.get("response"), dict) else {}
        status = response.get("status_code")
        status = status if isinstance(status, int) and not isinstance(status, bool) else None
        body = response.get("body")
        outcome.http_status = status
        if status == 200:
            try:
                outcome.texts, outcome.finish_reasons, outcome.prompt_tokens, outcome.completion_tokens = parse_chat_completion(body)
            except ValueError as err:
                outcome.error, outcome.retryable = f"malformed response ({type(err).__name__})", True
                return outcome
            outcome.cost_usd = cost_usd(outcome.prompt_tokens or 0, outcome.completion_tokens or 0, self.price)
            outcome.status = "ok"
            return outcome
        # an error line: the provider's code, from the body or the line's own error (never its message: it may quote input)
        err = body.get("error") if isinstance(body, dict) else None
        err = err if isinstance(err, dict) else (line.get("error") if isinstance(line.get("error"), dict) else {})
        code = err.get("code") if isinstance(err.get("code"), str) else ""
        outcome.error = f"batch http {status} {code[:64]}".strip()
        outcome.retryable = is_retryable(status)
        return outcome

    # ------------------------------------------------------------------------------------------- the run
    def run(self, requests: list[ChatRequest]) -> list[ChatOutcome]:
        keyed = {r.key(self.identity, self.cfg.model): r for r in requests}
        order = [r.key(self.identity, self.cfg.model) for r in requests]
        finished = scan_ledger(self.ledger_dir).records
        outcomes: dict[str, ChatOutcome] = {k: ChatOutcome.from_record(finished[k]) for k in keyed if k in finished}
        pending = [k for k in keyed if k not in outcomes]
        attempts = {k: 0 for k in pending}
        for _ in range(self.cfg.max_attempts):
            if not pending:
                break
            todo = set(pending)
            tracked: list[_Tracked] = []
            for rec in self._journaled():  # batches a killed job left running: poll them, create nothing for their keys
                keys = [k for k in rec["keys"] if k in todo]
                if keys:
                    tracked.append(_Tracked(rec["batch_id"], keys))
                    todo -= set(keys)
            rest = sorted(todo)
            size = max(1, self.cfg.batch_max_requests)
            for i in range(0, len(rest), size):
                keys = rest[i : i + size]
                batch_id = self._adopt_or_create(keys, keyed)
                self._journal({"batch_id": batch_id, "keys": keys, "stage": self.stage, "ts": time.time()})
                tracked.append(_Tracked(batch_id, keys))
            for t in tracked:
                for k in t.keys:
                    attempts[k] += 1
            retry = []
            for t in tracked:
                for key, outcome in self._collect(self._wait(t.batch_id), set(t.keys), attempts).items():
                    outcomes[key] = outcome
                    if outcome.status != "ok" and outcome.retryable:
                        retry.append(key)
            pending = retry
            if pending:
                self._forget(pending)  # the next round puts them in a new batch
        self.ledger.close()
        return [outcomes[k] for k in order]

    def _forget(self, keys: list[str]) -> None:
        """Failed lines are retried in a new batch: take them out of the journal's open batches."""
        self._journal({"forget": sorted(keys), "stage": self.stage, "ts": time.time()})
