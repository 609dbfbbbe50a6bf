"""The Ray Serve app: a FastAPI ingress (OpenAI-compatible API + the clinical `/v1/answer`) and one model
deployment per served model, each batching concurrent requests into shared forward passes.

    from asclepius.serve.app import start
    base_url = start(cfg.serve)          # http://127.0.0.1:8000/v1, for the `openai` client

Logs carry request ids, sizes and timings — never prompts, notes or answers.
"""


import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError

from asclepius.config import ServeConfig, ServedModelConfig
from asclepius.recipe import load_recipe
from asclepius.serve.engine import Engine, GenRequest
from asclepius.serve.schemas import AnswerRequest, ChatCompletionRequest, CompletionRequest

log = logging.getLogger("asclepius.serve")


def _batch_slots(requests: list[GenRequest]) -> int:
    """The size of a batch for @serve.batch, padding-aware: the tokens it occupies once padded to its longest
    request, in slots of `max_batch_tokens / max_batch_size` tokens. Short requests count one slot each (so at most
    max_batch_size of them share a batch); long ones count several, so a batch never exceeds max_batch_tokens."""
    slot = requests[0].slot_tokens
    padded = len(requests) * max(max(r.total_len for r in requests), slot)
    return -(-padded // slot)


def answer_prompt(note: str, question: str) -> str:
    """The recipe's trained prompt (its typo included), fields stripped of surrounding newlines as in training."""
    return load_recipe().model_prompt.format(note=note.strip("\n"), question=question.strip("\n"))


class ModelServer:
    """One model: tokenizer, weights, and a batching generation engine."""

    def __init__(self, cfg: ServedModelConfig):
        import torch

        from asclepius.models import load_model, load_tokenizer

        self.cfg = cfg
        device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        # Ray gives a worker one thread per reserved CPU (OMP_NUM_THREADS); torch_threads can use more of a node
        # than the replica reserves, leaving CPUs to schedule other work on.
        torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.num_cpus)))
        self.tokenizer = load_tokenizer(cfg.source)
        self.engine = Engine(load_model(cfg.source, cfg.dtype, device), self.tokenizer)
        self.context = cfg.context_length or self.engine.max_context
        # A request may be as long as the context; a batch must be able to hold at least one.
        batch_tokens = max(cfg.max_batch_tokens, self.context)
        self.slot_tokens = max(1, batch_tokens // cfg.max_batch_size)
        self._batched.set_max_batch_size(cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._torch = ThreadPoolExecutor(max_workers=1)  # one thread runs the model; the event loop stays free
        log.info("model %s ready on %s (context %d)", cfg.name, device, self.context)

    def info(self) -> dict:
        return {"name": self.cfg.name, "context_length": self.context, "source": self.cfg.source}

    def prepare(self, kind: str, payload: dict) -> dict:
        """Prompt token ids for a request, or an error {status, message} (too long for the context)."""
        from asclepius.models import chat_prompt_ids, text_prompt_ids

        if kind == "chat":
            ids = chat_prompt_ids(self.tokenizer, payload["messages"])
        else:
            ids = text_prompt_ids(self.tokenizer, payload["prompt"])
        max_tokens = payload["max_tokens"]
        over = len(ids) + max_tokens - self.context
        if over > 0:
            if not self.cfg.truncate_prompt or max_tokens >= self.context:
                return {
                    "error": {
                        "status": 400,
                        "code": "context_length_exceeded",
                        "message": f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                        f"context of {self.context} tokens by {over}; shorten the prompt or lower max_tokens",
                    }
                }
            ids = ids[:1] + ids[1 + over :]  # keep the first token (BOS / template start), drop the oldest text
        prepared = {"prompt_ids": ids, "truncated": over > 0}
        if payload.get("guided_choice"):
            prepared["allowed"] = [list(self.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in payload["guided_choice"]]
        return prepared

    async def generate(self, spec: dict):
        """Streaming: one chunk per generated token (used for `stream: true`)."""
        async for chunk in self._batched(self._request(spec)):
            yield asdict(chunk)

    async def generate_full(self, spec: dict) -> dict:
        """Non-streaming: the chunks are gathered here, in the replica, so only the result crosses the network."""
        text, tokens, finish = "", 0, "length"
        async for chunk in self._batched(self._request(spec)):
            text += chunk.text
            tokens, finish = chunk.completion_tokens, chunk.finish_reason or finish
        return {"text": text, "completion_tokens": tokens, "finish_reason": finish}

    def _request(self, spec: dict) -> GenRequest:
        return GenRequest(
            prompt_ids=spec["prompt_ids"], max_new_tokens=spec["max_tokens"], temperature=spec["temperature"],
            top_p=spec["top_p"], stop=spec["stop"], seed=spec["seed"], request_id=spec["request_id"],
            slot_tokens=self.slot_tokens, allowed=spec.get("allowed"),
        )  # fmt: skip

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, batch_size_fn=_batch_slots)
    async def _batched(self, requests: list[GenRequest]):
        started = time.time()
        steps = self.engine.generate_stream(requests)
        loop = asyncio.get_running_loop()
        while True:
            step = await loop.run_in_executor(self._torch, next, steps, None)
            if step is None:
                break
            yield [chunk if chunk is not None else StopIteration for chunk in step]
        log.info("batch of %d requests (%s) in %.2f s", len(requests), ",".join(r.request_id for r in requests), time.time() - started)

    def batch_sizes(self) -> list[int]:
        return list(self.engine.batches)


# ----------------------------------------------------------------------------------------------- ingress
api = FastAPI(title="Asclepius", description="OpenAI-compatible API and the clinical /v1/answer endpoint")


def _request_id(prefix: str) -> str:
    """Our id is Serve's: the proxy takes a client's `x-request-id` or makes one, and returns it as a header."""
    from ray.serve.context import _get_serve_request_context

    serve_id = _get_serve_request_context().request_id or uuid.uuid4().hex
    return f"{prefix}-{serve_id}"


def _error(status: int, message: str, code: str | None = None, request_id: str = "") -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 503: "overloaded_error"}
    body = {"error": {"message": message, "type": kind.get(status, "server_error"), "code": code}, "id": request_id or None}
    return JSONResponse(body, status_code=status)


@serve.ingress(api)
class Ingress:
    def __init__(self, models: dict, default_max_tokens: dict, key_sha256: str | None):
        self.models = models  # name → DeploymentHandle
        self.names = list(default_max_tokens)
        self.default_max_tokens = default_max_tokens
        self.key_sha256 = key_sha256  # only a hash of the key ever leaves the process that read it

    # ------------------------------------------------------------------------------------------- helpers
    def _authorized(self, request: Request) -> bool:
        if not self.key_sha256:
            return True
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        return hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), self.key_sha256)

    async def _parse(self, request: Request, schema):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, _error(400, "the request body is not valid JSON", "invalid_json")
        try:
            return schema.model_validate(body), None
        except Exception as err:  # pydantic.ValidationError: name the fields, not their (possibly clinical) values
            fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            return None, JSONResponse({"error": {"message": fields, "type": "invalid_request_error", "code": "invalid_fields"}}, status_code=422)

    def _handle(self, name: str | None):
        name = name or self.names[0]
        return name, self.models.get(name)

    async def _begin(self, request: Request, prefix: str, schema):
        """Every POST starts alike: a request id, the key, the body, the model. Returns (id, body, name, handle)
        or an error response as the last item."""
        request_id = _request_id(prefix)
        if not self._authorized(request):
            return request_id, None, None, None, _error(401, "missing or wrong API key", "invalid_api_key", request_id)
        body, err = await self._parse(request, schema)
        if err:
            return request_id, None, None, None, err
        name, handle = self._handle(body.model)
        if handle is None:
            return request_id, None, None, None, _error(404, f"model {body.model!r} is not served; see /v1/models", "model_not_found", request_id)
        return request_id, body, name, handle, None

    async def _start(self, handle, kind: str, payload: dict, body, n: int, request_id: str, default_max: int, stream: bool = False):
        """Prepare the prompt, then start n generations (they join the same batch): token streams if `stream`,
        else one response each."""
        max_tokens = body.budget(default_max) if hasattr(body, "budget") else (body.max_tokens or default_max)
        prepared = await handle.prepare.remote(kind, {**payload, "max_tokens": max_tokens})
        if "error" in prepared:
            e = prepared["error"]
            return None, prepared, _error(e["status"], e["message"], e["code"], request_id)
        streams = []
        for i in range(n):
            seed = None if body.seed is None else body.seed + i
            spec = {
                "prompt_ids": prepared["prompt_ids"], "max_tokens": max_tokens, "temperature": body.temperature,
                "top_p": body.top_p, "stop": getattr(body, "stops", []), "seed": seed, "request_id": f"{request_id}/{i}",
                "allowed": prepared.get("allowed"),
            }  # fmt: skip
            streams.append(handle.options(stream=True).generate.remote(spec) if stream else handle.generate_full.remote(spec))
        return streams, prepared, None

    async def _collect_all(self, responses, request_id):
        try:
            return await asyncio.gather(*responses), None
        except BackPressureError:
            for response in responses:
                response.cancel()
            return None, _error(503, "the model is overloaded; retry later", "overloaded", request_id)

    # ------------------------------------------------------------------------------------------- routes
    @api.get("/v1/models")
    async def list_models(self, request: Request):
        if not self._authorized(request):
            return _error(401, "missing or wrong API key", "invalid_api_key")
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "asclepius"} for n in self.names]}

    @api.get("/v1/stats")
    async def stats(self, request: Request):
        if not self._authorized(request):
            return _error(401, "missing or wrong API key", "invalid_api_key")
        return {name: {"batch_sizes": await h.batch_sizes.remote()} for name, h in self.models.items()}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        request_id, body, name, handle, err = await self._begin(request, "chatcmpl", ChatCompletionRequest)
        if err:
            return err
        started = time.time()
        messages = [m.model_dump() for m in body.messages]
        try:
            streams, prepared, err = await self._start(
                handle, "chat", {"messages": messages, "guided_choice": body.guided_choice}, body, body.n, request_id,
                self.default_max_tokens[name], stream=body.stream,
            )  # fmt: skip
        except BackPressureError:
            return _error(503, "the model is overloaded; retry later", "overloaded", request_id)
        if err:
            return err
        prompt_tokens = len(prepared["prompt_ids"])
        if body.stream:
            return StreamingResponse(self._sse(streams, request_id, name), media_type="text/event-stream")
        results, err = await self._collect_all(streams, request_id)
        if err:
            return err
        completion = sum(r["completion_tokens"] for r in results)
        log.info("%s model=%s n=%d prompt_tokens=%d completion_tokens=%d %.2f s", request_id, name, body.n, prompt_tokens, completion, time.time() - started)
        return JSONResponse(
            {
                "id": request_id, "object": "chat.completion", "created": int(started), "model": name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": r["text"]}, "finish_reason": r["finish_reason"]} for i, r in enumerate(results)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion},
            }
        )  # fmt: skip

    async def _sse(self, streams, request_id: str, name: str):
        created = int(time.time())

        def event(index, delta, finish=None):
            chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": name,
                     "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}  # fmt: skip
            return f"data: {json.dumps(chunk)}\n\n"

        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index, stream):
            try:
                async for chunk in stream:
                    await queue.put((index, chunk))
            except BackPressureError:
                await queue.put((index, {"text": "", "completion_tokens": 0, "finish_reason": "error"}))
            finally:
                await queue.put((index, None))

        for i in range(len(streams)):
            yield event(i, {"role": "assistant", "content": ""})
        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        open_streams = len(streams)
        while open_streams:
            index, chunk = await queue.get()
            if chunk is None:
                open_streams -= 1
                continue
            if chunk["text"]:
                yield event(index, {"content": chunk["text"]})
            if chunk["finish_reason"]:
                yield event(index, {}, chunk["finish_reason"])
        await asyncio.gather(*tasks)
        yield "data: [DONE]\n\n"

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        request_id, body, name, handle, err = await self._begin(request, "cmpl", CompletionRequest)
        if err:
            return err
        if body.stream:
            return _error(400, "streaming is supported for /v1/chat/completions", "stream_unsupported", request_id)
        started = time.time()
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        all_streams, prompt_tokens = [], 0
        try:
            for prompt in prompts:
                streams, prepared, err = await self._start(handle, "text", {"prompt": prompt}, body, body.n, request_id, self.default_max_tokens[name])
                if err:
                    return err
                all_streams += streams
                prompt_tokens += len(prepared["prompt_ids"])
        except BackPressureError:
            return _error(503, "the model is overloaded; retry later", "overloaded", request_id)
        results, err = await self._collect_all(all_streams, request_id)
        if err:
            return err
        completion = sum(r["completion_tokens"] for r in results)
        log.info("%s model=%s prompts=%d n=%d prompt_tokens=%d completion_tokens=%d %.2f s", request_id, name, len(prompts), body.n, prompt_tokens, completion, time.time() - started)
        return JSONResponse(
            {
                "id": request_id, "object": "text_completion", "created": int(started), "model": name,
                "choices": [{"index": i, "text": r["text"], "finish_reason": r["finish_reason"], "logprobs": None} for i, r in enumerate(results)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion},
            }
        )  # fmt: skip

    @api.post("/v1/answer")
    async def answer(self, request: Request):
        request_id, body, name, handle, err = await self._begin(request, "ans", AnswerRequest)
        if err:
            return err
        started = time.time()
        prompt = answer_prompt(body.note, body.question)
        default_max = load_recipe().generation_for_eval["max_new_tokens"]
        try:
            streams, prepared, err = await self._start(handle, "text", {"prompt": prompt}, body, 1, request_id, default_max)
        except BackPressureError:
            return _error(503, "the model is overloaded; retry later", "overloaded", request_id)
        if err:
            return err
        results, err = await self._collect_all(streams, request_id)
        if err:
            return err
        r = results[0]
        log.info("%s model=%s answer prompt_tokens=%d completion_tokens=%d %.2f s", request_id, name, len(prepared["prompt_ids"]), r["completion_tokens"], time.time() - started)
        out = {
            "id": request_id, "model": name, "answer": r["text"].strip(), "finish_reason": r["finish_reason"],
            "truncated_prompt": prepared["truncated"],
            "usage": {"prompt_tokens": len(prepared["prompt_ids"]), "completion_tokens": r["completion_tokens"]},
        }  # fmt: skip
        if body.echo_prompt:
            out["prompt"] = prompt
        return JSONResponse(out)


# ----------------------------------------------------------------------------------------------- build, start
def read_serve_key(cfg: ServeConfig) -> str | None:
    if cfg.api_key_file:
        with open(os.path.expanduser(cfg.api_key_file), encoding="utf-8") as f:
            return f.read().strip() or None
    if cfg.api_key_env:
        return os.environ.get(cfg.api_key_env) or None
    return None


def build_app(cfg: ServeConfig):
    bound = {}
    for m in cfg.models:
        options = dict(
            name=f"model-{m.name}",
            ray_actor_options={"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
            max_ongoing_requests=m.max_ongoing_requests,
            max_queued_requests=m.max_queued_requests,
        )
        if m.autoscaling:
            options["autoscaling_config"] = m.autoscaling.model_dump()
        else:
            options["num_replicas"] = m.num_replicas
        bound[m.name] = serve.deployment(ModelServer).options(**options).bind(m)
    key = read_serve_key(cfg)
    key_sha = hashlib.sha256(key.encode()).hexdigest() if key else None
    ingress = serve.deployment(Ingress).options(name="ingress", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
    return ingress.bind(bound, {m.name: m.default_max_tokens for m in cfg.models}, key_sha)


def start(cfg: ServeConfig) -> str:
    """Deploy the app on the connected Ray instance; returns the OpenAI base URL."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/v1"
