"""Serving throughput: our Ray Serve app (batched) vs a naive server (one `model.generate` per request).

    python benchmarks/serve_throughput.py                     # SmolLM2-135M-Instruct, 1/4/16 clients
    python benchmarks/serve_throughput.py --model tiny --seconds 10

Both run on the same local Ray instance, the same model and the same HTTP path (OpenAI chat completions through
the `openai` client). For each number of concurrent clients: requests/s, output tokens/s, p50/p95 latency. Then a
load test (16 clients for --load-seconds: server errors must be 0) and an overload test (more clients than the
queue bound: only 200s and clean 503s). Appends rows to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import openai  # noqa: E402
import ray  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from ray import serve  # noqa: E402

from asclepius.config import ServeConfig  # noqa: E402
from asclepius.serve.app import start  # noqa: E402
from record import record  # noqa: E402

QUESTIONS = [
    "What organ does hepatitis affect?",
    "Name two common side effects of metformin.",
    "What does a high troponin level suggest?",
    "Explain what COPD stands for.",
    "Why are beta blockers used after a heart attack?",
    "What is the normal range of blood glucose when fasting?",
]

naive_api = FastAPI()


@serve.ingress(naive_api)
class NaiveServer:
    """The baseline: each request runs its own `model.generate`, one at a time (no batching)."""

    def __init__(self, source: str, threads: int):
        from asclepius.models import load_model, load_tokenizer

        import torch

        torch.set_num_threads(threads)  # the same CPU threads as our app's model
        self.tokenizer = load_tokenizer(source)
        self.model = load_model(source)
        self.lock = threading.Lock()

    @naive_api.post("/v1/chat/completions")
    def chat(self, request_body: dict):
        import torch

        from asclepius.models import chat_prompt_ids

        ids = torch.tensor([chat_prompt_ids(self.tokenizer, request_body["messages"])])
        with self.lock, torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=request_body["max_tokens"],
                                      do_sample=False, pad_token_id=self.tokenizer.eos_token_id)  # fmt: skip
        new = out[0, ids.shape[1] :].tolist()
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return {
            "id": "naive", "object": "chat.completion", "created": int(time.time()), "model": request_body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": len(new), "total_tokens": ids.shape[1] + len(new)},
        }  # fmt: skip


def drive(base_url: str, model: str, clients: int, seconds: float, max_tokens: int) -> dict:
    """`clients` threads, each sending requests back to back for `seconds`."""
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=600)
    latencies, tokens, codes = [], [], {}
    lock = threading.Lock()
    deadline = time.time() + seconds

    def worker(w):
        i = 0
        while time.time() < deadline:
            q = QUESTIONS[(w + i) % len(QUESTIONS)]
            t = time.time()
            try:
                out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], max_tokens=max_tokens, temperature=0)
                code, n = 200, out.usage.completion_tokens
            except openai.APIStatusError as err:
                code, n = err.status_code, 0
            except openai.APIConnectionError:
                code, n = "connection", 0
            with lock:
                codes[code] = codes.get(code, 0) + 1
                if code == 200:
                    latencies.append(time.time() - t)
                    tokens.append(n)
            i += 1

    started = time.time()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - started
    lat = sorted(latencies)
    return {
        "rps": len(lat) / wall,
        "tps": sum(tokens) / wall,
        "p50": statistics.median(lat) if lat else float("nan"),
        "p95": lat[int(0.95 * (len(lat) - 1))] if lat else float("nan"),
        "codes": codes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seconds", type=float, default=25)
    ap.add_argument("--load-seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads of each server's model")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ours_url = start(ServeConfig(port=args.port, app_name="ours", route_prefix="/", models=[
        {"name": "m", "source": args.model, "num_cpus": 0, "torch_threads": args.threads, "max_batch_size": 16,
         "batch_wait_timeout_s": 0.05, "max_ongoing_requests": 32, "max_queued_requests": 64},
    ]))  # fmt: skip
    serve.run(serve.deployment(NaiveServer).options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64).bind(args.model, args.threads),
              name="naive", route_prefix="/naive", blocking=False)  # fmt: skip
    naive_url = f"http://127.0.0.1:{args.port}/naive/v1"
    for url in (ours_url, naive_url):  # warm up both
        drive(url, "m", 1, 1, 4)

    rows = []
    print(f"\n{args.model}, max_tokens {args.max_tokens}, {args.seconds:.0f} s per point, greedy, {args.threads} torch threads each")
    print(f"{'clients':>8}{'':>3}{'ours req/s':>11}{'tok/s':>8}{'p95 s':>7}   {'naive req/s':>11}{'tok/s':>8}{'p95 s':>7}   {'speedup':>7}")
    for clients in (1, 4, 16):
        ours = drive(ours_url, "m", clients, args.seconds, args.max_tokens)
        naive = drive(naive_url, "m", clients, args.seconds, args.max_tokens)
        speed = ours["tps"] / max(naive["tps"], 1e-9)
        rows.append((clients, ours, naive, speed))
        print(f"{clients:>8}{'':>3}{ours['rps']:>11.2f}{ours['tps']:>8.1f}{ours['p95']:>7.2f}   {naive['rps']:>11.2f}{naive['tps']:>8.1f}{naive['p95']:>7.2f}   {speed:>6.2f}x")

    load = drive(ours_url, "m", 16, args.load_seconds, args.max_tokens)
    errors = sum(v for k, v in load["codes"].items() if k != 200)
    print(f"load test: 16 clients for {args.load_seconds:.0f} s: {load['codes']} ({errors} errors), p95 {load['p95']:.2f} s")
    small_url = start(ServeConfig(port=args.port, app_name="small", route_prefix="/small", models=[
        {"name": "m", "source": args.model, "num_cpus": 0, "torch_threads": args.threads, "max_batch_size": 4,
         "max_ongoing_requests": 4, "max_queued_requests": 4},
    ]))  # fmt: skip
    over = drive(small_url, "m", 32, 15, args.max_tokens)
    clean = set(over["codes"]) <= {200, 503}
    print(f"overload: 32 clients vs 4 ongoing + 4 queued: {over['codes']} -> {'only 200 and 503' if clean else 'UNEXPECTED CODES'}")
    serve.delete("small")  # frees the CPU for the overload numbers to mean something
    serve.shutdown()

    if not args.no_record:
        figures = "; ".join(f"{c} clients: ours {o['rps']:.2f} req/s {o['tps']:.0f} tok/s p95 {o['p95']:.2f} s, naive {n['rps']:.2f} req/s {n['tps']:.0f} tok/s p95 {n['p95']:.2f} s" for c, o, n, _ in rows)
        record(
            "serve_throughput", f"python benchmarks/serve_throughput.py --model {args.model} --seconds {args.seconds:.0f} --threads {args.threads}",
            f"{args.model}, chat, max_tokens {args.max_tokens}, greedy, {args.threads} torch threads each",
            f"{figures}; load 16 clients {args.load_seconds:.0f} s: {load['codes']}; overload 32 clients: {over['codes']}",
            "tok/s " + ", ".join(f"{c}: {s:.2f}x" for c, _, _, s in rows), f"{os.cpu_count()} CPU",
        )  # fmt: skip

if __name__ == "__main__":
    main()
