"""Teacher throughput: share of the tokens/min limit used, and 429s provoked, ours vs the recipe's pacing.

    python benchmarks/teacher_throughput.py                  # 3,500 RPM / 90k TPM, 150 s per contender
    python benchmarks/teacher_throughput.py --seconds 60     # shorter

Both contenders send the same requests — the recipe's answer prompt around a 700–2,000-token note, max_tokens
400 — to the local OpenAI-compatible test server, which enforces the limits over a real 60 s window like OpenAI.
(a) ours: TeacherClient + RateLimiter (in-process here; on a cluster it is the same object in one Ray actor).
(b) the recipe's pacing (preprocessing/bootstraping.py): one request launched every 2048·60/TPM seconds, a 10 s
    pause after a rate-limit error, immediate retries.
The share is the tokens the server admitted during the run over TPM × minutes. Appends a row to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import openai  # noqa: E402

from asclepius.config import TeacherConfig  # noqa: E402
from asclepius.recipe import load_recipe  # noqa: E402
from asclepius.teacher.client import ChatRequest, LocalLimiter, TeacherClient  # noqa: E402
from asclepius.teacher.limiter import RateLimiter  # noqa: E402
from asclepius.testing.openai_server import max_window_usage  # noqa: E402
from asclepius.testing.server_process import openai_test_server  # noqa: E402
from record import record  # noqa: E402

SENTENCE = "Pt w/ h/o HTN, DM2 admitted for CHF exacerbation, diuresed w/ IV lasix, weaned to RA, BNP trending down. "


def make_requests(count: int, low: int, high: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    prompt = load_recipe().answer_prompt
    out = []
    for i in range(count):
        note_tokens = rng.randint(low, high)  # ~4 bytes per token
        note = (SENTENCE * (note_tokens * 4 // len(SENTENCE) + 1))[: note_tokens * 4]
        question = f"Summarize the hospital course of admission {i}."
        out.append([{"role": "user", "content": prompt.format(note=note, question=question)}])
    return out


async def run_ours(base_url: str, rpm: float, tpm: float, messages: list, seconds: float) -> None:
    cfg = TeacherConfig(provider="openai_compatible", base_url=base_url, model="bench", requests_per_minute=rpm, tokens_per_minute=tpm)
    client = TeacherClient(cfg, LocalLimiter(RateLimiter(rpm, tpm, safety=cfg.rate_safety)))
    tasks = [asyncio.create_task(client.complete(ChatRequest(m, 400, stage="bench", sample_index=i))) for i, m in enumerate(messages)]
    await asyncio.sleep(seconds)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.aclose()


async def run_recipe(base_url: str, tpm: float, messages: list, seconds: float) -> None:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)
    state = {"rate_limit_sleep": False}
    gate = asyncio.Semaphore(1)

    async def one(i, m):
        async with gate:  # the recipe's launcher: one at a time, spaced by 2048·60/TPM
            if state["rate_limit_sleep"]:
                await asyncio.sleep(10)
                state["rate_limit_sleep"] = False
            await asyncio.sleep(2048 * 60 / tpm)
        for _ in range(5):  # its retries: immediately, at most 5 attempts
            try:
                await client.chat.completions.create(model="bench", messages=m, max_tokens=400, temperature=1, extra_headers={"x-asclepius-request-key": f"recipe-{i}"})
                return
            except openai.RateLimitError:
                state["rate_limit_sleep"] = True
            except openai.APIError:
                pass

    tasks = [asyncio.create_task(one(i, m)) for i, m in enumerate(messages)]
    await asyncio.sleep(seconds)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.close()


def measure(server, seconds: float, tpm: float, rpm: float) -> dict:
    stats = server.stats()
    admitted = stats["admitted"]
    if not admitted:
        return {"share": 0.0, "429": stats["statuses"].get("429", 0), "requests": 0, "peak_window_tokens": 0}
    t0 = admitted[0]["t"]
    inside = [a for a in admitted if a["t"] < t0 + seconds]
    tokens = sum(a["tokens"] for a in inside)
    peak_requests, peak_tokens = max_window_usage(admitted, 60.0)
    return {
        "share": tokens / (tpm * seconds / 60),
        "429": stats["statuses"].get("429", 0),
        "requests": len(inside),
        "peak_window_tokens": peak_tokens,
        "peak_window_requests": peak_requests,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rpm", type=float, default=3500)
    ap.add_argument("--tpm", type=float, default=90000)
    ap.add_argument("--seconds", type=float, default=150)
    ap.add_argument("--note-tokens", default="700-2000", help="range of note sizes, e.g. 1500-3000 for long notes")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    low, high = (int(x) for x in args.note_tokens.split("-"))
    count = int(args.tpm / (low + 400) * args.seconds / 60 * 1.5) + 20  # more than can be sent in the time
    messages = make_requests(count, low, high)
    results = {}
    with openai_test_server(rpm=args.rpm, tpm=args.tpm, window_s=60, latency_s=0.8, completion_tokens=250) as server:
        for name, coro in (
            ("recipe pacing", lambda: run_recipe(server.base_url, args.tpm, messages, args.seconds)),
            ("ours", lambda: run_ours(server.base_url, args.rpm, args.tpm, messages, args.seconds)),
        ):
            server.reset()
            started = time.time()
            asyncio.run(coro())
            results[name] = measure(server, args.seconds, args.tpm, args.rpm)
            results[name]["wall"] = time.time() - started

    print(f"\nlimits {args.rpm:,.0f} RPM / {args.tpm:,.0f} TPM, {args.seconds:.0f} s each, answer prompts of {low:,}-{high:,}-token notes")
    print(f"{'':16}{'TPM share':>10}{'requests':>10}{'429s':>6}{'peak 60 s window tokens':>26}")
    for name, r in results.items():
        print(f"{name:16}{r['share']:>10.1%}{r['requests']:>10}{r['429']:>6}{r['peak_window_tokens']:>20,} / {args.tpm:,.0f}")
    ratio = results["ours"]["share"] / max(1e-9, results["recipe pacing"]["share"])
    print(f"ours / recipe pacing: {ratio:.2f}x")
    if not args.no_record:
        o, b = results["ours"], results["recipe pacing"]
        record(
            "teacher_throughput", f"python benchmarks/teacher_throughput.py --seconds {args.seconds:.0f} --note-tokens {args.note_tokens}",
            f"{args.rpm:,.0f} RPM / {args.tpm:,.0f} TPM, 60 s window, notes {low:,}-{high:,} tokens, max_tokens 400",
            f"ours {o['share']:.1%} of TPM, {o['429']} 429s, peak window {o['peak_window_tokens']:,} tokens; "
            f"recipe pacing {b['share']:.1%}, {b['429']} 429s",
            f"{ratio:.2f}x", f"{os.cpu_count()} CPU",
        )  # fmt: skip

if __name__ == "__main__":
    main()
