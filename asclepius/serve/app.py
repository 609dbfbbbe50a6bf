"""The Ray Serve app: a FastAPI ingress (OpenAI-compatible API + the clinical `/v1/answer`) and one model
deployment per served model, each running a continuous-batching engine (asclepius.serve.engine).

    from asclepius.serve.app import start
    base_url = start(cfg.serve)          # http://127.0.0.1:8000/v1, for the `openai` client

Every request is checked at the edge (the ingress) before it reaches a model: a malformed body, a number too large,
JSON nested too deep, a lone surrogate, an unsupported field — each a 400 with an OpenAI-style error naming the
field. A request's generations (prompts × n) are admitted together or refused together with a 503 and
Retry-After when the engine is full. A client that disconnects stops its generations at the next decoding step.

Logs carry request ids, sizes and timings — never prompts, notes or answers.
"""

import asyncio
import hashlib
import hmac
import json
import logging
import os
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError

from asclepius import metrics
from asclepius.config import ServeConfig, ServedModelConfig
from asclepius.recipe import load_recipe
from asclepius.serve.schemas import AnswerRequest, ChatCompletionRequest, CompletionRequest, RefusedField
from asclepius.storage import is_remote, local_copy

log = logging.getLogger("asclepius.serve")
MAX_BODY_BYTES = 16 << 20
QUEUE_METRICS_EVERY_S = 2.0


class ServeConfigError(ValueError):
    pass


def configure_replica_logging() -> None:
    """Inside a Serve replica our loggers have no handler: give them Serve's (the replica's log file, the
    dashboard), so operators see ids, sizes and timings next to Ray's access lines."""
    ours, theirs = logging.getLogger("asclepius"), logging.getLogger("ray.serve")
    if theirs.handlers and not ours.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def answer_prompt(note: str, question: str) -> str:
    """The recipe's trained prompt (its typo included), fields stripped of surrounding newlines as in training."""
    return load_recipe().model_prompt.format(note=note.strip("\n"), question=question.strip("\n"))


# ----------------------------------------------------------------------------------------------- the model replica
class ModelServer:
    """One model: tokenizer, weights, and a continuous-batching engine on its own thread."""

    def __init__(self, cfg: ServedModelConfig):
        import torch

        from asclepius.models import load_model, load_tokenizer
        from asclepius.serve.engine import Engine

        configure_replica_logging()
        self.cfg = cfg
        device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        # Ray gives a worker one thread per reserved CPU (OMP_NUM_THREADS); torch_threads can use more of a node
        # than the replica reserves, leaving CPUs to schedule other work on.
        torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.num_cpus)))
        # a checkpoint in object storage (s3://, gs://) is downloaded once per node into a private cache
        source = local_copy(cfg.source) if is_remote(cfg.source) else cfg.source
        self.tokenizer = load_tokenizer(source)
        model = load_model(source, cfg.dtype, device)
        self.context = cfg.context_length or getattr(model.config, "max_position_embeddings", 2048)
        if device == "cuda":  # refuse a KV budget the GPU cannot hold now, not with out-of-memory under load
            from asclepius.serve.sizing import check_kv_budget

            check_kv_budget(cfg.name, model.config, max(cfg.max_batch_tokens, self.context), torch.cuda.mem_get_info()[0],
                            dtype_bytes=next(model.parameters()).element_size())  # fmt: skip
        self.engine = Engine(model, self.tokenizer, self.context, max_batch_size=cfg.max_batch_size,
                             max_batch_tokens=max(cfg.max_batch_tokens, self.context), max_waiting=cfg.max_queued_requests)  # fmt: skip
        self.engine.start()
        self.vocab = len(self.tokenizer)
        threading.Thread(target=self._report_queue, name=f"queue-metrics-{cfg.name}", daemon=True).start()
        log.info("model %s ready on %s (context %d, batch %d)", cfg.name, device, self.context, cfg.max_batch_size)

    def _report_queue(self) -> None:
        while True:  # the dashboard's queue depth: generations decoding and waiting for a place in the batch
            metrics.serve_queue(self.cfg.name, *self.engine.load())
            time.sleep(QUEUE_METRICS_EVERY_S)

    def info(self) -> dict:
        return {"name": self.cfg.name, "context_length": self.context, "source": self.cfg.source}

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_texts(self, seq: list[int], alternatives: list[list[int]]) -> tuple[list[str], list[list[str]]]:
        """The text each token of `seq` adds after the tokens before it (so the pieces add up to the decoded text —
        a SentencePiece token alone loses its leading space), and the same for each position's alternatives."""
        chosen, alts = [], []
        for i, token in enumerate(seq):
            prefix = seq[max(0, i - 6) : i]
            base = self.decode(prefix)
            chosen.append(self.decode(prefix + [token])[len(base) :])
            alts.append([self.decode(prefix + [a])[len(base) :] for a in alternatives[i]])
        return chosen, alts

    def prepare(self, kind: str, payload: dict) -> dict:
        """Prompt token ids for a request, or an error {status, code, message, param}."""
        from asclepius.models import chat_prompt_ids, text_prompt_ids

        for token in (payload.get("logit_bias") or {}):
            if token >= self.vocab:
                return _error_dict(400, "invalid_logit_bias", f"logit_bias: token id {token} is outside the vocabulary ({self.vocab})", "logit_bias")
        max_tokens = payload["max_tokens"]
        if kind == "answer":
            return self._prepare_answer(payload)
        if kind == "chat":
            ids = chat_prompt_ids(self.tokenizer, payload["messages"])
        elif isinstance(payload["prompt"], list):
            ids = list(payload["prompt"])
            if max(ids) >= self.vocab:
                return _error_dict(400, "invalid_prompt", f"prompt: token id {max(ids)} is outside the vocabulary ({self.vocab})", "prompt")
        else:
            ids = text_prompt_ids(self.tokenizer, payload["prompt"])
        over = len(ids) + max_tokens - self.context
        truncated = 0
        if over > 0:
            if not self.cfg.truncate_prompt or max_tokens >= self.context:
                return _error_dict(400, "context_length_exceeded", f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds "
                                   f"the context of {self.context} tokens by {over}; shorten the prompt or lower max_tokens", "messages")  # fmt: skip
            ids, truncated = ids[:1] + ids[1 + over :], over  # the oldest text goes; the first token (BOS / template) stays
        prepared = {"prompt_ids": ids, "truncated_tokens": truncated}
        if payload.get("guided_choice"):
            prepared["allowed"] = [list(self.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in payload["guided_choice"]]
        return prepared

    def _prepare_answer(self, payload: dict) -> dict:
        """The recipe's prompt around note and question; a note too long for the context is shortened from its end,
        as training shortens it (the header and the question always stay), and the response says so."""
        from asclepius.models import text_prompt_ids

        note, question, max_tokens = payload["note"].strip("\n"), payload["question"], payload["max_tokens"]
        ids = text_prompt_ids(self.tokenizer, answer_prompt(note, question))
        if len(ids) + max_tokens <= self.context:
            return {"prompt_ids": ids, "truncated_tokens": 0}
        note_ids = list(self.tokenizer(note, add_special_tokens=False)["input_ids"])
        keep = len(note_ids) - (len(ids) + max_tokens - self.context)
        while keep > 0:
            ids = text_prompt_ids(self.tokenizer, answer_prompt(self.tokenizer.decode(note_ids[:keep]), question))
            if len(ids) + max_tokens <= self.context:
                return {"prompt_ids": ids, "truncated_tokens": len(note_ids) - keep}
            keep -= max(1, len(ids) + max_tokens - self.context)
        return _error_dict(400, "context_length_exceeded", f"the question and max_tokens ({max_tokens}) leave no room for the note "
                           f"in the context of {self.context} tokens; lower max_tokens", "max_tokens")  # fmt: skip

    def _requests(self, specs: list[dict]):
        from asclepius.serve.engine import GenRequest

        return [GenRequest(
            prompt_ids=s["prompt_ids"], max_new_tokens=s["max_tokens"], temperature=s["temperature"], top_p=s["top_p"], stop=s["stop"],
            seed=s["seed"], request_id=s["request_id"], allowed=s.get("allowed"), logprobs=s.get("logprobs"),
            prompt_logprobs=s.get("prompt_logprobs"), logit_bias=s.get("logit_bias") or {},
            frequency_penalty=s.get("frequency_penalty", 0.0), presence_penalty=s.get("presence_penalty", 0.0),
        ) for s in specs]  # fmt: skip

    async def generate(self, specs: list[dict]):
        """All of a request's generations, admitted together; yields lists of {"index", chunk...} as tokens come
        (whatever has arrived, in one message: fewer hops per token under load), or one {"overloaded":
        retry_after_s}. If the caller goes away (a client disconnect cancels this), the generations stop at the
        engine's next step."""
        from dataclasses import asdict

        from asclepius.serve.engine import EngineOverloaded

        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()
        requests = self._requests(specs)

        def emitter(i):
            return lambda chunk: loop.call_soon_threadsafe(chunks.put_nowait, (i, chunk))

        try:
            self.engine.submit(requests, [emitter(i) for i in range(len(requests))])
        except EngineOverloaded as err:
            log.info("%s refused: %s", specs[0]["request_id"].split("/")[0], err)
            yield {"overloaded": err.retry_after_s}
            return
        open_ = set(range(len(requests)))
        try:
            while open_:
                got = [await chunks.get()]
                while not chunks.empty():
                    got.append(chunks.get_nowait())
                for i, chunk in got:
                    if chunk.finish_reason:
                        open_.discard(i)
                yield [{"index": i, **asdict(chunk)} for i, chunk in got]
        finally:
            for i in open_:  # cancelled, or the caller stopped reading
                self.engine.cancel(requests[i].request_id)
            if open_:
                log.info("%s cancelled %d generation(s) (client went away)", specs[0]["request_id"].split("/")[0], len(open_))

    async def generate_full(self, specs: list[dict]) -> dict:
        """Non-streaming: the chunks are gathered here, in the replica, so only the results cross the network."""
        results = [{"text": "", "completion_tokens": 0, "finish_reason": "length", "logprobs": [], "prompt_logprobs": None, "error": None}
                   for _ in specs]  # fmt: skip
        async for items in self.generate(specs):
            if "overloaded" in items:
                return items
            for item in items:
                r = results[item["index"]]
                r["text"] += item["text"]
                r["logprobs"] += item["logprobs"]
                r["completion_tokens"] = item["completion_tokens"]
                r["prompt_logprobs"] = item["prompt_logprobs"] or r["prompt_logprobs"]
                if item["finish_reason"]:
                    r["finish_reason"], r["error"] = item["finish_reason"], item["error"]
        return {"results": results}

    def stats(self) -> dict:
        running, waiting = self.engine.load()
        return {"batch_sizes": list(self.engine.batches), "running": running, "waiting": waiting, "steps": self.engine.steps}


# ----------------------------------------------------------------------------------------------- errors, parsing
def _error_dict(status: int, code: str, message: str, param: str | None = None) -> dict:
    return {"error": {"status": status, "code": code, "message": message, "param": param}}


def _error(status: int, message: str, code: str | None = None, request_id: str = "", param: str | None = None,
           headers: dict | None = None) -> JSONResponse:  # fmt: skip
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
            503: "overloaded_error"}  # fmt: skip
    body = {"error": {"message": message, "type": kind.get(status, "server_error"), "param": param, "code": code}, "id": request_id or None}
    return JSONResponse(body, status_code=status, headers=headers or {})


def _surrogate_at(value) -> str | None:
    """The path of the first string holding a lone surrogate (no tokenizer takes one), iteratively."""
    stack = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return path or "<body>"
        elif isinstance(v, dict):
            stack.extend((f"{path}.{k}" if path else str(k), x) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((f"{path}.{i}" if path else str(i), x) for i, x in enumerate(v))
    return None


def parse_body(raw: bytes) -> tuple[object, tuple[str, str, str | None] | None]:
    """(the JSON value, None) or (None, (code, message, param)) for a body no model should ever see."""
    if len(raw) > MAX_BODY_BYTES:
        return None, ("body_too_large", f"the body is over {MAX_BODY_BYTES >> 20} MiB", None)
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, ("invalid_json", "the body is not UTF-8", None)
    except json.JSONDecodeError:
        return None, ("invalid_json", "the request body is not valid JSON", None)
    except RecursionError:
        return None, ("invalid_json", "the JSON is nested too deeply", None)
    except ValueError:  # Python's limit on integer digits
        return None, ("invalid_json", "a number in the body is too large", None)
    where = _surrogate_at(value)
    if where:
        return None, ("invalid_text", f"{where}: a lone surrogate is not valid Unicode text", where)
    return value, None


def _validation_error(err) -> tuple[str, str | None]:
    """A pydantic error as OpenAI puts it: the fields and what is wrong — never their (possibly clinical) values."""
    if isinstance(err, RefusedField):
        return str(err), err.field
    errors = err.errors() if hasattr(err, "errors") else []
    for e in errors:  # a RefusedField raised in a validator arrives wrapped
        ctx = (e.get("ctx") or {}).get("error")
        if isinstance(ctx, RefusedField):
            return str(ctx), ctx.field
    parts, first = [], None
    for e in errors:
        where = ".".join(str(p) for p in e["loc"]) or "<body>"
        first = first or where
        msg = "unknown field (not an OpenAI parameter this server takes)" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{where}: {msg}")
    return "; ".join(dict.fromkeys(parts)) or "invalid request", first


def _fingerprint(cfg: ServedModelConfig) -> str:
    return "fp_" + hashlib.sha256(f"asclepius|{cfg.name}|{cfg.source}|{cfg.dtype}".encode()).hexdigest()[:12]


def _token_entries(server_tokens: list[str], entries: list[dict], k: int | None) -> dict:
    """Completions' logprobs object: tokens, token_logprobs, top_logprobs (dicts), text_offset."""
    tokens, lps, tops, offsets, at = [], [], [], [], 0
    for text, e in zip(server_tokens, entries):
        tokens.append(text)
        lps.append(e["logprob"])
        tops.append(None if e["logprob"] is None else {t: lp for t, lp in e["top_texts"]} if k else None)
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


api = FastAPI(title="Asclepius", description="OpenAI-compatible API and the clinical /v1/answer endpoint",
              docs_url=None, redoc_url=None, openapi_url=None)  # docs only when enabled, and behind the key (Ingress)  # fmt: skip


@api.middleware("http")
async def _time_requests(request: Request, call_next):
    """Every request's latency for the dashboard, by route template (never the path: it may hold a model id)."""
    started = time.perf_counter()
    response = await call_next(request)
    route = getattr(request.scope.get("route"), "path", "unmatched")
    metrics.serve_request(route, response.status_code, time.perf_counter() - started)
    return response


def _request_id(prefix: str) -> str:
    """Our id is Serve's: the proxy takes a client's `x-request-id` or makes one, and returns it as a header."""
    from ray.serve.context import _get_serve_request_context

    serve_id = _get_serve_request_context().request_id or uuid.uuid4().hex
    return f"{prefix}-{serve_id}"


@serve.ingress(api)
class Ingress:
    def __init__(self, models: dict, settings: dict, key_sha256: str | None, docs: bool):
        configure_replica_logging()
        self.models = models  # name → DeploymentHandle
        self.settings = settings  # name → {default_max_tokens, fingerprint, capacity}
        self.names = list(settings)
        self.key_sha256 = key_sha256  # only a hash of the key ever leaves the process that read it
        self.docs = docs

    # ------------------------------------------------------------------------------------------- helpers
    def _authorized(self, request: Request) -> bool:
        if not self.key_sha256:
            return True
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        return hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), self.key_sha256)

    async def _begin(self, request: Request, prefix: str, schema):
        """Every POST starts alike: a request id, the key, the body, the model. Returns (id, body, name, handle, error)."""
        request_id = _request_id(prefix)
        if not self._authorized(request):
            return request_id, None, None, None, _error(401, "missing or wrong API key", "invalid_api_key", request_id)
        value, bad = parse_body(await request.body())
        if bad:
            code, message, param = bad
            return request_id, None, None, None, _error(413 if code == "body_too_large" else 400, message, code, request_id, param)
        if not isinstance(value, dict):
            return request_id, None, None, None, _error(400, "the body must be a JSON object", "invalid_json", request_id)
        try:
            body = schema.model_validate(value)
        except Exception as err:  # pydantic.ValidationError or RefusedField
            message, param = _validation_error(err)
            return request_id, None, None, None, _error(400, message, "invalid_request", request_id, param)
        name = body.model or self.names[0]
        handle = self.models.get(name)
        if handle is None:
            return request_id, None, None, None, _error(404, f"model {body.model!r} is not served; see /v1/models", "model_not_found", request_id, "model")
        return request_id, body, name, handle, None

    def _overloaded(self, request_id: str, retry_after: float) -> JSONResponse:
        return _error(503, "the model is busy; retry after the time in Retry-After", "overloaded", request_id,
                      headers={"retry-after": str(max(1, round(retry_after)))})  # fmt: skip

    async def _prepare_all(self, handle, kind: str, payloads: list[dict], request_id: str):
        try:
            prepared = await asyncio.gather(*(handle.prepare.remote(kind, p) for p in payloads))
        except BackPressureError:  # Serve's own queue is full: our JSON 503, never its plain-text one
            return None, self._overloaded(request_id, 1.0)
        for p in prepared:
            if "error" in p:
                e = p["error"]
                return None, _error(e["status"], e["message"], e["code"], request_id, e.get("param"))
        return prepared, None

    def _specs(self, prepared: list[dict], body, n: int, max_tokens: int, request_id: str, logprobs=None, prompt_logprobs=None) -> list[dict]:
        specs = []
        for p, prep in enumerate(prepared):
            for i in range(n):
                seed = None if body.seed is None else body.seed + p * n + i
                specs.append({
                    "prompt_ids": prep["prompt_ids"], "max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                    "stop": getattr(body, "stops", []), "seed": seed, "request_id": f"{request_id}/{p}/{i}", "allowed": prep.get("allowed"),
                    "logprobs": logprobs, "prompt_logprobs": prompt_logprobs, "logit_bias": body.bias() if hasattr(body, "bias") else {},
                    "frequency_penalty": getattr(body, "frequency_penalty", 0.0), "presence_penalty": getattr(body, "presence_penalty", 0.0),
                })  # fmt: skip
        return specs

    def _too_many(self, name: str, count: int, request_id: str, param: str) -> JSONResponse | None:
        capacity = self.settings[name]["capacity"]
        if count > capacity:
            return _error(400, f"{param}: {count} generations in one request, more than this model ever takes at once ({capacity})",
                          "too_many_generations", request_id, param)  # fmt: skip
        return None

    async def _run_full(self, handle, specs: list[dict], request_id: str):
        try:
            out = await handle.generate_full.remote(specs)
        except BackPressureError:
            return None, self._overloaded(request_id, 1.0)
        if "overloaded" in out:
            return None, self._overloaded(request_id, out["overloaded"])
        failed = [r["error"] for r in out["results"] if r["finish_reason"] == "error"]
        if failed:
            return None, _error(500, f"generation failed: {failed[0]}", "generation_error", request_id)
        return out["results"], None

    # ------------------------------------------------------------------------------------------- routes
    @api.get("/v1/models")
    async def list_models(self, request: Request):
        if not self._authorized(request):
            return _error(401, "missing or wrong API key", "invalid_api_key")
        return {"object": "list", "data": [self._model_card(n) for n in self.names]}

    @api.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request):
        if not self._authorized(request):
            return _error(401, "missing or wrong API key", "invalid_api_key")
        if model_id not in self.models:
            return _error(404, f"model {model_id!r} is not served; see /v1/models", "model_not_found", param="model")
        return self._model_card(model_id)

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "asclepius"}

    @api.get("/v1/stats")
    async def stats(self, request: Request):
        if not self._authorized(request):
            return _error(401, "missing or wrong API key", "invalid_api_key")
        return {name: await h.stats.remote() for name, h in self.models.items()}

    @api.get("/openapi.json")
    async def openapi(self, request: Request):
        if not self.docs:
            return _error(404, "the API description is off (serve.docs)", "not_found")
        if not self._authorized(request):
            return _error(401, "missing or wrong API key", "invalid_api_key")
        return JSONResponse(api.openapi())

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        request_id, body, name, handle, err = await self._begin(request, "chatcmpl", ChatCompletionRequest)
        if err:
            return err
        started = time.time()
        max_tokens = body.budget(self.settings[name]["default_max_tokens"])
        if err := self._too_many(name, body.n, request_id, "n"):
            return err
        payload = {"messages": body.plain_messages(), "max_tokens": max_tokens, "guided_choice": body.guided_choice, "logit_bias": body.bias()}
        prepared, err = await self._prepare_all(handle, "chat", [payload], request_id)
        if err:
            return err
        k = (body.top_logprobs or 0) if body.logprobs else None
        specs = self._specs(prepared, body, body.n, max_tokens, request_id, logprobs=k)
        prompt_tokens = len(prepared[0]["prompt_ids"])
        fingerprint = self.settings[name]["fingerprint"]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(handle, specs, request_id, name, "chat", prompt_tokens, include_usage, fingerprint)
        results, err = await self._run_full(handle, specs, request_id)
        if err:
            return err
        completion = sum(r["completion_tokens"] for r in results)
        log.info("%s model=%s n=%d prompt_tokens=%d completion_tokens=%d %.2f s", request_id, name, body.n, prompt_tokens, completion, time.time() - started)
        choices = []
        for i, r in enumerate(results):
            choice = {"index": i, "message": {"role": "assistant", "content": r["text"]}, "finish_reason": r["finish_reason"], "logprobs": None}
            if body.logprobs:
                choice["logprobs"] = {"content": await self._chat_logprobs(handle, r["logprobs"])}
            choices.append(choice)
        return JSONResponse({
            "id": request_id, "object": "chat.completion", "created": int(started), "model": name, "system_fingerprint": fingerprint,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion},
        })  # fmt: skip

    async def _chat_logprobs(self, handle, entries: list[dict]) -> list[dict]:
        chosen, alts = await handle.token_texts.remote([e["token_id"] for e in entries], [[t for t, _ in e["top"]] for e in entries])

        def item(text, logprob):
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return [{**item(chosen[i], e["logprob"]), "top_logprobs": [item(alts[i][j], lp) for j, (_, lp) in enumerate(e["top"])]}
                for i, e in enumerate(entries)]  # fmt: skip

    async def _stream(self, handle, specs, request_id, name, kind, prompt_tokens, include_usage, fingerprint):
        """Server-sent events. The first item decides the status: an overloaded engine is a 503 before any 200; once
        streaming, a failure ends the stream with an error event and [DONE], never a silent stop."""
        stream = handle.options(stream=True).generate.remote(specs)
        try:
            first = await stream.__anext__()
        except BackPressureError:
            return self._overloaded(request_id, 1.0)
        if "overloaded" in first:
            return self._overloaded(request_id, first["overloaded"])
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def event(choices, usage=None):
            chunk = {"id": request_id, "object": obj, "created": created, "model": name, "system_fingerprint": fingerprint, "choices": choices}
            if usage is not None:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n"

        async def events():
            completion = [0] * len(specs)
            try:
                if kind == "chat":
                    for i in range(len(specs)):
                        yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                items, failed = first, False
                while not failed:
                    for item in items:
                        i = item["index"]
                        completion[i] = item["completion_tokens"]
                        if item["finish_reason"] == "error":
                            error = {"message": f"generation failed: {item['error']}", "type": "server_error", "code": "generation_error"}
                            yield f"data: {json.dumps({'error': error})}\n\n"
                            failed = True
                            break
                        if item["text"] or item["finish_reason"]:
                            if kind == "chat":
                                delta = {"content": item["text"]} if item["text"] else {}
                                yield event([{"index": i, "delta": delta, "finish_reason": item["finish_reason"]}])
                            else:
                                yield event([{"index": i, "text": item["text"], "finish_reason": item["finish_reason"], "logprobs": None}])
                    try:
                        items = await stream.__anext__()
                    except StopAsyncIteration:
                        break
                if include_usage:
                    total = sum(completion)
                    yield event([], {"prompt_tokens": prompt_tokens, "completion_tokens": total, "total_tokens": prompt_tokens + total})
            except Exception as err:  # never a stream that just stops
                log.warning("%s stream ended by %s", request_id, type(err).__name__)
                yield f"data: {json.dumps({'error': {'message': 'the stream failed', 'type': 'server_error', 'code': type(err).__name__}})}\n\n"
            finally:
                stream.cancel()  # a client that disconnected: its generations stop at the next step
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        request_id, body, name, handle, err = await self._begin(request, "cmpl", CompletionRequest)
        if err:
            return err
        started = time.time()
        try:
            prompts = body.prompts()
        except RefusedField as e:
            return _error(400, str(e), "invalid_request", request_id, e.field)
        if err := self._too_many(name, len(prompts) * body.n, request_id, "prompt"):
            return err
        max_tokens = body.max_tokens if body.max_tokens is not None else self.settings[name]["default_max_tokens"]
        payloads = [{"prompt": p, "max_tokens": max(1, max_tokens), "logit_bias": body.bias()} for p in prompts]
        prepared, err = await self._prepare_all(handle, "text", payloads, request_id)
        if err:
            return err
        k = body.logprobs
        specs = self._specs(prepared, body, body.n, max(1, max_tokens), request_id, logprobs=k,
                            prompt_logprobs=k if (body.echo and k is not None) else None)  # fmt: skip
        prompt_tokens = sum(len(p["prompt_ids"]) for p in prepared)
        fingerprint = self.settings[name]["fingerprint"]
        if body.stream:
            if body.echo or k is not None:
                return _error(400, "stream: echo and logprobs are given in non-streamed responses only", "invalid_request", request_id, "stream")
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(handle, specs, request_id, name, "text", prompt_tokens, include_usage, fingerprint)
        results, err = await self._run_full(handle, specs, request_id)
        if err:
            return err
        choices = []
        for idx, r in enumerate(results):
            text, entries = r["text"], list(r["logprobs"])
            if max_tokens == 0:  # echo only: the prompt, no generated token
                text, entries, r["finish_reason"], r["completion_tokens"] = "", [], "length", 0
            logprobs = None
            if body.echo:  # the prompt as given; token ids as text
                prompt = prompts[idx // body.n]
                text = (prompt if isinstance(prompt, str) else await handle.decode.remote(prompt)) + text
                entries = (r["prompt_logprobs"] or []) + entries
            if k is not None:
                chosen, alts = await handle.token_texts.remote([e["token_id"] for e in entries], [[t for t, _ in e["top"]] for e in entries])
                rows = [{"logprob": e["logprob"], "top_texts": list(zip(alts[i], (lp for _, lp in e["top"])))} for i, e in enumerate(entries)]
                logprobs = _token_entries(chosen, rows, k)
            choices.append({"index": idx, "text": text, "finish_reason": r["finish_reason"], "logprobs": logprobs})
        completion = sum(r["completion_tokens"] for r in results)
        log.info("%s model=%s prompts=%d n=%d prompt_tokens=%d completion_tokens=%d %.2f s", request_id, name, len(prompts), body.n,
                 prompt_tokens, completion, time.time() - started)  # fmt: skip
        return JSONResponse({
            "id": request_id, "object": "text_completion", "created": int(started), "model": name, "system_fingerprint": fingerprint,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion},
        })  # fmt: skip

    @api.post("/v1/answer")
    async def answer(self, request: Request):
        request_id, body, name, handle, err = await self._begin(request, "ans", AnswerRequest)
        if err:
            return err
        started = time.time()
        max_tokens = body.max_tokens or load_recipe().generation_for_eval["max_new_tokens"]
        payload = {"note": body.note, "question": body.question.strip("\n"), "max_tokens": max_tokens}
        prepared, err = await self._prepare_all(handle, "answer", [payload], request_id)
        if err:
            return err
        results, err = await self._run_full(handle, self._specs(prepared, body, 1, max_tokens, request_id), request_id)
        if err:
            return err
        r, truncated = results[0], prepared[0]["truncated_tokens"]
        log.info("%s model=%s answer prompt_tokens=%d completion_tokens=%d note_tokens_removed=%d %.2f s", request_id, name,
                 len(prepared[0]["prompt_ids"]), r["completion_tokens"], truncated, time.time() - started)  # fmt: skip
        out = {
            "id": request_id, "model": name, "answer": r["text"].strip(), "finish_reason": r["finish_reason"],
            "truncated_note": truncated > 0,
            "usage": {"prompt_tokens": len(prepared[0]["prompt_ids"]), "completion_tokens": r["completion_tokens"], "note_tokens_removed": truncated},
        }  # fmt: skip
        if body.echo_prompt:  # the prompt as the model saw it (with the shortened note, if it was)
            ids = prepared[0]["prompt_ids"]
            out["prompt"] = await handle.decode.remote(ids) if truncated else answer_prompt(body.note, body.question)
        return JSONResponse(out, headers={"x-asclepius-note-truncated": "true" if truncated else "false"})


# ----------------------------------------------------------------------------------------------- build, start
def read_serve_key(cfg: ServeConfig) -> str | None:
    """The clients' key, or None when auth is off. A configured key source that is missing or empty stops the
    server at start: failing open would serve clinical text to anyone."""
    if cfg.api_key_file:
        try:
            with open(os.path.expanduser(cfg.api_key_file), encoding="utf-8") as f:
                key = f.read().strip()
        except OSError as err:
            raise ServeConfigError(f"serve.api_key_file: cannot read {cfg.api_key_file} ({type(err).__name__}); refusing to serve without the key") from None
        if not key:
            raise ServeConfigError(f"serve.api_key_file: {cfg.api_key_file} is empty; refusing to serve without a key")
        return key
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env, "").strip()
        if not key:
            raise ServeConfigError(f"serve.api_key_env: the environment variable {cfg.api_key_env} is not set or empty; refusing to "
                                   "serve without the key it names")  # fmt: skip
        return key
    return None


def _placement(m: ServedModelConfig) -> dict:
    """A model deployment's name, resources and replicas: what build_app deploys and serve_deploy_config states."""
    options: dict = {"name": f"model-{m.name}", "ray_actor_options": {"num_cpus": m.num_cpus, "num_gpus": m.num_gpus}}
    if m.autoscaling:
        options["autoscaling_config"] = m.autoscaling.model_dump()
    else:
        options["num_replicas"] = m.num_replicas
    return options


def build_app(cfg: ServeConfig):
    bound, settings = {}, {}
    key = read_serve_key(cfg)
    for m in cfg.models:
        options = {
            **_placement(m),
            # a call carries all of a request's generations, and the engine admits or refuses them at once (running
            # + waiting generations); Serve's own queue only smooths bursts of calls, each refused quickly if full
            "max_ongoing_requests": m.max_batch_size + m.max_queued_requests,
            "max_queued_requests": 4 * (m.max_batch_size + m.max_queued_requests),
        }
        bound[m.name] = serve.deployment(ModelServer).options(**options).bind(m)
        settings[m.name] = {"default_max_tokens": m.default_max_tokens, "fingerprint": _fingerprint(m),
                            "capacity": m.max_batch_size + m.max_queued_requests}  # fmt: skip
    key_sha = hashlib.sha256(key.encode()).hexdigest() if key else None
    ingress = serve.deployment(Ingress).options(name="ingress", max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0})
    return ingress.bind(bound, settings, key_sha, cfg.docs)


def app_builder(args: dict):
    """Serve's application builder, for a Serve config file (`serve deploy`, KubeRay's RayService serveConfigV2):
    `import_path: asclepius.serve.app:app_builder` with `args: {config: <preset>, overrides: [key=value, ...]}`."""
    from asclepius.config import load_config

    cfg = load_config(args["config"], list(args.get("overrides") or ()))
    if cfg.serve is None:
        raise ServeConfigError(f"{args['config']} has no `serve` section")
    return build_app(with_published_sources(cfg))


def with_published_sources(cfg) -> ServeConfig:
    """`cfg.serve` with every model that lives in the run (`${run_dir}/...`) read from its published version."""
    from asclepius.config import PLACEHOLDER
    from asclepius.run import RunDir

    root = cfg.run_dir.rstrip("/") + "/"
    if not any(m.source.startswith(root) for m in cfg.serve.models):
        return cfg.serve
    if PLACEHOLDER in cfg.run_dir:
        raise ServeConfigError(f"run_dir is still the preset's placeholder ({cfg.run_dir}); the served model is this run's export: give "
                               "run_dir=s3://... (for a RayService, in the app's args.overrides)")  # fmt: skip
    run = RunDir.open(cfg.run_dir)
    return cfg.serve.model_copy(update={"models": [m.model_copy(update={"source": run.published_source(m.source)}) for m in cfg.serve.models]})


def serve_deploy_config(config_path: str, cfg: ServeConfig, overrides: list[str] | None = None) -> dict:
    """The Serve config (serveConfigV2 of a RayService) that deploys `cfg` from the preset at `config_path` inside
    the image: the app is built by app_builder, and each model's resources and replicas are stated where KubeRay's
    and Serve's tools show them."""
    deployments = [_placement(m) for m in cfg.models]
    return {
        "http_options": {"host": "0.0.0.0", "port": cfg.port},
        "applications": [{
            "name": cfg.app_name, "route_prefix": cfg.route_prefix, "import_path": "asclepius.serve.app:app_builder",
            "args": {"config": config_path, **({"overrides": list(overrides)} if overrides else {})}, "deployments": deployments,
        }],
    }  # fmt: skip


def start(cfg: ServeConfig) -> str:
    """Deploy the app on the connected Ray instance; returns the OpenAI base URL. If Serve already runs (another
    app, a cluster's Serve) its HTTP address wins — Serve has one proxy per node — and the URL says where."""
    from ray.serve.context import _get_global_client

    app = build_app(cfg)  # reads the key first: a missing key stops here, before anything is deployed
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    http = _get_global_client().http_config
    if (http.host, http.port) != (cfg.host, cfg.port):
        log.warning("serve: Serve already listens on %s:%s; %s is served there (serve.host/port %s:%s not applied)", http.host, http.port,
                    cfg.app_name, cfg.host, cfg.port)  # fmt: skip
    serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
    return f"http://{host}:{http.port}{cfg.route_prefix.rstrip('/')}/v1"
