"""Teacher throughput at a realistic quota: the share of tokens/min the server counts, and the 429s provoked —
ours (the Ray Data actors with the cluster's limiter actor) vs the recipe's own request processor.

    python benchmarks/teacher_throughput.py                                   # each accounting mode, 150 s each
    python benchmarks/teacher_throughput.py --modes reserved --seconds 240

The test server enforces 3,000 RPM / 300,000 TPM over a real 60 s window, answers after 2–8 s (uniform), with
replies of 100–400 tokens (max_tokens 400, the recipe's answers), and counts tokens in one of three ways (each a
provider's documented behaviour, asclepius/testing/openai_server.py): reserved (OpenAI, Azure OpenAI),
reserved_then_trued_up, usage. Prompts are the recipe's answer prompt around notes of 1,500–3,000 tokens.
(a) ours: `ask_rows` — Ray Data actors sending through TeacherClient, one RateLimiter behind the named Ray actor,
    `rate_accounting` set to the server's mode (as a user sets it per provider), concurrency by Little's law.
(b) the recipe's preprocessing/openai_parallel_request.py (OpenAI's cookbook processor), reimplemented here with
    its constants: token and request buckets that start full and refill continuously, a request consuming
    prompt + n·max_tokens, a 15 s pause for everyone after a rate-limit error, up to 5 attempts. (The recipe ran it
    at half the quota — its defaults are 0.5 × the limits; here it gets the full quota, as ours does.)
The share is the tokens the server counted for requests admitted during the measured window over TPM × minutes.
Appends a row per mode to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import openai  # noqa: E402
import pandas as pd  # noqa: E402

from asclepius.recipe import load_recipe  # noqa: E402
from asclepius.testing.openai_server import max_window_usage, prompt_tokens  # noqa: E402
from asclepius.testing.server_process import openai_test_server  # noqa: E402
from record import record  # noqa: E402

SENTENCE = "Pt w/ h/o HTN, DM2 admitted for CHF exacerbation, diuresed w/ IV lasix, weaned to RA, BNP trending down. "
MAX_TOKENS = 400


def make_messages(count: int, low: int, high: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    prompt = load_recipe().answer_prompt
    out = []
    for i in range(count):
        note_tokens = rng.randint(low, high)  # ~4 bytes per token (the server counts the same way)
        note = (SENTENCE * (note_tokens * 4 // len(SENTENCE) + 1))[: note_tokens * 4]
        out.append([{"role": "user", "content": prompt.format(note=note, question=f"Summarize the hospital course of admission {i}.")}])
    return out


# ----------------------------------------------------------------------------------------------- (b) the recipe's
async def recipe_processor(base_url: str, rpm: float, tpm: float, messages: list, seconds: float) -> None:
    """The cookbook loop the recipe used (api_request_parallel_processor), its constants kept."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=120)
    pause_after_429, max_attempts = 15.0, 5
    request_capacity, token_capacity, last_update = rpm, tpm, time.time()
    last_429 = 0.0
    queue = [(i, m, max_attempts) for i, m in enumerate(messages)]
    retries: list = []
    tasks = set()
    deadline = time.time() + seconds

    async def call(i, m, attempts_left):
        nonlocal last_429
        try:
            await client.chat.completions.create(model="bench", messages=m, max_tokens=MAX_TOKENS, extra_headers={"x-asclepius-request-key": f"r{i}"})
        except openai.RateLimitError:
            last_429 = time.time()
            if attempts_left > 1:
                retries.append((i, m, attempts_left - 1))
        except openai.APIError:
            if attempts_left > 1:
                retries.append((i, m, attempts_left - 1))

    nxt = None
    while time.time() < deadline:
        if nxt is None and (retries or queue):
            nxt = retries.pop(0) if retries else queue.pop(0)
        now = time.time()
        request_capacity = min(request_capacity + rpm * (now - last_update) / 60, rpm)
        token_capacity = min(token_capacity + tpm * (now - last_update) / 60, tpm)
        last_update = now
        if nxt is not None:
            need = prompt_tokens(nxt[1]) + MAX_TOKENS  # num_tokens_consumed_from_request: prompt + n·max_tokens
            if request_capacity >= 1 and token_capacity >= need:
                request_capacity -= 1
                token_capacity -= need
                t = asyncio.create_task(call(*nxt))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                nxt = None
        await asyncio.sleep(0.001)
        since = time.time() - last_429
        if since < pause_after_429:
            await asyncio.sleep(pause_after_429 - since)
    for t in list(tasks):
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.close()


# ----------------------------------------------------------------------------------------------- (a) ours
def ours(base_url: str, rpm: float, tpm: float, accounting: str, messages: list, ledger: str) -> dict:
    """`ask_rows` on the session's Ray instance over all `messages`; the driver samples the limiter's requests in
    flight meanwhile."""
    import ray

    from asclepius.config import TeacherConfig
    from asclepius.teacher.ray_data import ask_rows, user_messages

    cfg = TeacherConfig(provider="openai_compatible", base_url=base_url, model="bench", requests_per_minute=rpm, tokens_per_minute=tpm,
                        rate_accounting=accounting, num_actors=4, expected_latency_s=5.0, timeout_s=120, max_attempts=6,
                        limiter_name=f"bench-{accounting}-{time.time_ns()}", progress_every_s=30)  # fmt: skip
    rows = pd.DataFrame({"messages": [user_messages(m[0]["content"]) for m in messages], "max_tokens": MAX_TOKENS,
                         "sample_index": list(range(len(messages))), "temperature": 1.0})  # fmt: skip
    samples = []
    result = {}

    def run():
        try:
            ask_rows(cfg, f"bench-{accounting}", rows, ledger)
        except Exception as err:  # torn down at the end of the window
            result["error"] = type(err).__name__

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    actor = None
    while thread.is_alive():  # the rows are sized to outlast the measured window a little
        time.sleep(2)
        try:
            actor = actor or ray.get_actor(cfg.limiter_name, namespace="asclepius")
            samples.append(ray.get(actor.snapshot.remote())["in_flight"])
        except ValueError:
            pass
    return {"in_flight_mean": sum(samples) / len(samples) if samples else 0, "in_flight_max": max(samples or [0]),
            "parts": len(list(Path(ledger).glob("part-*.jsonl")))}  # fmt: skip


def measure(server, window_start: float, seconds: float, tpm: float) -> dict:
    stats = server.stats()
    admitted = stats["admitted"]
    inside = [a for a in admitted if window_start <= a["t"] < window_start + seconds]
    peak_requests, peak_tokens = max_window_usage(admitted, 60.0)
    return {"share": sum(a["tokens"] for a in inside) / (tpm * seconds / 60), "429": stats["statuses"].get("429", 0), "requests": len(inside),
            "peak_window_tokens": peak_tokens}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rpm", type=float, default=3000)
    ap.add_argument("--tpm", type=float, default=300_000)
    ap.add_argument("--seconds", type=float, default=150, help="measured window of each contender (after a 60 s warm-up)")
    ap.add_argument("--warmup", type=float, default=60)
    ap.add_argument("--note-tokens", default="1500-3000")
    ap.add_argument("--modes", default="reserved,reserved_then_trued_up,usage")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    low, high = (int(x) for x in args.note_tokens.split("-"))
    total = args.warmup + args.seconds
    count = int(args.tpm / (low + MAX_TOKENS) * total / 60 * 1.6) + 50  # more than the quota lets through
    messages = make_messages(count, low, high)
    enough = int(args.tpm / ((low + high) / 2 + MAX_TOKENS) * total / 60 * 1.2)  # ours sends all: ~20 % past the window
    import tempfile

    for mode in args.modes.split(","):
        results = {}
        for name in ("recipe processor", "ours"):
            with openai_test_server(rpm=args.rpm, tpm=args.tpm, window_s=60, latency_range="2-8", completion_range="100-400", accounting=mode) as server:
                extra = {}
                if name == "ours":
                    with tempfile.TemporaryDirectory() as ledger:
                        extra = ours(server.base_url, args.rpm, args.tpm, mode, messages[:enough], ledger)
                else:
                    asyncio.run(recipe_processor(server.base_url, args.rpm, args.tpm, messages, total))
                window_start = min(a["t"] for a in server.stats()["admitted"]) + args.warmup
                results[name] = {**measure(server, window_start, args.seconds, args.tpm), **extra}
        o, b = results["ours"], results["recipe processor"]
        print(f"\n{mode}: {args.rpm:,.0f} RPM / {args.tpm:,.0f} TPM, latency 2-8 s, notes {low:,}-{high:,} tokens, {args.seconds:.0f} s measured")
        for name, r in results.items():
            print(f"  {name:18} {r['share']:6.1%} of TPM as the server counts, {r['429']} 429s, {r['requests']} requests, peak window "
                  f"{r['peak_window_tokens']:,.0f}" + (f", in flight mean {r['in_flight_mean']:.1f} max {r['in_flight_max']}, {r['parts']} actors wrote" if "parts" in r else ""))  # fmt: skip
        if not args.no_record:
            record("teacher_throughput", f"python benchmarks/teacher_throughput.py --modes {mode} --seconds {args.seconds:.0f}",
                   f"{args.rpm:,.0f} RPM / {args.tpm:,.0f} TPM, server accounting {mode}, latency 2-8 s, notes {low:,}-{high:,} tokens, max_tokens 400",
                   f"ours {o['share']:.1%} of TPM, {o['429']} 429s, in flight ~{o['in_flight_mean']:.0f} over {o['parts']} actors; "
                   f"recipe processor {b['share']:.1%}, {b['429']} 429s",
                   f"{o['share'] / max(1e-9, b['share']):.2f}x", f"{os.cpu_count()} CPU")  # fmt: skip
    ray.shutdown()


if __name__ == "__main__":
    main()
