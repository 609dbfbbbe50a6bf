"""The teacher client: one chat-completion request, rate-limited, retried by status, journaled exactly once.

Plain asyncio + the `openai` client; the limiter is either the cluster's Ray actor (`ActorLimiter`) or an
in-process one (`LocalLimiter`, for a single process and for tests). Prompts and completions never reach a log:
log lines carry request keys (hashes), statuses, token counts and timings.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

import openai

from asclepius import metrics
from asclepius.coalesced import Coalesced
from asclepius.config import TeacherConfig
from asclepius.teacher.cost import TokenCounter, cost_usd, price_for
from asclepius.teacher.ledger import Ledger, LedgerScan, request_key
from asclepius.teacher.limiter import RateLimiter, retry_after_seconds

log = logging.getLogger("asclepius.teacher")

RETRYABLE_STATUS = {408, 409, 429}  # and every 5xx


def is_retryable(status: int | None) -> bool:
    return status is None or status in RETRYABLE_STATUS or status >= 500


class TeacherConfigError(ValueError):
    pass


class PrivacyError(PermissionError):
    pass


class TeacherAuthError(PermissionError):
    """401/403: no row can succeed with this key; the stage stops instead of recording every row as failed."""


# ----------------------------------------------------------------------------------------------- endpoint
def endpoint_id(cfg: TeacherConfig) -> str:
    """Where requests go (the limiter is per endpoint: a quota belongs to an address)."""
    if cfg.provider == "azure":
        return f"azure:{cfg.azure_endpoint}/{cfg.azure_deployment}"
    if cfg.provider == "openai_compatible":
        return f"compatible:{cfg.base_url}"
    return f"openai:{cfg.base_url or 'https://api.openai.com/v1'}"


def key_identity(cfg: TeacherConfig) -> str:
    """What a request's ledger key says about who answers: the model (and for Azure its deployment), not the host —
    the same model moved to another address is not asked (and paid) again — unless `key_includes_endpoint`."""
    if cfg.key_includes_endpoint:
        return endpoint_id(cfg)
    if cfg.provider == "azure":
        return f"azure-deployment:{cfg.azure_deployment}"
    return f"{'openai' if cfg.provider == 'openai' else 'compatible'}-model"


def default_api_key_env(cfg: TeacherConfig) -> str | None:
    return cfg.api_key_env or {"openai": "OPENAI_API_KEY", "azure": "AZURE_OPENAI_API_KEY"}.get(cfg.provider)


def is_public_openai(cfg: TeacherConfig) -> bool:
    if cfg.provider == "openai":
        return True
    host = urlparse(cfg.base_url or "").hostname or ""
    return cfg.provider == "openai_compatible" and (host == "api.openai.com" or host.endswith(".openai.com"))


def is_self_hosted(cfg: TeacherConfig) -> bool:
    return cfg.provider == "openai_compatible" and not is_public_openai(cfg)


def check_privacy(cfg: TeacherConfig, credentialed_rows: int, sources: set[str] = frozenset()) -> None:
    """PhysioNet's rules: credentialed notes (MIMIC, or any source flagged credentialed, and everything made from
    them) never go to the public OpenAI API, unless overridden. `credentialed_rows` counts the rows whose provenance
    flag is set; `sources` are the rows' source names, refused too if listed in teacher.credentialed_sources."""
    named = sorted(set(sources) & set(cfg.credentialed_sources))
    if not (credentialed_rows or named) or not is_public_openai(cfg):
        return
    what = f"{credentialed_rows} rows of credentialed provenance" + (f" (sources {named})" if named else "")
    if not cfg.i_have_permission_to_send_credentialed_notes_to_public_openai:
        raise PrivacyError(
            f"refusing to send {what} to the public OpenAI API (PhysioNet's data use agreement). Use Azure OpenAI "
            "with human review opted out, or a self-hosted teacher (provider: openai_compatible). With written "
            "permission only, set teacher.i_have_permission_to_send_credentialed_notes_to_public_openai=true."
        )
    log.warning(
        "!!! SENDING %s TO THE PUBLIC OPENAI API: "
        "teacher.i_have_permission_to_send_credentialed_notes_to_public_openai is set !!!",
        what.upper(),
    )


def check_batch_privacy(cfg: TeacherConfig, credentialed_rows: int) -> None:
    """Batch files stay with the provider (input and output, for days): credentialed notes only under a
    zero-retention agreement, whatever the provider."""
    if cfg.mode == "batch" and credentialed_rows and not cfg.batch_zero_retention_agreement:
        raise PrivacyError(
            f"refusing to put {credentialed_rows} rows of credentialed provenance in Batch API files: the provider keeps "
            "batch input and output files, which PhysioNet's data use agreement does not allow. Use online mode, or set "
            "teacher.batch_zero_retention_agreement=true only under a zero-data-retention agreement with the provider."
        )


def read_api_key(cfg: TeacherConfig) -> str:
    if cfg.api_key_file:
        try:
            with open(os.path.expanduser(cfg.api_key_file), encoding="utf-8") as f:
                key = f.read().strip()
        except FileNotFoundError:
            raise TeacherConfigError(f"teacher.api_key_file: no such file: {cfg.api_key_file}") from None
        if not key:
            raise TeacherConfigError(f"teacher.api_key_file: {cfg.api_key_file} is empty")
        return key
    env = default_api_key_env(cfg)
    key = os.environ.get(env or "", "")
    if key:
        return key
    if cfg.provider == "openai_compatible" and not cfg.api_key_env:
        return "EMPTY"  # a self-hosted server without auth (the openai client needs a non-empty string)
    raise TeacherConfigError(
        f"no API key: set the environment variable {env} (teacher.api_key_env) or teacher.api_key_file"
    )


def make_openai_client(cfg: TeacherConfig) -> openai.AsyncOpenAI:
    key = read_api_key(cfg)
    common = dict(api_key=key, max_retries=0, timeout=cfg.timeout_s)  # retries happen here, counted once
    if cfg.provider == "azure":
        return openai.AsyncAzureOpenAI(
            azure_endpoint=cfg.azure_endpoint, azure_deployment=cfg.azure_deployment, api_version=cfg.api_version, **common
        )
    return openai.AsyncOpenAI(base_url=cfg.base_url, **common)


def token_counter(cfg: TeacherConfig) -> TokenCounter:
    method = cfg.token_counter
    if method == "auto":
        method = "hf" if cfg.tokenizer else ("tiktoken" if cfg.provider in ("openai", "azure") else "bytes")
    return TokenCounter(method=method, model=cfg.model, tokenizer_path=cfg.tokenizer)


def default_limiter_name(cfg: TeacherConfig) -> str:
    digest = hashlib.sha256(f"{endpoint_id(cfg)}|{cfg.model}".encode()).hexdigest()[:12]
    return cfg.limiter_name or f"asclepius-limiter-{digest}"


# ----------------------------------------------------------------------------------------------- limiters
class LocalLimiter:
    """The limiter in this process (one process, tests); same async interface as ActorLimiter."""

    def __init__(self, limiter: RateLimiter):
        self.limiter = limiter

    async def reserve(self, tokens: int, completion_tokens: int | None = None) -> tuple[int, float]:
        return self.limiter.reserve(tokens, completion_tokens)

    async def settle(self, ticket, prompt_tokens, completion_tokens, cost=0.0, max_tokens=None):
        self.limiter.settle(ticket, prompt_tokens, completion_tokens, cost, max_tokens)

    async def finished(self, ok: bool):
        self.limiter.finished(ok)

    async def release(self, ticket):
        self.limiter.release(ticket)

    async def feedback(self, status, headers, retrying):
        self.limiter.feedback(status, headers, retrying)

    async def snapshot(self) -> dict:
        return self.limiter.snapshot()


class ActorLimiter:
    """The cluster's one limiter, a named Ray actor shared by every worker.

    Calls are coalesced: while one call to the actor is in flight, the reservations (and, apart, the reports:
    settle, release, feedback, finished) made meanwhile wait and go together in the next one. A request costs the
    actor a fraction of a call instead of four (a self-hosted teacher answering hundreds a second made the
    per-request round trips the pipeline's pace); a lone request still goes at once. Each call returns only once
    the actor has applied it, as before."""

    def __init__(self, actor):
        self.actor = actor
        self._reserve = Coalesced(lambda items: self.actor.reserve_many.remote(items))
        self._report = Coalesced(lambda items: self.actor.apply.remote(items))

    async def reserve(self, tokens, completion_tokens=None):
        return tuple(await self._reserve.submit((tokens, completion_tokens)))

    async def _apply(self, name: str, *args) -> None:
        error = await self._report.submit((name, args))
        if error:
            raise RuntimeError(f"the rate limiter refused {name}: {error}")

    async def settle(self, ticket, prompt_tokens, completion_tokens, cost=0.0, max_tokens=None):
        await self._apply("settle", ticket, prompt_tokens, completion_tokens, cost, max_tokens)

    async def finished(self, ok: bool):
        await self._apply("finished", ok)

    async def release(self, ticket):
        await self._apply("release", ticket)

    async def feedback(self, status, headers, retrying):
        await self._apply("feedback", status, headers, retrying)

    async def snapshot(self):
        return await self.actor.snapshot.remote()


# ----------------------------------------------------------------------------------------------- requests
@dataclass
class ChatRequest:
    messages: list[dict]
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    seed: int | None = None
    n: int = 1
    stage: str = ""
    sample_index: Any = None
    answer: dict | None = None  # {"note", "question"}: our Serve app's /v1/answer instead of chat completions
    extra_body: dict | None = None  # provider extensions, e.g. vLLM's guided_choice

    def params(self) -> dict:
        params = {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "n": self.n}
        return {**params, "extra_body": self.extra_body} if self.extra_body else params

    def key(self, endpoint: str, model: str) -> str:
        content = self.messages if self.answer is None else [{"answer": self.answer}]
        return request_key(endpoint, model, content, self.params(), self.stage, self.sample_index)

    def prompt_tokens(self, counter: TokenCounter) -> int:
        if self.answer is not None:  # the server wraps note and question in the recipe's model prompt (~90 tokens)
            return counter.count_text(self.answer["note"]) + counter.count_text(self.answer["question"]) + 96
        return counter.count_messages(self.messages)


@dataclass
class ChatOutcome:
    key: str
    status: str  # "ok" or "error"
    texts: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float = 0.0
    http_status: int | None = None
    error: str | None = None  # a class of error and the server's short code, never request text
    retryable: bool = False
    attempts: int = 0
    cached: bool = False  # answered from the ledger, not sent

    @property
    def text(self) -> str | None:
        return self.texts[0] if self.texts else None

    @property
    def finish_reason(self) -> str | None:
        return self.finish_reasons[0] if self.finish_reasons else None

    def record(self) -> dict:
        rec = asdict(self)
        rec.pop("cached")
        rec["ts"] = time.time()
        return rec

    @classmethod
    def from_record(cls, rec: dict) -> ChatOutcome:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in rec.items() if k in names}, cached=True)


def _error_code(err: openai.APIStatusError) -> str:
    body = err.body if isinstance(err.body, dict) else {}
    nested = body.get("error") if isinstance(body.get("error"), dict) else {}
    code = body.get("code") or nested.get("code")
    return f"http {err.status_code}" + (f" {code}" if code else "")


RAW_RESPONSE_HEADER = "X-Stainless-Raw-Response"  # openai's own switch to a raw response (openai/_constants.py)


def parse_chat_completion(data) -> tuple[list[str], list[str], int | None, int | None]:
    """A chat completion's texts and finish reasons (in choice order) and its token usage. Raises ValueError on a body
    that is not one (a 200 that a broken proxy or server answered): the request is retried as malformed."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices):
        raise ValueError("not a chat completion")
    choices = sorted(choices, key=lambda c: c.get("index") if isinstance(c.get("index"), int) else 0)
    texts = [c["message"].get("content") or "" for c in choices]
    reasons = [c.get("finish_reason") or "" for c in choices]
    if not all(isinstance(t, str) and isinstance(r, str) for t, r in zip(texts, reasons)):
        raise ValueError("not a chat completion")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    counts = [usage.get(k) for k in ("prompt_tokens", "completion_tokens")]
    prompt_tokens, completion_tokens = (n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None for n in counts)
    return texts, reasons, prompt_tokens, completion_tokens


class TeacherClient:
    def __init__(
        self,
        cfg: TeacherConfig,
        limiter,
        ledger: Ledger | None = None,
        finished: LedgerScan | None = None,
        client: openai.AsyncOpenAI | None = None,
    ):
        self.cfg = cfg
        self.limiter = limiter
        self.ledger = ledger
        self.finished = (finished or (ledger.scan() if ledger else None))
        self.client = client or make_openai_client(cfg)
        self.counter = token_counter(cfg)
        self.endpoint = key_identity(cfg)
        self.price = price_for(cfg.model, {k: (p.prompt_per_1m, p.completion_per_1m) for k, p in cfg.prices.items()}, is_self_hosted(cfg))

    async def aclose(self) -> None:
        await self.client.close()

    def key(self, req: ChatRequest) -> str:
        return req.key(self.endpoint, self.cfg.model)

    def reservation(self, req: ChatRequest) -> int:
        return req.prompt_tokens(self.counter) + req.max_tokens * req.n

    async def _send(self, req: ChatRequest, key: str):
        """One HTTP request: (status, headers, texts, finish reasons, prompt tokens, completion tokens)."""
        headers = {"x-asclepius-request-key": key}
        if req.answer is not None:
            body = {"model": self.cfg.model, "note": req.answer["note"], "question": req.answer["question"],
                    "max_tokens": req.max_tokens, "temperature": req.temperature}  # fmt: skip
            for name in ("top_p", "seed"):
                if getattr(req, name) is not None:
                    body[name] = getattr(req, name)
            for name in ("stop", "cut_repetition"):  # the caller's generation settings, when it states them
                if name in req.answer:
                    body[name] = req.answer[name]
            # the openai client's own request path (auth, timeouts, errors as APIStatusError), JSON read here; our
            # app sends no rate-limit headers, so none are lost by reading the body as text
            data = json.loads(await self.client.post("/answer", cast_to=str, body=body, options={"headers": headers}))
            if not isinstance(data, dict) or not isinstance(data.get("answer"), str):
                raise ValueError("not an /v1/answer response")
            usage = data.get("usage") or {}
            return (200, {}, [data["answer"]], [data.get("finish_reason") or ""], usage.get("prompt_tokens"),
                    usage.get("completion_tokens"))  # fmt: skip
        # The chat request as JSON through the openai client's own request path (auth, Azure's deployment URLs,
        # timeouts, errors as APIStatusError), its reply parsed here: the client's typed-parameter transform and its
        # response models cost ~0.5 of the ~1.9 ms of CPU a request took it, which at a self-hosted teacher's pace
        # is the stage's pace (benchmarks/pipeline_scale.py). The raw-response header is how the client's own
        # `with_raw_response` returns the status and headers (the limiter reads the provider's rate-limit headers).
        body = {"model": self.cfg.model, "messages": req.messages, "max_tokens": req.max_tokens, "temperature": req.temperature, "n": req.n}
        for name in ("top_p", "seed"):
            if getattr(req, name) is not None:
                body[name] = getattr(req, name)
        body.update(req.extra_body or {})  # provider extensions at the top level, as the client's extra_body puts them
        raw = await self.client.post("/chat/completions", cast_to=str, body=body,
                                     options={"headers": {**headers, RAW_RESPONSE_HEADER: "true"}})  # fmt: skip
        texts, reasons, prompt_tokens, completion_tokens = parse_chat_completion(json.loads(raw.text))
        return raw.status_code, dict(raw.headers), texts, reasons, prompt_tokens, completion_tokens

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        delay = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** (attempt - 1))
        return delay * (0.5 + random.random() / 2)  # jitter: workers that failed together do not retry together

    async def complete(self, req: ChatRequest) -> ChatOutcome:
        key = self.key(req)
        if self.finished and key in self.finished.records:
            return ChatOutcome.from_record(self.finished.records[key])
        tokens = self.reservation(req)
        outcome = ChatOutcome(key=key, status="error")
        for attempt in range(1, self.cfg.max_attempts + 1):
            outcome.attempts = attempt
            ticket, delay = await self.limiter.reserve(tokens, req.max_tokens * req.n)
            if delay > 0:
                await asyncio.sleep(delay)
            status, headers, retry_after = None, {}, None
            try:
                status, headers, texts, reasons, prompt_tokens, completion_tokens = await self._send(req, key)
                outcome.texts, outcome.finish_reasons = texts, reasons
                outcome.prompt_tokens, outcome.completion_tokens = prompt_tokens, completion_tokens
                outcome.cost_usd = cost_usd(outcome.prompt_tokens or 0, outcome.completion_tokens or 0, self.price)
                outcome.status, outcome.http_status, outcome.error, outcome.retryable = "ok", status, None, False
                await self.limiter.settle(ticket, outcome.prompt_tokens, outcome.completion_tokens, outcome.cost_usd, req.max_tokens * req.n)
                await self.limiter.feedback(status, headers, False)
                metrics.teacher_request(req.stage, "ok", prompt_tokens, completion_tokens, outcome.cost_usd)
                break
            except openai.APIStatusError as err:
                status, headers = err.status_code, dict(err.response.headers)
                retry_after = retry_after_seconds(headers)
                outcome.http_status, outcome.error = status, _error_code(err)
            except openai.APITimeoutError:
                outcome.http_status, outcome.error = None, "timeout"
            except openai.APIConnectionError:
                outcome.http_status, outcome.error = None, "connection error"
            except (openai.APIResponseValidationError, ValueError, RecursionError) as err:  # a 200 whose body is not a completion
                # (RecursionError: JSON nested deeper than the parser goes)
                status = 200
                outcome.http_status, outcome.error = 200, f"malformed response ({type(err).__name__})"
            outcome.retryable = is_retryable(status) or outcome.error.startswith("malformed")
            retrying = outcome.retryable and attempt < self.cfg.max_attempts
            await self.limiter.release(ticket)
            await self.limiter.feedback(status, headers, retrying)
            metrics.teacher_request(req.stage, str(status) if status else outcome.error, retrying=retrying)
            log.info("teacher %s key=%s attempt %d: %s%s", req.stage, key[:12], attempt, outcome.error, ", retrying" if retrying else "")
            if status in (401, 403):  # the key is wrong for every row: stop the stage, journal nothing
                raise TeacherAuthError(f"teacher {self.cfg.model} at {endpoint_id(self.cfg)} refused the API key ({outcome.error}); "
                                       f"check teacher.api_key_env / api_key_file")  # fmt: skip
            if not retrying:
                break
            await asyncio.sleep(self._backoff(attempt, retry_after))
        await self.limiter.finished(outcome.status == "ok")
        if self.ledger is not None:
            await self.ledger.commit(outcome.record())  # durable before it counts
        return outcome
