"""The Ray Serve app: a FastAPI ingress (OpenAI-compatible API + the clinical `/v1/answer`) and one model
deployment per served model, each running a continuous-batching engine (asclepius.serve.engine).

    from asclepius.serve.app import start
    base_url = start(cfg.serve)          # http://127.0.0.1:8000/v1, for the `openai` client

Every request is checked at the edge (the ingress) before it reaches a model: a malformed body, a number too large,
JSON nested too deep, a lone surrogate, an unsupported field — each a 400 with an OpenAI-style error naming the
field. A request's generations (prompts × n) are admitted together or refused together with a 503 and
Retry-After when the engine is full. A client that disconnects stops its generations at the next decoding step.

Logs carry request ids, sizes and timings — never prompts, notes or answers.

By concern: asclepius.serve.edge (parsing, limits, errors), asclepius.serve.auth (the clients' key),
asclepius.serve.replica (the model deployment); here the routes, and building and starting the app.
"""

import asyncio
import hashlib
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError

from asclepius import metrics
from asclepius.config import ServeConfig, ServedModelConfig
from asclepius.recipe import load_recipe
from asclepius.serve.auth import ServeConfigError, bearer_matches, key_digest, read_serve_key
from asclepius.serve.edge import MAX_BODY_BYTES, _error, _token_entries, _validation_error, parse_body
from asclepius.serve.replica import ModelServer, answer_prompt, configure_replica_logging
from asclepius.serve.schemas import AnswerRequest, ChatCompletionRequest, CompletionRequest, RefusedField

# what callers (asclepius serve, the stage, app_builder's users, tests) import from here
__all__ = ["ServeConfigError", "app_builder", "build_app", "read_serve_key", "serve_deploy_config", "start", "with_published_sources",
           "ModelServer", "parse_body", "MAX_BODY_BYTES"]  # fmt: skip

log = logging.getLogger("asclepius.serve")
def _fingerprint(cfg: ServedModelConfig) -> str:
    return "fp_" + hashlib.sha256(f"asclepius|{cfg.name}|{cfg.source}|{cfg.dtype}".encode()).hexdigest()[:12]


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
        return bearer_matches(request.headers.get("authorization", ""), self.key_sha256)

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
                    "cut_repetition": getattr(body, "cut_repetition", False),
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
    key_sha = key_digest(key)
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
