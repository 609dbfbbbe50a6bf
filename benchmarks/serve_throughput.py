"""Serving throughput with mixed lengths: our continuous-batching server vs naive per-request `model.generate`.

    python benchmarks/serve_throughput.py                          # SmolLM2-135M, Ray Serve over HTTP, 16 clients
    python benchmarks/serve_throughput.py --engine-only --device cuda   # on a GPU image without Ray: the engine alone

Each of `--clients` clients sends chat requests back to back; every request's max_tokens is drawn (seeded) from
8, 16, 32, 64, 128, 256 — short questions beside long summaries. Both servers get the same requests, the same model,
the same threads, and are measured in the same run: output tokens/s, and p95 latency of the short requests
(max_tokens ≤ 16) and of the long ones (≥ 128). With continuous batching a short request joins the running batch
and leaves when done; naive, it waits for every request before it. Then a load test (server errors must be 0) and a
burst past the queue (only 200s and JSON 503s with Retry-After). Appends a row to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from record import record  # noqa: E402

LENGTHS = [8, 16, 32, 64, 128, 256]
QUESTIONS = [
    "Write a detailed discharge summary for a patient admitted with heart failure.",
    "Explain in detail how diabetic ketoacidosis is treated in hospital.",
    "Describe the hospital course of a patient after coronary artery bypass surgery.",
    "List and explain the medications a COPD patient goes home with.",
    "What organ does hepatitis affect?",
    "Summarize the plan for a patient with community-acquired pneumonia.",
]


def plan(client: int, i: int) -> tuple[str, int]:
    rng = random.Random(client * 100_003 + i)
    return QUESTIONS[rng.randrange(len(QUESTIONS))], rng.choice(LENGTHS)


def drive(send, clients: int, seconds: float, warmup: float = 5.0) -> dict:
    """`clients` threads sending back to back. send(question, max_tokens, tick) -> (status, tokens) calls tick(n) as
    n tokens arrive. Throughput counts the tokens that arrive inside the measured window (after `warmup`, for
    `seconds`), so neither the ramp-up nor the drain after the window (long requests finishing alone) counts."""
    records, codes, ticks, lock = [], {}, [], threading.Lock()
    started = time.time()
    window = (started + warmup, started + warmup + seconds)

    def tick(n):
        with lock:
            ticks.append((time.time(), n))

    def worker(w):
        i = 0
        while time.time() < window[1]:
            question, max_tokens = plan(w, i)
            t = time.time()
            code, n = send(question, max_tokens, tick)
            with lock:
                codes[code] = codes.get(code, 0) + 1
                if code == 200 and window[0] <= t:
                    records.append((max_tokens, time.time() - t, n))
            i += 1

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    def p95(xs):
        xs = sorted(xs)
        return xs[int(0.95 * (len(xs) - 1))] if xs else float("nan")

    tokens = sum(n for t, n in ticks if window[0] <= t <= window[1])
    return {
        "requests": len(records), "tps": tokens / seconds, "codes": codes,
        "p95_short": p95([r[1] for r in records if r[0] <= 16]), "p95_long": p95([r[1] for r in records if r[0] >= 128]),
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------- without Ray (GPU images)
def engine_only(args) -> tuple[dict, dict, str]:
    import torch

    from asclepius.models import chat_prompt_ids, load_model, load_tokenizer
    from asclepius.serve.engine import Engine, GenRequest

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    model = load_model(args.model, dtype, args.device)
    engine = Engine(model, tok, max_batch_size=args.clients, max_waiting=4 * args.clients)
    engine.start()
    naive_lock = threading.Lock()

    def ours(question, max_tokens, tick):
        done, out = threading.Event(), {"n": 0}

        def emit(chunk):
            tick(chunk.completion_tokens - out["n"])
            out["n"] = chunk.completion_tokens
            if chunk.finish_reason:
                done.set()

        engine.submit([GenRequest(chat_prompt_ids(tok, [{"role": "user", "content": question}]), max_tokens, temperature=0)], [emit])
        done.wait()
        return 200, out["n"]

    def naive(question, max_tokens, tick):
        ids = torch.tensor([chat_prompt_ids(tok, [{"role": "user", "content": question}])], device=args.device)
        with naive_lock, torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
        n = out.shape[1] - ids.shape[1]
        tick(n)  # generate gives all tokens at its end; at one request at a time the rate is the same
        return 200, n

    ours("warm up", 4, lambda n: None), naive("warm up", 4, lambda n: None)
    warmup = getattr(args, "warmup", 5.0)
    result = drive(ours, args.clients, args.seconds, warmup), drive(naive, args.clients, args.seconds, warmup)
    engine.stop()
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPU"
    return result[0], result[1], device


# ----------------------------------------------------------------------------------------------- Ray Serve over HTTP
def over_http(args) -> tuple[dict, dict, str, dict, dict]:
    import json
    import urllib.error
    import urllib.request

    import ray
    from fastapi import FastAPI
    from ray import serve

    from asclepius.config import ServeConfig
    from asclepius.serve.app import start

    naive_api = FastAPI()

    @serve.ingress(naive_api)
    class NaiveServer:
        """The baseline: each request runs its own `model.generate`, one at a time (no batching)."""

        def __init__(self, source: str, threads: int):
            import torch

            from asclepius.models import load_model, load_tokenizer

            torch.set_num_threads(threads)  # the same CPU threads as our app's model
            self.tokenizer, self.model, self.lock = load_tokenizer(source), load_model(source), threading.Lock()

        @naive_api.post("/v1/chat/completions")
        def chat(self, body: dict):
            import torch

            from asclepius.models import chat_prompt_ids

            ids = torch.tensor([chat_prompt_ids(self.tokenizer, body["messages"])])
            with self.lock, torch.inference_mode():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=body["max_tokens"], do_sample=False,
                                          pad_token_id=self.tokenizer.eos_token_id)  # fmt: skip
            return {"usage": {"completion_tokens": out.shape[1] - ids.shape[1]}}

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    model = {"name": "m", "source": args.model, "num_cpus": 0, "torch_threads": args.threads}
    ours_url = start(ServeConfig(port=args.port, app_name="ours", route_prefix="/", models=[{**model, "max_batch_size": args.clients, "max_queued_requests": 64}]))
    serve.run(serve.deployment(NaiveServer).options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256).bind(args.model, args.threads),
              name="naive", route_prefix="/naive", blocking=False)  # fmt: skip
    naive_url = f"http://127.0.0.1:{args.port}/naive/v1"

    def sender(url, stream: bool):
        def send(question, max_tokens, tick):
            body = json.dumps({"model": "m", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0,
                               "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}).encode()  # fmt: skip
            req = urllib.request.Request(f"{url}/chat/completions", data=body, headers={"content-type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=900) as r:
                    if not stream:
                        n = json.loads(r.read())["usage"]["completion_tokens"]
                        tick(n)
                        return r.status, n
                    n = 0
                    for line in r:  # server-sent events: count tokens as they arrive (a content chunk is a token)
                        if line.startswith(b"data: {"):
                            event = json.loads(line[6:])
                            if event.get("usage"):
                                return r.status, event["usage"]["completion_tokens"]
                            if event["choices"] and event["choices"][0]["delta"].get("content"):
                                n += 1
                                tick(1)
                    return r.status, n
            except urllib.error.HTTPError as err:
                return err.code, 0
            except OSError:
                return "connection", 0

        return send

    sender(ours_url, True)("warm up", 4, lambda n: None), sender(naive_url, False)("warm up", 4, lambda n: None)
    ours = drive(sender(ours_url, True), args.clients, args.seconds)
    naive = drive(sender(naive_url, False), args.clients, args.seconds)
    serve.delete("naive")
    load = drive(sender(ours_url, False), args.clients, args.load_seconds)
    small_url = start(ServeConfig(port=args.port, app_name="small", route_prefix="/small",
                                  models=[{**model, "max_batch_size": 4, "max_queued_requests": 4}]))  # fmt: skip
    over = drive(sender(small_url, False), 64, 10)
    serve.shutdown()
    return ours, naive, f"{os.cpu_count()} CPU", load, over


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--load-seconds", type=float, default=30)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads of each server's model")
    ap.add_argument("--engine-only", action="store_true", help="no Ray, no HTTP: the engine in this process (GPU images)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    load = over = None
    if args.engine_only:
        ours, naive, machine = engine_only(args)
    else:
        ours, naive, machine, load, over = over_http(args)
    speed = ours["tps"] / max(naive["tps"], 1e-9)
    print(f"\n{args.model}, {args.clients} clients, max_tokens drawn from {LENGTHS}, greedy, {args.seconds:.0f} s each, {machine}")
    for name, r in (("continuous batching", ours), ("naive generate", naive)):
        print(f"{name:>20}: {r['requests']} requests, {r['tps']:.1f} tok/s, p95 short {r['p95_short']:.2f} s, p95 long {r['p95_long']:.2f} s")
    print(f"tokens/s {speed:.2f}x (goal >= 8x); a short request's p95 is {ours['p95_short'] / ours['p95_long']:.2f} of a long one's "
          f"(naive: {naive['p95_short'] / naive['p95_long']:.2f})")  # fmt: skip
    if load is not None:
        errors = sum(v for k, v in load["codes"].items() if k != 200)
        clean = set(over["codes"]) <= {200, 503}
        print(f"load: {args.clients} clients {args.load_seconds:.0f} s: {load['codes']} ({errors} errors); burst of 64 clients vs 4 + 4: "
              f"{over['codes']} -> {'only 200 and 503' if clean else 'UNEXPECTED CODES'}")  # fmt: skip
    if not args.no_record:
        figures = (f"ours {ours['tps']:.0f} tok/s, p95 short {ours['p95_short']:.2f} s / long {ours['p95_long']:.2f} s; naive {naive['tps']:.0f} tok/s, "
                   f"p95 short {naive['p95_short']:.2f} s / long {naive['p95_long']:.2f} s")  # fmt: skip
        if load is not None:
            figures += f"; load {args.clients} clients {args.load_seconds:.0f} s: {load['codes']}; burst 64 vs 4+4: {over['codes']}"
        record("serve_throughput", f"python benchmarks/serve_throughput.py --model {args.model}" + (" --engine-only" if args.engine_only else ""),
               f"{args.model}, {args.clients} clients, chat, max_tokens 8-256 mixed, greedy" + (", engine without Ray" if args.engine_only else ", Ray Serve + HTTP"),
               figures, f"{speed:.2f}x tok/s; short p95 {ours['p95_short'] / ours['p95_long']:.2f} of long", machine)  # fmt: skip


if __name__ == "__main__":
    main()
