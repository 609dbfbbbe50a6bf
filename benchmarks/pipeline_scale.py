"""The pipeline's own overhead against a fast teacher: a teacher stage's rows/s vs a plain asyncio client's, and the
peak memory of every process, at growing N.

    python benchmarks/pipeline_scale.py                       # 3,000 and 12,000 requests
    python benchmarks/pipeline_scale.py --sizes 3000 --no-record

A self-hosted teacher on a few GPUs answers tens of requests a second, so what the pipeline spends per request (the
limiter's round trips, the ledger's writes, row conversions) sets the pace, not the API. Both contenders send the
same answer-stage requests (the recipe's answer prompt around a note of ~300 tokens, max_tokens 400) to the same
OpenAI-compatible test server (asclepius/testing/openai_server.py: 0.05 s latency, 40-token replies, no quota):
(a) baseline: one `openai.AsyncOpenAI` client with `--in-flight` requests at once (64), nothing else;
(b) ours: `asclepius.teacher.ray_data.ask_rows` — what every teacher stage calls: the token count and budget plan,
    Ray Data actors (2 × 32 in flight) sending through TeacherClient with the cluster's limiter actor, a ledger
    record per request (fsynced), the rows back on the driver. The rate limit is set far above what is reached,
    so the limiter schedules but never waits.
Memory: every process's peak resident set (sampled every 0.25 s: the driver and each Ray worker and raylet), so
the row says which process grows with N. Appends one row to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import openai  # noqa: E402
import pandas as pd  # noqa: E402
import psutil  # noqa: E402

from asclepius.recipe import load_recipe  # noqa: E402
from asclepius.testing.server_process import openai_test_server  # noqa: E402
from record import record  # noqa: E402

SENTENCE = "Pt w/ h/o HTN, DM2 admitted for CHF exacerbation, diuresed w/ IV lasix, weaned to RA, BNP trending down. "
MAX_TOKENS = 400


def make_prompts(count: int) -> list[str]:
    prompt = load_recipe().answer_prompt
    note = SENTENCE * 12  # ~300 tokens
    return [prompt.format(note=f"Admission {i}. {note}", question=f"What was the hospital course of admission {i}?") for i in range(count)]


class PeakMemory:
    """Peak RSS per process (this one and its descendants: Ray's raylet, workers, the test server) while running."""

    def __init__(self, every_s: float = 0.25):
        self.every_s, self.peaks = every_s, {}
        self._stop = threading.Event()

    def _name(self, p: psutil.Process) -> str:
        if p.pid == os.getpid():
            return "driver"
        cmd = " ".join(p.cmdline()[:3])
        for key in ("raylet", "gcs_server", "openai_server", "dashboard", "log_monitor", "default_worker", "ray::"):
            if key in cmd:
                return p.name() if key in ("ray::", "default_worker") else key
        return p.name()

    def _sample(self) -> None:
        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                rss = p.memory_info().rss
                name = f"{self._name(p)}#{p.pid}"
            except psutil.Error:
                continue
            self.peaks[name] = max(self.peaks.get(name, 0), rss)

    def _loop(self):
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self):
        self.peaks = {}
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def largest(self, exclude: str = "openai_server") -> tuple[str, int]:
        name, rss = max(((n, r) for n, r in self.peaks.items() if exclude not in n), key=lambda kv: kv[1])
        return name.split("#")[0], rss


async def plain_client(base_url: str, prompts: list[str], in_flight: int) -> float:
    """Requests per second of a bare asyncio client."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=60)
    todo = iter(enumerate(prompts))

    async def worker():  # `in_flight` workers, each sending its next request when one is answered
        for i, p in todo:
            await client.chat.completions.create(model="bench", messages=[{"role": "user", "content": p}], max_tokens=MAX_TOKENS,
                                                 extra_headers={"x-asclepius-request-key": f"plain-{i}"})  # fmt: skip

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    seconds = time.perf_counter() - start
    await client.close()
    return len(prompts) / seconds


def ours(base_url: str, prompts: list[str], ledger: str, actors: int, per_actor: int) -> tuple[float, int]:
    from asclepius.config import TeacherConfig
    from asclepius.teacher.ray_data import ask_rows, user_messages

    cfg = TeacherConfig(provider="openai_compatible", base_url=base_url, model="bench", requests_per_minute=10_000_000,
                        tokens_per_minute=10_000_000_000, num_actors=actors, concurrency_per_actor=per_actor, timeout_s=60,
                        limiter_name=f"scale-{time.time_ns()}", progress_every_s=600)  # fmt: skip
    rows = pd.DataFrame({"messages": [user_messages(p) for p in prompts], "max_tokens": MAX_TOKENS, "sample_index": range(len(prompts)),
                         "temperature": 1.0})  # fmt: skip
    start = time.perf_counter()
    out = ask_rows(cfg, "bench", rows, ledger)
    seconds = time.perf_counter() - start
    return len(out) / seconds, int((out.status == "ok").sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="3000,12000")
    ap.add_argument("--in-flight", type=int, default=64, help="the plain client's requests at once (ours: actors × per actor)")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--latency-s", type=float, default=0.05)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = []
    with openai_test_server(rpm=10_000_000, tpm=10_000_000_000, latency_s=args.latency_s) as server:
        asyncio.run(plain_client(server.base_url, make_prompts(200), args.in_flight))  # warm up the server
        for n in (int(s) for s in args.sizes.split(",")):
            prompts = make_prompts(n)
            plain = asyncio.run(plain_client(server.base_url, prompts, args.in_flight))
            with tempfile.TemporaryDirectory() as ledger, PeakMemory() as mem:
                rate, ok = ours(server.base_url, prompts, ledger, args.actors, args.in_flight // args.actors)
            proc, rss = mem.largest()
            driver = mem.peaks.get(f"driver#{os.getpid()}", 0)
            results.append((n, plain, rate, ok, proc, rss, driver))
            print(f"{n:,} requests: plain client {plain:,.0f} req/s; ours {rate:,.0f} rows/s ({rate / plain:.2f}x), {ok:,} ok; "
                  f"peak RSS: largest {proc} {rss / 2**20:,.0f} MiB, driver {driver / 2**20:,.0f} MiB", flush=True)  # fmt: skip
    ray.shutdown()
    if not args.no_record:
        figures = "; ".join(f"{n:,}: plain {p:,.0f} req/s, ours {r:,.0f} rows/s, peak RSS {proc} {rss / 2**20:,.0f} MiB (driver {d / 2**20:,.0f} MiB)"
                            for n, p, r, _, proc, rss, d in results)  # fmt: skip
        ratio = ", ".join(f"{r / p:.2f}x at {n:,}" for n, p, r, *_ in results)
        record("pipeline_scale", f"python benchmarks/pipeline_scale.py --sizes {args.sizes}",
               f"answer requests (~300-token notes, max_tokens 400), test server {args.latency_s} s latency, 40-token replies, no quota; "
               f"plain asyncio client {args.in_flight} in flight vs ask_rows {args.actors} actors x {args.in_flight // args.actors}",
               figures, f"ours/plain rows/s: {ratio}", f"{os.cpu_count()} CPU")  # fmt: skip


if __name__ == "__main__":
    main()
