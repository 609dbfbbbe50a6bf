"""The request ledger: every stored answer is used exactly once across crashes, kills and resubmitted jobs; a request
in flight when its process or node is lost is sent again (at least once).

Layout: `<ledger>/<stage>/part-<writer>*.jsonl`, records of one writer (a Ray actor or process) each, so many
workers write at once without locks — on a local or shared (NFS, Lustre, EFS) filesystem one append-only file per
writer, a record flushed and fsynced before its result counts; on object storage (s3://, gs://) one new object per
group commit (`asclepius.storage.AppendLog`): a request's result counts only once an object holding its record is
stored, and the requests that finish while a write is in flight share the next one. A reader merges every part; a
local line cut short by a kill is ignored (and counted) — its request was not finished, so it is sent again.

What is guaranteed, and what is not:
- **Exactly once for every stored record**: a key whose final record is stored is answered from the ledger by every
  later attempt and job, and never sent (or paid) again.
- **At least once for requests in flight** at a kill or a node loss: they have no record yet, so the next attempt
  sends them again, and the provider bills both. That is at most the requests in flight at once (teacher.num_actors ×
  the concurrency per actor) plus those one writer finished in its last fsync / PUT window (tens of milliseconds on
  S3). The budget check (`teacher.budget_usd`) counts them: before a stage spends, it adds what this ledger already
  paid and the price of one full set of in-flight requests to the estimate (asclepius.teacher.ray_data.plan_requests).
- Two drivers on one run directory would both send every request: the run directory's lease (asclepius.lease)
  refuses the second one.

A key is finished when its record is final: a response (whatever its finish_reason) or an error that retrying
cannot fix (a 4xx other than 408/409/429). Errors that ran out of retries are recorded too, and are tried again
on resume.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from asclepius.storage import AppendLog, compact, log_files, read_log

PREFIX = "part"


def request_key(endpoint: str, model: str, messages: list[dict], params: dict[str, Any], stage: str, sample_index: Any) -> str:
    """A stable id of one logical request: the same inputs give the same key in every process and every run."""
    payload = json.dumps(
        {"endpoint": endpoint, "model": model, "messages": messages, "params": params, "stage": stage, "sample": sample_index},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass
class LedgerScan:
    records: dict[str, dict]  # key → final record (the last final one wins; any is the same answer)
    retryable: dict[str, dict]  # key → last record of a key that ended in a retryable failure
    torn_lines: int
    files: int


def is_final(record: dict) -> bool:
    return record.get("status") == "ok" or (record.get("status") == "error" and not record.get("retryable", True))


class Ledger:
    def __init__(self, directory: str, writer_id: str | None = None):
        self.directory = directory
        self.log = AppendLog(directory, PREFIX, writer_id or uuid.uuid4().hex[:16])
        self.writer_id = self.log.writer_id

    def append(self, record: dict) -> None:
        """Durably record one outcome: stored before this returns."""
        self.log.append(record)

    def append_many(self, records: list[dict]) -> None:
        self.log.append_many(records)

    async def commit(self, record: dict) -> None:
        """`append` for the async client: concurrent requests share a write on object storage."""
        await self.log.commit(record)

    def close(self) -> None:
        self.log.close()

    def scan(self) -> LedgerScan:
        return scan_ledger(self.directory)


def scan_ledger(directory: str, compact_parts: bool = False) -> LedgerScan:
    """Every writer's records merged. `compact_parts` (object storage, no writer running) folds small objects."""
    if compact_parts:
        compact(directory, PREFIX)
    records: dict[str, dict] = {}
    retryable: dict[str, dict] = {}
    torn = 0
    files = len(log_files(directory, PREFIX))
    for line, complete in read_log(directory, PREFIX):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if not complete:
            torn += 1  # valid JSON but no newline: the fsync may not have finished; do not trust it
            continue
        key = record.get("key")
        if not key:
            continue
        if is_final(record):
            records[key] = record
            retryable.pop(key, None)
        elif key not in records:
            retryable[key] = record
    return LedgerScan(records, retryable, torn, files)
