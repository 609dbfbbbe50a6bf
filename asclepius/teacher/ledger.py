"""The request ledger: exactly-once teacher calls across crashes, kills and resubmitted jobs.

Layout: `<run>/ledger/<stage>/part-<writer>.jsonl`, one append-only file per writer (a Ray actor or process), so
many workers write at once without locks on a local or shared (NFS, Lustre, EFS) filesystem. A record is one JSON
line, flushed and fsynced before the result counts. A reader merges every part; a line cut short by a kill is
ignored (and counted) — its request was not finished, so it is sent again.

A key is finished when its record is final: a response (whatever its finish_reason) or an error that retrying
cannot fix (a 4xx other than 408/409/429). Errors that ran out of retries are recorded too, and are tried again
on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

from asclepius.run import make_private_dir, open_private


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
        if "://" in directory:
            raise ValueError(
                f"the request ledger needs a POSIX path (local or a shared filesystem mounted on every node), got "
                f"{directory!r}; set teacher.ledger_dir to such a path"
            )
        self.directory = directory
        make_private_dir(directory)  # requests and answers hold note text: owner-only
        self.writer_id = writer_id or uuid.uuid4().hex[:16]
        self._path = os.path.join(directory, f"part-{self.writer_id}.jsonl")
        self._fh = None

    def append(self, record: dict) -> None:
        """Durably record one outcome: written, flushed and fsynced before this returns."""
        if self._fh is None:
            self._fh = open_private(self._path)
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        self._fh.write(line + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def scan(self) -> LedgerScan:
        return scan_ledger(self.directory)


def _lines(path: str) -> Iterator[tuple[str, bool]]:
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    for i, raw in enumerate(lines):
        complete = i < len(lines) - 1  # the part after the last newline was cut short (or is empty)
        if raw:
            yield raw.decode("utf-8", errors="replace"), complete


def scan_ledger(directory: str) -> LedgerScan:
    records: dict[str, dict] = {}
    retryable: dict[str, dict] = {}
    torn = files = 0
    if not os.path.isdir(directory):
        return LedgerScan(records, retryable, 0, 0)
    for name in sorted(os.listdir(directory)):
        if not (name.startswith("part-") and name.endswith(".jsonl")):
            continue
        files += 1
        for line, complete in _lines(os.path.join(directory, name)):
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
