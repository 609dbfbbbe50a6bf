"""A local OpenAI-compatible server for tests and benchmarks: real limits, real faults, fake answers.

It enforces requests/min and tokens/min over a sliding window like OpenAI (429 with `retry-after-ms` and
`x-ratelimit-*` headers; a request counts prompt + max_tokens, or with `--accounting usage` what it used), and
injects faults on demand. It answers with filler text; it is a test tool, never a
teacher.

    python -m asclepius.testing.openai_server --port 8911 --rpm 600 --tpm 40000 [--window-s 60]

Faults, by a marker in the last message:  [[fault:500]] [[fault:503]] [[fault:500-once]] (fails the first time
its request key is seen) [[fault:slow:SECONDS]] [[fault:malformed]] (JSON cut short) [[fault:not_completion]] (JSON,
but no choices) [[fault:deep_json]] (nested past any parser's depth) [[fault:content_filter]] [[fault:length]]
[[fault:context_length]] (400 context_length_exceeded) [[fault:answer_500]] (500 for every request but the judge's).
`--fail-rate` adds random 500s. Batch lines take the same markers: 500s go to the error file; `malformed` cuts the
line short in the output file, `not_completion` answers a 200 that is no completion.

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
import os
import random
import re
import threading
import time
import uuid
from collections import Counter, deque

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from asclepius.teacher.cost import TOKENS_PER_MESSAGE, TOKENS_PER_REPLY, byte_estimate

FAULT = re.compile(r"\[\[fault:([a-z_0-9-]+)(?::([0-9.]+))?\]\]")


def prompt_tokens(messages: list[dict]) -> int:
    # The same count as the client's byte estimate, so both sides agree on tokens/min.
    return sum(TOKENS_PER_MESSAGE + byte_estimate(str(m.get("content", ""))) for m in messages) + TOKENS_PER_REPLY


ACCOUNTING = ("reserved", "reserved_then_trued_up", "usage")


def build_app(rpm: float, tpm: float, window_s: float = 60.0, latency_s: float = 0.05, completion_tokens: int = 40,
              fail_rate: float = 0.0, seed: int = 0, accounting: str = "reserved", batch_latency_s: float = 1.0,
              api_key: str | None = None, latency_range: tuple[float, float] | None = None,
              completion_range: tuple[int, int] | None = None) -> FastAPI:  # fmt: skip
    """How tokens/min are counted (each provider's documented behaviour, one mode each):
    - "reserved": prompt + max_tokens at admission, kept — OpenAI ("rate limits are calculated from the max of
      max_tokens and the estimated tokens") and Azure OpenAI (the reservation "is held at least until the
      request finishes": https://learn.microsoft.com/azure/ai-services/openai/how-to/quota);
    - "reserved_then_trued_up": reserved at admission, replaced by the actual usage once answered;
    - "usage": only what was used, counted when answered (admission needs the prompt to fit).
    Batch jobs (/v1/files, /v1/batches; Azure's /openai/files, /openai/batches) finish `batch_latency_s` after
    creation and never count against the online limits (the Batch API has its own quota)."""
    if accounting not in ACCOUNTING:
        raise ValueError(f"accounting: one of {ACCOUNTING}")
    app = FastAPI()
    lock = threading.Lock()
    state = {"log": deque(), "log_tokens": 0, "admitted": [], "statuses": Counter(), "seen": Counter(), "requests": [], "batches_created": 0}
    rng = random.Random(seed)

    def window_usage(now: float) -> tuple[int, int]:
        log = state["log"]
        while log and log[0]["t"] <= now - window_s:
            old = log.popleft()
            old["in_window"] = False
            state["log_tokens"] -= old["tokens"]
        return len(log), state["log_tokens"]  # a running sum: a sum over the window per request slowed a fast run

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

    def authorized(request) -> bool:
        if not api_key:
            return True
        bearer = request.headers.get("authorization", "")
        return bearer == f"Bearer {api_key}" or request.headers.get("api-key") == api_key

    async def chat(request: Request, deployment: str | None = None):
        if not authorized(request):
            return error(401, "invalid_api_key", "Incorrect API key provided.")
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
        admit = prompt if accounting == "usage" else cost  # a usage-counting server checks that the prompt fits
        with lock:
            now = time.monotonic()
            count, tokens = window_usage(now)
            if count + 1 > rpm or tokens + admit > tpm:
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
            record = {"t": now, "tokens": 0 if accounting == "usage" else cost, "key": key, "in_window": True}
            state["log"].append(record)
            state["log_tokens"] += record["tokens"]
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
        await asyncio.sleep(float(arg) if kind == "slow" else (rng.uniform(*latency_range) if latency_range else latency_s))
        if kind == "malformed":
            state["statuses"][200] += 1
            return PlainTextResponse('{"id": "chatcmpl-x", "choices": [', headers=hdrs, media_type="application/json")
        if kind in ("not_completion", "deep_json"):  # a 200 that a broken proxy could send: JSON, not a completion
            state["statuses"][200] += 1
            body = '{"id": "chatcmpl-x", "object": "error"}' if kind == "not_completion" else '{"choices": ' + "[" * 100_000 + "]" * 100_000 + "}"
            return PlainTextResponse(body, headers=hdrs, media_type="application/json")
        choices, used = [], 0
        judged = judge_reply(messages)
        for i in range(n):
            want = max_tokens if kind == "length" else min(max_tokens, rng.randint(*completion_range) if completion_range else completion_tokens)
            digest = hashlib.sha256(f"{last}|{i}".encode()).hexdigest()[:8]
            text = (f"Answer {digest} " + "lorem ipsum " * want)[: max(1, want * 4)] if judged is None else judged
            reason = "length" if kind == "length" else ("content_filter" if kind == "content_filter" else "stop")
            choices.append({"index": i, "message": {"role": "assistant", "content": None if reason == "content_filter" else text}, "finish_reason": reason})
            used += 0 if reason == "content_filter" else byte_estimate(text)
        if accounting != "reserved":
            with lock:
                if record["in_window"]:  # still counted in the running sum: move it by the change
                    state["log_tokens"] += prompt + used - record["tokens"]
                record["tokens"] = prompt + used  # counted at what it used (reserved until now, or nothing)
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

    # ------------------------------------------------------------------------------------------- Batch API
    files: dict[str, dict] = {}
    batches: dict[str, dict] = {}

    def batch_view(b: dict) -> dict:
        if b["status"] == "in_progress" and time.time() >= b["done_at"]:
            run_batch(b)
        return {k: v for k, v in b.items() if k not in ("done_at", "lines")}

    def run_batch(b: dict) -> None:
        """Answer every line as the online endpoint would (same fake answers, same fault markers), without limits."""
        out, err, done, failed = [], [], 0, 0
        for line in b["lines"]:
            body, custom_id = line["body"], line["custom_id"]
            messages = body.get("messages") or []
            last = str(messages[-1].get("content", "")) if messages else ""
            fault = FAULT.search(last)
            kind = fault.group(1) if fault else None
            if kind in ("500", "503", "answer_500") or (kind == "500-once" and not state["seen"].get(f"batch:{custom_id}")):
                state["seen"][f"batch:{custom_id}"] += 1
                err.append({"id": f"batch_req_{uuid.uuid4().hex[:8]}", "custom_id": custom_id,
                            "response": {"status_code": 500, "request_id": "x", "body": {"error": {"message": "injected fault", "code": "server_error"}}},
                            "error": None})  # fmt: skip
                failed += 1
                continue
            max_tokens, n = int(body.get("max_tokens") or 16), int(body.get("n") or 1)
            want = max_tokens if kind == "length" else min(max_tokens, completion_tokens)
            choices, used = [], 0
            for i in range(n):
                text = judge_reply(messages) or (f"Answer {hashlib.sha256(f'{last}|{i}'.encode()).hexdigest()[:8]} " + "lorem ipsum " * want)[: max(1, want * 4)]
                reason = "length" if kind == "length" else ("content_filter" if kind == "content_filter" else "stop")
                choices.append({"index": i, "message": {"role": "assistant", "content": None if reason == "content_filter" else text}, "finish_reason": reason})
                used += 0 if reason == "content_filter" else byte_estimate(text)
            pt = prompt_tokens(messages)
            completion = {"id": f"chatcmpl-{custom_id[:12]}", "object": "chat.completion", "model": body.get("model"), "choices": choices,
                          "usage": {"prompt_tokens": pt, "completion_tokens": used, "total_tokens": pt + used}}  # fmt: skip
            if kind == "not_completion":
                completion = {"id": "chatcmpl-x", "object": "error"}
            row = {"id": f"batch_req_{uuid.uuid4().hex[:8]}", "custom_id": custom_id, "error": None,
                   "response": {"status_code": 200, "request_id": f"req-{custom_id[:8]}", "body": completion}}
            out.append(json.dumps(row)[:40] if kind == "malformed" else row)  # malformed: the line cut short
            done += 1
        for name, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                fid = f"file-{uuid.uuid4().hex[:12]}"
                text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
                files[fid] = {"content": text.encode(), "purpose": "batch_output", "filename": f"{name}.jsonl"}
                b[name] = fid
        b.update(status="completed", completed_at=int(time.time()), request_counts={"total": len(b["lines"]), "completed": done, "failed": failed})
        b["lines"] = []

    async def upload(request: Request):
        form = await request.form()
        upload = form.get("file")
        content = await upload.read()
        fid = f"file-{uuid.uuid4().hex[:12]}"
        files[fid] = {"content": content, "purpose": form.get("purpose"), "filename": upload.filename}
        state["requests"].append({"path": request.url.path, "key": "", "model": None, "deployment": None, "query": dict(request.query_params),
                                  "api_key": request.headers.get("api-key"), "authorization": request.headers.get("authorization")})  # fmt: skip
        return {"id": fid, "object": "file", "bytes": len(content), "created_at": int(time.time()), "filename": upload.filename, "purpose": form.get("purpose")}

    async def create_batch(request: Request):
        body = await request.json()
        f = files.get(body.get("input_file_id"))
        if f is None:
            return error(400, "invalid_file", "no such input file")
        try:
            lines = [json.loads(x) for x in f["content"].decode().splitlines() if x.strip()]
        except (ValueError, UnicodeDecodeError):
            return error(400, "invalid_file", "the input file is not JSON lines")
        ids = [x.get("custom_id") for x in lines]
        if len(set(ids)) != len(ids):
            return error(400, "duplicate_custom_id", "custom_id values must be unique in a batch")
        bid = f"batch_{uuid.uuid4().hex[:12]}"
        batches[bid] = {"id": bid, "object": "batch", "endpoint": body.get("endpoint"), "input_file_id": body["input_file_id"],
                        "completion_window": body.get("completion_window"), "status": "in_progress", "created_at": int(time.time()),
                        "metadata": body.get("metadata") or {}, "output_file_id": None, "error_file_id": None,
                        "request_counts": {"total": len(lines), "completed": 0, "failed": 0}, "done_at": time.time() + batch_latency_s,
                        "lines": lines}  # fmt: skip
        state["batches_created"] += 1
        return batch_view(batches[bid])

    async def get_batch(batch_id: str):
        b = batches.get(batch_id)
        return batch_view(b) if b else error(404, "not_found", "no such batch")

    async def list_batches(limit: int = 20):
        data = [batch_view(b) for b in sorted(batches.values(), key=lambda b: -b["created_at"])][:limit]
        return {"object": "list", "data": data, "has_more": False}

    async def cancel_batch(batch_id: str):
        b = batches.get(batch_id)
        if not b:
            return error(404, "not_found", "no such batch")
        if b["status"] == "in_progress":
            b.update(status="cancelled", lines=[])
        return batch_view(b)

    async def file_content(file_id: str):
        f = files.get(file_id)
        return PlainTextResponse(f["content"].decode()) if f else error(404, "not_found", "no such file")

    for prefix in ("/v1", "/openai"):  # OpenAI's paths, and Azure OpenAI's (?api-version=...)
        app.add_api_route(f"{prefix}/files", upload, methods=["POST"])
        app.add_api_route(f"{prefix}/files/{{file_id}}/content", file_content, methods=["GET"])
        app.add_api_route(f"{prefix}/batches", create_batch, methods=["POST"])
        app.add_api_route(f"{prefix}/batches", list_batches, methods=["GET"])
        app.add_api_route(f"{prefix}/batches/{{batch_id}}", get_batch, methods=["GET"])
        app.add_api_route(f"{prefix}/batches/{{batch_id}}/cancel", cancel_batch, methods=["POST"])

    @app.get("/_stats")
    async def stats():
        with lock:
            return {
                "admitted": [{"t": r["t"], "tokens": r["tokens"], "key": r["key"]} for r in state["admitted"]],
                "statuses": {str(k): v for k, v in state["statuses"].items()},
                "requests": state["requests"][-2000:], "batches_created": state["batches_created"],
                "window_s": window_s, "rpm": rpm, "tpm": tpm,
            }  # fmt: skip

    @app.post("/_reset")
    async def reset():
        with lock:
            state["log"].clear()
            state["log_tokens"] = 0
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


_AGENT_ANSWER = re.compile(r"\[Agent ([A-Z])'s Answer Begin\]\n(.*?)\n\[Agent \1's Answer End\]", re.DOTALL)
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


def exit_with_parent(parent_pid: int, every_s: float = 0.5) -> None:
    """Exit as soon as the process that started this server is gone (we are handed to another parent). A test or a
    benchmark killed with -9 never reaches its `finally`; without this its server would stay up, taking CPU and a
    port from whatever runs next."""

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(every_s)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


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
    ap.add_argument("--accounting", choices=list(ACCOUNTING), default="reserved")
    ap.add_argument("--batch-latency-s", type=float, default=1.0)
    ap.add_argument("--api-key", default=None, help="require this key (Bearer or api-key header)")
    ap.add_argument("--latency-range", default=None, help="seconds, e.g. 2-8: each request's latency drawn uniformly")
    ap.add_argument("--completion-range", default=None, help="tokens, e.g. 100-400: each reply's length drawn uniformly")
    ap.add_argument("--exit-with-parent", type=int, default=None, metavar="PID", help="exit when process PID (our parent) is gone")
    args = ap.parse_args()
    if args.exit_with_parent is not None:
        exit_with_parent(args.exit_with_parent)
    app = build_app(args.rpm, args.tpm, args.window_s, args.latency_s, args.completion_tokens, args.fail_rate, accounting=args.accounting,
                    batch_latency_s=args.batch_latency_s, api_key=args.api_key,
                    latency_range=tuple(float(x) for x in args.latency_range.split("-")) if args.latency_range else None,
                    completion_range=tuple(int(x) for x in args.completion_range.split("-")) if args.completion_range else None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
