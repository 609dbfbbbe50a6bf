"""The request ledger on object storage: how many writes group commit makes, against one object per record.

A teacher actor has `--in-flight` requests open; each answer arrives after a random API latency (seconds, as real
providers) and its record must be stored before the row counts. With the ledger in S3 every store is a PUT; group
commit lets the records that finish while a PUT is in flight share the next one. Runs against moto's S3 server
started here (its PUTs take ~ms; real S3's take tens of ms, which groups more).

    python benchmarks/ledger_object_storage.py --requests 2000 --in-flight 32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time

from asclepius.storage import AppendLog, log_files
from asclepius.teacher.ledger import scan_ledger
from asclepius.testing.s3 import s3_env, s3_test_server


async def run(log: AppendLog, requests: int, in_flight: int, latency: tuple[float, float], group: bool) -> float:
    gate = asyncio.Semaphore(in_flight)
    rng = random.Random(0)

    async def one(i: int) -> None:
        async with gate:
            await asyncio.sleep(rng.uniform(*latency))  # the API call
            record = {"key": f"k{i}", "status": "ok", "texts": ["x" * 400]}
            if group:
                await log.commit(record)
            else:
                await asyncio.to_thread(log.append, record)  # one PUT per record

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--in-flight", type=int, default=32)
    ap.add_argument("--latency", type=float, nargs=2, default=(0.5, 2.0), help="API latency range, seconds")
    args = ap.parse_args()
    with s3_test_server() as s3, s3_env(s3):
        rows = {}
        for name, group in (("one object per record", False), ("group commit", True)):
            uri = s3.uri("bench", name.replace(" ", "-"))
            took = asyncio.run(run(AppendLog(uri, "part", writer_id="w"), args.requests, args.in_flight, tuple(args.latency), group))
            objects = len(log_files(uri, "part"))
            t = time.perf_counter()
            assert len(scan_ledger(uri).records) == args.requests
            rows[name] = (objects, took, time.perf_counter() - t)
        base = rows["one object per record"][0]
        print(f"{args.requests} requests, {args.in_flight} in flight, API latency {args.latency[0]}-{args.latency[1]} s, moto S3 "
              f"(pid {os.getpid()})")
        for name, (objects, took, scan) in rows.items():
            print(f"  {name:<24} {objects:>6} objects ({objects / base:.2f}x), {took:.1f} s wall, resume scan {scan:.2f} s")


if __name__ == "__main__":
    main()
