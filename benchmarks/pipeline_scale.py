"""The pipeline's own overhead against a fast teacher: a teacher stage's rows/s vs a plain asyncio client's, and the
peak memory of every process, at growing N.

    python benchmarks/pipeline_scale.py                       # 3,000 and 12,000 requests
    python benchmarks/pipeline_scale.py --sizes 3000 --no-record

A self-hosted teacher on a few GPUs answers tens of requests a second, so what the pipeline spends per request (the
limiter's round trips, the ledger's writes, row conversions) sets the pace, not the API. Both contenders send the
same answer-stage requests (the recipe's answer prompt around a note of ~300 tokens, max_tokens 400) to the same
OpenAI-compatible test server (asclepius/testing/openai_server.py: 0.05 s latency, 40-token replies, no quota):
(a) baseline: one `openai.AsyncOpenAI` client with `--in-flight` requests at once (64), nothing else;
(b) ours, two ways, both with the token count and budget plan, Ray Data actors (2 × 32 in flight) sending through
    TeacherClient with the cluster's limiter actor, and a ledger record per request (group-committed):
    `ask_rows` — the rows built on the driver and every answer back there as one frame (the questions, synthesize
    and evaluate stages); `TeacherStream` — the answers stage: rows handed over a chunk at a time and written to
    request files, the answered rows back a block at a time and written to Parquet, so no process holds them all.
    The rate limit is set far above what is reached, so the limiter schedules but never waits;
(c) the pipeline itself: N notes (~300 tokens each, a generic CSV) through notes → split (10 % held out) →
    questions → answers, as `asclepius run` runs them, rows/s over the two teacher stages' own seconds;
(d) the synthesize stage: N case reports (the same ~300-token text, a source named `pmc`) through notes →
    synthesize, rows/s over the stage's own seconds.
Each of (b) and (c) runs in a process of its own, with its own Ray instance, so that a peak is its own.
Memory: every process's peak resident and unique set (sampled every 0.5 s: the driver and each Ray worker and
raylet), so the row says which process grows with N. Appends one row to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
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


def make_prompts(count: int, start: int = 0) -> list[str]:
    prompt = load_recipe().answer_prompt
    note = SENTENCE * 12  # ~300 tokens
    return [prompt.format(note=f"Admission {i}. {note}", question=f"What was the hospital course of admission {i}?")
            for i in range(start, start + count)]  # fmt: skip


class PeakMemory:
    """Peak memory per process (this one and its descendants: Ray's raylet, workers, the test server) while running:
    the resident set (RSS), and the unique set (USS: pages no other process shares). RSS counts the pages of Ray's
    object store a process has mapped, which are shared and bounded by the store's size, so USS is what says whether
    a process holds the rows itself."""

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.peaks, self.unique = every_s, {}, {}
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
                full = p.memory_full_info()  # reads /proc/<pid>/smaps: ~10 ms a process
                name = f"{self._name(p)}#{p.pid}"
            except psutil.Error:
                continue
            self.peaks[name] = max(self.peaks.get(name, 0), full.rss)
            self.unique[name] = max(self.unique.get(name, 0), full.uss)

    def _loop(self):
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self):
        self.peaks, self.unique = {}, {}
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def largest(self, peaks: dict, exclude: str = "openai_server") -> tuple[str, int]:
        name, size = max(((n, r) for n, r in peaks.items() if exclude not in n), key=lambda kv: kv[1])
        return name.split("#")[0], size


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


def teacher_config(base_url: str, actors: int, per_actor: int):
    from asclepius.config import TeacherConfig

    return TeacherConfig(provider="openai_compatible", base_url=base_url, model="bench", requests_per_minute=10_000_000,
                         tokens_per_minute=10_000_000_000, num_actors=actors, concurrency_per_actor=per_actor, timeout_s=60,
                         limiter_name=f"scale-{time.time_ns()}", progress_every_s=600)  # fmt: skip


def request_rows(start: int, count: int) -> pd.DataFrame:
    from asclepius.teacher.ray_data import user_messages

    return pd.DataFrame({"messages": [user_messages(p) for p in make_prompts(count, start)], "max_tokens": MAX_TOKENS,
                         "sample_index": range(start, start + count), "temperature": 1.0})  # fmt: skip


def ours_rows(base_url: str, n: int, ledger: str, actors: int, per_actor: int) -> tuple[float, int]:
    """`ask_rows`: every row built on the driver, every answer back on the driver (the questions and evaluate stages)."""
    from asclepius.teacher.ray_data import ask_rows

    rows = request_rows(0, n)
    start = time.perf_counter()
    out = ask_rows(teacher_config(base_url, actors, per_actor), "bench", rows, ledger)
    seconds = time.perf_counter() - start
    return len(out) / seconds, int((out.status == "ok").sum())


def ours_stream(base_url: str, n: int, ledger: str, actors: int, per_actor: int) -> tuple[float, int]:
    """`TeacherStream` (the answers stage): rows built a chunk at a time, written to request files, answered rows back a
    block at a time and written to Parquet, as the stage writes its table."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from asclepius.teacher.ray_data import STREAM_BLOCK_ROWS, TeacherStream

    work = Path(ledger) / "work"
    chunks = (request_rows(i, min(STREAM_BLOCK_ROWS, n - i)) for i in range(0, n, STREAM_BLOCK_ROWS))
    stream = TeacherStream(teacher_config(base_url, actors, per_actor), "bench", str(Path(ledger) / "ledger"), str(work / "requests"),
                           pafs.LocalFileSystem(), expected_rows=n)  # fmt: skip
    start = time.perf_counter()
    rows = ok = 0
    for i, batch in enumerate(stream.answers(chunks)):
        pq.write_table(pa_table(batch), work / f"out-{i:05d}.parquet")
        rows, ok = rows + len(batch), ok + int((batch.status == "ok").sum())
    seconds = time.perf_counter() - start
    stream.cleanup()
    return rows / seconds, ok


def ours_pipeline(base_url: str, n: int, work: str, actors: int, per_actor: int) -> tuple[float, int, str]:
    """The stages themselves, as a user runs them: n notes (a generic CSV) through notes → split → questions →
    answers; rows/s over the two teacher stages' own time (each stage's manifest seconds: reading, planning, asking,
    filtering, writing)."""
    from asclepius.config import config_from_dict
    from asclepius.pipeline import run_pipeline

    notes = Path(work) / "notes.csv"
    note = SENTENCE * 12  # ~300 tokens
    pd.DataFrame({"id": [f"n{i:07d}" for i in range(n)], "body": [f"Admission {i}. {note}" for i in range(n)]}).to_csv(notes, index=False)
    teacher = teacher_config(base_url, actors, per_actor).model_dump(exclude_none=True)
    cfg = config_from_dict({"run_dir": str(Path(work) / "run"), "teacher": teacher, "split": {"eval_fraction": 0.1},
                            "notes": {"sources": [{"kind": "generic", "name": "clinic", "path": str(notes), "text_column": "body", "id_column": "id"}]}})  # fmt: skip
    results = run_pipeline(cfg, stages=["notes", "split", "questions", "answers"])
    q, a = results["questions"], results["answers"]
    rows = q["teacher"]["requests"] + a["teacher"]["requests"]
    detail = ", ".join(f"{s} {results[s]['teacher']['requests'] / results[s]['seconds']:,.0f} rows/s" for s in ("questions", "answers"))
    return rows / (q["seconds"] + a["seconds"]), q["teacher"]["ok"] + a["teacher"]["ok"], detail


def ours_synthesize(base_url: str, n: int, work: str, actors: int, per_actor: int) -> tuple[float, int, str]:
    """The synthesize stage as a user runs it: n case reports (~300 tokens each, a generic CSV whose source is named
    a case report source) through notes → synthesize; rows/s over the synthesize stage's own time."""
    from asclepius.config import config_from_dict
    from asclepius.pipeline import run_pipeline

    reports = Path(work) / "case_reports.csv"
    text = SENTENCE * 12
    pd.DataFrame({"id": [f"r{i:07d}" for i in range(n)], "body": [f"Case {i}. {text}" for i in range(n)]}).to_csv(reports, index=False)
    teacher = teacher_config(base_url, actors, per_actor).model_dump(exclude_none=True)
    cfg = config_from_dict({"run_dir": str(Path(work) / "run"), "teacher": teacher, "synthesize": {"max_tokens_cap": MAX_TOKENS},
                            "notes": {"sources": [{"kind": "generic", "name": "pmc", "path": str(reports), "text_column": "body", "id_column": "id"}]}})  # fmt: skip
    s = run_pipeline(cfg, stages=["notes", "synthesize"])["synthesize"]
    return s["teacher"]["requests"] / s["seconds"], s["teacher"]["ok"]


def pa_table(df: pd.DataFrame):
    import pyarrow as pa

    return pa.Table.from_pandas(df, preserve_index=False)


CONTENDERS = {"ask_rows": ours_rows, "stream": ours_stream, "pipeline": ours_pipeline, "synthesize": ours_synthesize}


def one_run(name: str, n: int, base_url: str, actors: int, per_actor: int) -> dict:
    """One contender at one size, in a process of its own (with its own Ray instance): a process's heap does not give
    memory back, so a run after a larger one would report the larger one's peak."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as work, PeakMemory() as mem:
        rate, ok, *detail = CONTENDERS[name](base_url, n, work, actors, per_actor)
    driver = f"driver#{os.getpid()}"
    out = {"rate": rate, "ok": ok, "detail": detail[0] if detail else "", "rss": mem.largest(mem.peaks), "uss": mem.largest(mem.unique),
           "driver_rss": mem.peaks.get(driver, 0), "driver_uss": mem.unique.get(driver, 0)}  # fmt: skip
    ray.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="3000,12000")
    ap.add_argument("--in-flight", type=int, default=64, help="the plain client's requests at once (ours: actors × per actor)")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--latency-s", type=float, default=0.05)
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help=f"a comma-separated subset of {','.join(CONTENDERS)}")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--one", nargs=3, metavar=("CONTENDER", "N", "BASE_URL"), help=argparse.SUPPRESS)  # a child run
    args = ap.parse_args()
    per_actor = args.in_flight // args.actors
    if args.one:
        name, n, base_url = args.one
        print("RESULT " + json.dumps(one_run(name, int(n), base_url, args.actors, per_actor)), flush=True)
        return
    contenders = args.contenders.split(",")
    results = []
    with openai_test_server(rpm=10_000_000, tpm=10_000_000_000, latency_s=args.latency_s) as server:
        asyncio.run(plain_client(server.base_url, make_prompts(200), args.in_flight))  # warm up the server
        for n in (int(s) for s in args.sizes.split(",")):
            plain = asyncio.run(plain_client(server.base_url, make_prompts(n), args.in_flight))
            row = {"n": n, "plain": plain}
            for name in contenders:
                child = subprocess.run([sys.executable, __file__, "--actors", str(args.actors), "--in-flight", str(args.in_flight),
                                        "--one", name, str(n), server.base_url], capture_output=True, text=True)  # fmt: skip
                found = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
                if child.returncode or not found:
                    sys.exit(f"{name} at {n:,} failed (exit {child.returncode}):\n{child.stderr[-4000:]}")
                row[name] = r = json.loads(found[-1][len("RESULT ") :])
                print(f"{n:,} requests: plain client {plain:,.0f} req/s; {name} {r['rate']:,.0f} rows/s ({r['rate'] / plain:.2f}x), {r['ok']:,} ok{' (' + r['detail'] + ')' if r['detail'] else ''}; "
                      f"peak RSS largest {r['rss'][0]} {r['rss'][1] / 2**20:,.0f} MiB, driver {r['driver_rss'] / 2**20:,.0f} MiB; "
                      f"peak USS largest {r['uss'][0]} {r['uss'][1] / 2**20:,.0f} MiB, driver {r['driver_uss'] / 2**20:,.0f} MiB", flush=True)  # fmt: skip
            results.append(row)
    if not args.no_record:
        figures = "; ".join(
            f"{r['n']:,}: plain {r['plain']:,.0f} req/s, " + ", ".join(
                f"{name} {r[name]['rate']:,.0f} rows/s ({r[name]['detail'] + '; ' if r[name]['detail'] else ''}peak USS: largest {r[name]['uss'][0]} {r[name]['uss'][1] / 2**20:,.0f} MiB, "
                f"driver {r[name]['driver_uss'] / 2**20:,.0f} MiB; RSS driver {r[name]['driver_rss'] / 2**20:,.0f} MiB)"
                for name in contenders)
            for r in results)  # fmt: skip
        ratio = ", ".join(f"{name} {r[name]['rate'] / r['plain']:.2f}x at {r['n']:,}" for r in results for name in contenders)
        record("pipeline_scale", f"python benchmarks/pipeline_scale.py --sizes {args.sizes} --contenders {args.contenders}",
               f"answer requests (~300-token notes, max_tokens 400), test server {args.latency_s} s latency, 40-token replies, no quota; "
               f"plain asyncio client {args.in_flight} in flight vs ask_rows / TeacherStream / the pipeline's "
               f"questions+answers stages (N notes) / the synthesize stage (N case reports) {args.actors} actors x {per_actor}, "
               f"each run in a process of its own",
               figures, f"ours/plain rows/s: {ratio}", f"{os.cpu_count()} CPU")  # fmt: skip


if __name__ == "__main__":
    main()
