"""A local OpenAI-compatible server for tests and benchmarks: real limits, real faults, fake answers.

It enforces requests/min and tokens/min over a sliding window like OpenAI (429 with `retry-after-ms` and
`x-ratelimit-*` headers; a request counts prompt + max_tokens, or with `--accounting usage` what it used), and
injects faults on demand. It answers with filler text; it is a test tool, never a
teacher.

    python -m asclepius.testing.openai_server --port 8911 --rpm 600 --tpm 40000 [--window-s 60]

Faults, by a marker in the last message:  [[fault:500]] [[fault:503]] [[fault:500-once]] (fails the first time
its request key is seen) [[fault:slow:SECONDS]] [[fault:malformed]] [[fault:content_filter]] [[fault:length]]
[[fault:context_length]] (400 context_length_exceeded) [[fault:answer_500]] (500 for every request but the judge's).
`--fail-rate` adds random 500s.

Judge: a prompt with the recipe's judge output rule gets scores (see `judge_reply`). POST /v1/answer is our Serve
app's clinical endpoint ({note, question}).

Control: GET /_stats (admitted requests with time, tokens and request key; statuses), POST /_reset.
Azure shape: POST /openai/deployments/{deployment}/chat/completions?api-version=... with an `api-key` header.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import random
import re
import threading
import time
from collections import Counter, deque

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from asclepius.teacher.cost import TOKENS_PER_MESSAGE, TOKENS_PER_REPLY, byte_estimate

FAULT = re.compile(r"\[\[fault:([a-z_0-9-]+)(?::([0-9.]+))?\]\]")


def prompt_tokens(messages: list[dict]) -> int:
    # The same count as the client's byte estimate, so both sides agree on tokens/min.
    return sum(TOKENS_PER_MESSAGE + byte_estimate(str(m.get("content", ""))) for m in messages) + TOKENS_PER_REPLY


def build_app(rpm: float, tpm: float, window_s: float = 60.0, latency_s: float = 0.05, completion_tokens: int = 40,
              fail_rate: float = 0.0, seed: int = 0, accounting: str = "reserved") -> FastAPI:
    """accounting: "reserved" counts prompt + max_tokens at admission and keeps it, as OpenAI and Azure OpenAI
    do; "usage" lowers a request's count to its actual usage once it is answered."""
    app = FastAPI()
    lock = threading.Lock()
    state = {"log": deque(), "admitted": [], "statuses": Counter(), "seen": Counter(), "requests": []}
    rng = random.Random(seed)

    def window_usage(now: float) -> tuple[int, int]:
        log = state["log"]
        while log and log[0]["t"] <= now - window_s:
            log.popleft()
        return len(log), sum(r["tokens"] for r in log)

    def headers(now: float) -> dict:
        n, tokens = window_usage(now)
        log = state["log"]
        reset = max(0.0, (log[0]["t"] + window_s - now)) if log else 0.0
        return {
            "x-ratelimit-limit-requests": str(int(rpm)),
            "x-ratelimit-limit-tokens": str(int(tpm)),
            "x-ratelimit-remaining-requests": str(max(0, int(rpm - n))),
            "x-ratelimit-remaining-tokens": str(max(0, int(tpm - tokens))),
            "x-ratelimit-reset-requests": f"{reset:.3f}s",
            "x-ratelimit-reset-tokens": f"{reset:.3f}s",
        }

    def error(status: int, code: str, message: str, extra_headers: dict | None = None) -> JSONResponse:
        state["statuses"][status] += 1
        body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error", "code": code}}
        return JSONResponse(body, status_code=status, headers=extra_headers or {})

    async def chat(request: Request, deployment: str | None = None):
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return error(400, "invalid_json", "body is not JSON")
        messages = body.get("messages") or []
        max_tokens = int(body.get("max_tokens") or 16)
        n = int(body.get("n") or 1)
        key = request.headers.get("x-asclepius-request-key", "")
        state["requests"].append({
            "path": request.url.path, "query": dict(request.query_params), "api_key": request.headers.get("api-key"),
            "authorization": request.headers.get("authorization"), "key": key, "model": body.get("model"),
            "deployment": deployment,
        })  # fmt: skip
        last = str(messages[-1].get("content", "")) if messages else ""
        fault = FAULT.search(last)
        kind, arg = (fault.group(1), fault.group(2)) if fault else (None, None)
        prompt = prompt_tokens(messages)
        if kind == "context_length":
            return error(400, "context_length_exceeded", "This model's maximum context length is 4097 tokens.")
        cost = prompt + max_tokens * n
        with lock:
            now = time.monotonic()
            count, tokens = window_usage(now)
            if count + 1 > rpm or tokens + cost > tpm:
                log = state["log"]
                wait = log[0]["t"] + window_s - now if count + 1 > rpm else 0.0
                need_free, freed = tokens + cost - tpm, 0
                for rec in log:  # until enough tokens have left the window
                    if freed >= need_free:
                        break
                    freed += rec["tokens"]
                    wait = max(wait, rec["t"] + window_s - now)
                wait = max(0.01, wait)
                extra = {**headers(now), "retry-after-ms": str(int(wait * 1000)), "retry-after": str(math.ceil(wait))}
                return error(429, "rate_limit_exceeded", "Rate limit reached.", extra)
            record = {"t": now, "tokens": cost, "key": key}
            state["log"].append(record)
            state["admitted"].append(record)
            hdrs = headers(now)
        state["seen"][key] += 1
        if kind in ("500", "503"):
            return error(int(kind), "server_error", "injected fault", hdrs)
        if kind == "answer_500" and not any(JUDGE_MARKER in str(m.get("content", "")) for m in messages):
            return error(500, "server_error", "injected fault (answers only, not the judge)", hdrs)
        if kind == "500-once" and state["seen"][key] == 1:
            return error(500, "server_error", "injected fault", hdrs)
        if fail_rate and rng.random() < fail_rate:
            return error(500, "server_error", "injected random fault", hdrs)
        await asyncio.sleep(float(arg) if kind == "slow" else latency_s)
        if kind == "malformed":
            state["statuses"][200] += 1
            return PlainTextResponse('{"id": "chatcmpl-x", "choices": [', headers=hdrs, media_type="application/json")
        choices, used = [], 0
        judged = judge_reply(messages)
        for i in range(n):
            want = max_tokens if kind == "length" else min(max_tokens, completion_tokens)
            digest = hashlib.sha256(f"{last}|{i}".encode()).hexdigest()[:8]
            text = (f"Answer {digest} " + "lorem ipsum " * want)[: max(1, want * 4)] if judged is None else judged
            reason = "length" if kind == "length" else ("content_filter" if kind == "content_filter" else "stop")
            choices.append({"index": i, "message": {"role": "assistant", "content": None if reason == "content_filter" else text}, "finish_reason": reason})
            used += 0 if reason == "content_filter" else byte_estimate(text)
        if accounting == "usage":
            with lock:
                record["tokens"] = prompt + used  # the window counts what was used, as reserved until now
        state["statuses"][200] += 1
        return JSONResponse(
            {"id": f"chatcmpl-{key[:12]}", "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
             "choices": choices, "usage": {"prompt_tokens": prompt, "completion_tokens": used, "total_tokens": prompt + used}},
            headers={**hdrs, "x-request-id": f"req-{key[:12]}"},
        )  # fmt: skip

    @app.post("/v1/chat/completions")
    async def openai_chat(request: Request):
        return await chat(request)

    @app.post("/v1/answer")
    async def answer(request: Request):
        """Our Serve app's clinical endpoint ({note, question} → {answer, finish_reason, usage}), same limits."""
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return error(400, "invalid_json", "body is not JSON")
        content = f"{body.get('note', '')}\n{body.get('question', '')}"
        forwarded = {**body, "messages": [{"role": "user", "content": content}]}
        response = await chat(_Replayed(request, forwarded))
        if response.status_code != 200:
            return response
        data = json.loads(response.body)
        choice = data["choices"][0]
        return JSONResponse({"id": data["id"], "model": data["model"], "answer": (choice["message"]["content"] or "").strip(),
                             "finish_reason": choice["finish_reason"], "truncated_prompt": False,
                             "usage": {k: data["usage"][k] for k in ("prompt_tokens", "completion_tokens")}},
                            headers={k: v for k, v in response.headers.items() if k.startswith("x-")})  # fmt: skip

    @app.post("/openai/deployments/{deployment}/chat/completions")
    async def azure_chat(deployment: str, request: Request):
        return await chat(request, deployment)

    @app.get("/_stats")
    async def stats():
        with lock:
            return {
                "admitted": [{"t": r["t"], "tokens": r["tokens"], "key": r["key"]} for r in state["admitted"]],
                "statuses": {str(k): v for k, v in state["statuses"].items()},
                "requests": state["requests"][-2000:],
                "window_s": window_s, "rpm": rpm, "tpm": tpm,
            }  # fmt: skip

    @app.post("/_reset")
    async def reset():
        with lock:
            state["log"].clear()
            state["admitted"].clear()
            state["statuses"].clear()
            state["seen"].clear()
            state["requests"].clear()
        return {"ok": True}

    return app


class _Replayed:
    """A request whose JSON body was rewritten (the /v1/answer route reuses the chat route's accounting)."""

    def __init__(self, request: Request, body: dict):
        self._request, self._body = request, body
        self.headers, self.url, self.query_params = request.headers, request.url, request.query_params

    async def json(self):
        return self._body


_AGENT_ANSWER = re.compile(r"\[Agent ([A-Z])'s Answer Begin\]\n(.*?)\n\[Agent \1's Answer End\]", re.S)
JUDGE_MARKER = "First line must contain only"


def judge_reply(messages: list[dict]) -> str | None:
    """Acting as the recipe's judge (its prompt is recognised by its output rule), with behaviour a test can see:
    an answer containing GOOD scores 4, OKAY 3, BAD 1, anything else 2. Faults, by a marker in the note:
    [[fault:judge_garbage]] never gives scores; [[fault:judge_garbage_once]] gives none until re-asked (a reply
    after an assistant turn); [[fault:judge_first]] adds a point to Agent A (position bias)."""
    first = str(messages[0].get("content", "")) if messages else ""
    if JUDGE_MARKER not in first:
        return None
    reasked = any(m.get("role") == "assistant" for m in messages)
    if "[[fault:judge_garbage]]" in first or ("[[fault:judge_garbage_once]]" in first and not reasked):
        return "I am unable to score these responses without more context."
    scores = []
    for label, answer in _AGENT_ANSWER.findall(first):
        score = 4 if "GOOD" in answer else 3 if "OKAY" in answer else 1 if "BAD" in answer else 2
        if label == "A" and "[[fault:judge_first]]" in first:
            score = min(4, score + 1)
        scores.append(str(score))
    return " ".join(scores) + "\nThe scores follow the criteria."


def max_window_usage(admitted: list[dict], window_s: float) -> tuple[int, int]:
    """The most requests and tokens any window of `window_s` held (for tests and benchmarks)."""
    times = sorted(admitted, key=lambda r: r["t"])
    best_r = best_t = 0
    j = 0
    tokens = 0
    for i, rec in enumerate(times):
        tokens += rec["tokens"]
        while times[j]["t"] <= rec["t"] - window_s:
            tokens -= times[j]["tokens"]
            j += 1
        best_r = max(best_r, i - j + 1)
        best_t = max(best_t, tokens)
    return best_r, best_t


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rpm", type=float, default=3500)
    ap.add_argument("--tpm", type=float, default=90000)
    ap.add_argument("--window-s", type=float, default=60.0)
    ap.add_argument("--latency-s", type=float, default=0.05)
    ap.add_argument("--completion-tokens", type=int, default=40)
    ap.add_argument("--fail-rate", type=float, default=0.0)
    ap.add_argument("--accounting", choices=["reserved", "usage"], default="reserved")
    args = ap.parse_args()
    app = build_app(args.rpm, args.tpm, args.window_s, args.latency_s, args.completion_tokens, args.fail_rate, accounting=args.accounting)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
