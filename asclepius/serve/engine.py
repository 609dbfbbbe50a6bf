"""Continuous batching with HF transformers: requests join and leave the running batch between decoding steps.

One thread owns the model and loops: admit waiting requests (prefilled together, left-padded) into the running
batch, decode one token for every running request, retire the finished and the cancelled. The running batch's KV
cache is one left-padded tensor per layer with a per-row attention mask: a newcomer's cache is padded to the
batch's width (or the batch to the newcomer's) and concatenated along the batch; a retired row is dropped with an
index select; columns no row needs any more are trimmed off the left. So a 2-token request that arrives behind a
300-token one joins at the next step and leaves when it is done, and a disconnected client's generation stops at
the next step.

Each request keeps its own sampling (temperature, top_p, seed → its own torch.Generator), stop strings, logit
bias, frequency/presence penalties, guided choice, and log-probabilities. A failure while handling one request's
tokens (a bad stop string, a decode error) ends that request with an error; only a failure of the shared forward
pass fails the requests in it. Plain PyTorch: tested without Ray; the Ray Serve replica (asclepius.serve.app)
runs `Engine.start()` and feeds it.

transformers' own continuous batching (`model.init_continuous_batching`) was measured first: it takes sampling
settings once per manager (per-request temperature only if set at start, no per-request seed), and has no stop
strings, guided choice or prompt log-probabilities, which the OpenAI API and lm-eval need.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from asclepius.serve.schemas import REPEATS  # a span generated this many times in a row is a loop, not an answer

log = logging.getLogger("asclepius.serve")


class EngineOverloaded(RuntimeError):
    """More generations than the engine takes (running + waiting); the caller answers 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    request_id: str = ""
    allowed: list[list[int]] | None = None  # guided choice: the reply must be one of these token sequences
    logprobs: int | None = None  # None: none; k ≥ 0: the chosen token's log-probability and the top k
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (completions `echo` + `logprobs`)
    logit_bias: dict[int, float] = field(default_factory=dict)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    cut_repetition: bool = False  # end a degenerate loop (REPEATS copies of the same tokens) and keep one copy

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + self.max_new_tokens


LONGEST_LOOP = 128  # tokens: the longest repeated span looked for


def loop_period(tokens: list[int], repeats: int = REPEATS, longest: int = LONGEST_LOOP) -> int:
    """The length p of a span the tokens end with `repeats` times in a row (the shortest such), else 0. A model
    that says the same line (or phrase) over and over says nothing more by going on."""
    n, last = len(tokens), tokens[-1] if tokens else None
    for p in range(1, min(longest, n // repeats) + 1):
        if tokens[-1 - p] != last:  # cheap reject: the last token must recur one period back
            continue
        tail = tokens[n - p :]
        if all(tokens[n - (k + 1) * p : n - k * p] == tail for k in range(1, repeats)):
            return p
    return 0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None  # None for the first prompt token (nothing predicts it)
    top: list[tuple[int, float]]


@dataclass
class GenChunk:
    text: str  # new text since the previous chunk
    completion_tokens: int  # generated so far
    finish_reason: str | None = None  # "stop", "length" (or "repetition", when cut) on the last chunk, "error" if it failed
    logprobs: list[TokenLogprob] = field(default_factory=list)  # for the tokens whose text is in this chunk
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first chunk, if asked
    error: str | None = None


class _Row:
    """One running request: its tokens, sampling state, detokenization and stop handling."""

    def __init__(self, req: GenRequest, emit: Callable[[GenChunk], None], tokenizer, device):
        self.req, self.emit, self.tokenizer = req, emit, tokenizer
        self.tokens: list[int] = []
        self.pending_logprobs: list[TokenLogprob] = []
        self.sent = 0  # characters of text already emitted
        self.done = False
        self.cancelled = False
        self.generator = None
        if req.temperature > 0:
            self.generator = torch.Generator(device=device)
            seed = req.seed if req.seed is not None else time.time_ns()
            self.generator.manual_seed(seed % 2**64)
        self.hold = max((len(s) for s in req.stop), default=1) - 1  # never emit the start of a stop string
        self.counts: dict[int, int] = {}  # generated token counts, for the penalties
        self.position = len(req.prompt_ids)  # the position id of the next token fed
        self.logits: torch.Tensor | None = None  # the model's scores for this row's next token
        self.first_chunk_extra: list[TokenLogprob] | None = None

    def allowed_next(self, eos: int) -> list[int] | None:
        """Guided choice: the tokens that continue one of the allowed replies (eos once one is complete)."""
        if self.req.allowed is None:
            return None
        n = len(self.tokens)
        nxt = {seq[n] for seq in self.req.allowed if len(seq) > n and seq[:n] == self.tokens}
        if any(seq == self.tokens for seq in self.req.allowed) or not nxt:
            nxt.add(eos)
        return sorted(nxt)

    def adjust(self, logits: torch.Tensor, eos: int) -> torch.Tensor:
        """This request's own changes to its next-token logits (a 1-D view)."""
        r = self.req
        if r.logit_bias:
            ids = torch.tensor(list(r.logit_bias), device=logits.device)
            logits[ids] += torch.tensor(list(r.logit_bias.values()), dtype=logits.dtype, device=logits.device)
        if (r.frequency_penalty or r.presence_penalty) and self.counts:
            ids = torch.tensor(list(self.counts), device=logits.device)
            counts = torch.tensor(list(self.counts.values()), dtype=logits.dtype, device=logits.device)
            logits[ids] -= counts * r.frequency_penalty + r.presence_penalty  # OpenAI's formula
        allowed = self.allowed_next(eos)
        if allowed is not None:
            keep = logits[allowed].clone()
            logits.fill_(float("-inf"))
            logits[allowed] = keep
        return logits

    def step(self, token: int, eos_ids: set[int], logprob: TokenLogprob | None) -> None:
        """Take one generated token; emit a chunk (possibly empty text) unless text is held back."""
        finish = None
        if token in eos_ids:
            finish = "stop"
        else:
            self.tokens.append(token)
            self.counts[token] = self.counts.get(token, 0) + 1
            if logprob is not None:
                self.pending_logprobs.append(logprob)
        if finish is None and self.req.cut_repetition and (period := loop_period(self.tokens)):
            del self.tokens[len(self.tokens) - (REPEATS - 1) * period :]  # one copy stays
            finish = "repetition"
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for stop in self.req.stop:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at != -1:
                text, finish = text[:at], "stop"
        if finish is None and len(self.tokens) >= self.req.max_new_tokens:
            finish = "length"
        if finish is None:
            end = len(text) - self.hold  # hold back a possible stop-string prefix and an incomplete UTF-8 character
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
        else:
            end = len(text)
            self.done = True
        end = max(end, self.sent)
        delta, self.sent = text[self.sent : end], end
        chunk = GenChunk(delta, len(self.tokens), finish, logprobs=self.pending_logprobs if (delta or finish) else [])
        if delta or finish:
            self.pending_logprobs = []
        if self.first_chunk_extra is not None:
            chunk.prompt_logprobs, self.first_chunk_extra = self.first_chunk_extra, None
        self.emit(chunk)

    def fail(self, message: str) -> None:
        self.done = True
        try:
            self.emit(GenChunk("", len(self.tokens), "error", error=message))
        except Exception:  # the receiver itself is broken: the request just ends
            log.warning("request %s: its error could not be delivered", self.req.request_id)


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering of one row: keep the smallest set of tokens whose probability reaches top_p."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    remove = probs.cumsum(-1) - probs > top_p
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _logprob_entry(token: int, logprobs: torch.Tensor, k: int) -> TokenLogprob:
    top = []
    if k:
        values, ids = torch.topk(logprobs, k)
        top = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist())]
    return TokenLogprob(token, float(logprobs[token]), top)


class _Batch:
    """The running rows and their shared, left-padded KV cache and attention mask."""

    def __init__(self):
        self.rows: list[_Row] = []
        self.cache = None  # transformers DynamicCache with tensors (rows, heads, width, dim) per layer
        self.mask: torch.Tensor | None = None  # (rows, width) 1 where a row has a real token

    @staticmethod
    def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
        extra = width - t.shape[dim]
        if extra <= 0:
            return t
        shape = list(t.shape)
        shape[dim] = extra
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    def merge(self, rows: list[_Row], cache, mask: torch.Tensor) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([self._pad_left(mine.keys, width, 2), self._pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([self._pad_left(mine.values, width, 2), self._pad_left(theirs.values, width, 2)])
        self.mask = torch.cat([self._pad_left(self.mask, width, 1), self._pad_left(mask, width, 1)])
        self.rows += rows

    def keep(self, keep: list[int]) -> None:
        """Keep these rows (by index); then trim the columns no remaining row attends to."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask = self.mask.index_select(0, index)
        first = int(self.mask.any(0).int().argmax())  # the first column any row still uses
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        self.mask = self.mask[:, first:]


def _cache_of(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


class Engine:
    def __init__(self, model, tokenizer, max_context: int | None = None, max_batch_size: int = 16, max_batch_tokens: int = 32768,
                 max_waiting: int = 64):  # fmt: skip
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_context = max_context or getattr(model.config, "max_position_embeddings", 2048)
        self.max_batch_size, self.max_batch_tokens, self.max_waiting = max_batch_size, max_batch_tokens, max_waiting
        eos = tokenizer.eos_token_id
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_ids = {e for e in ([eos] + (gen_eos if isinstance(gen_eos, list) else [gen_eos])) if e is not None}
        self.eos = min(self.eos_ids) if self.eos_ids else 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
        self.batch = _Batch()
        self.waiting: deque[_Row] = deque()
        self.lock = threading.Condition()
        self.cancelled: set[str] = set()
        self.batches: deque[int] = deque(maxlen=1000)  # rows in the latest decoding steps (observability and tests)
        self.steps = 0
        self._thread: threading.Thread | None = None
        self._stop = False
        self.step_seconds: deque[float] = deque(maxlen=200)
        # transformers renamed the KV cache argument and output from past_key_values to cache (5.2x); take either
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    # ------------------------------------------------------------------------------------------- submitting
    def load(self) -> tuple[int, int]:
        with self.lock:
            return len(self.batch.rows), len(self.waiting)

    def submit(self, requests: list[GenRequest], emits: list[Callable[[GenChunk], None]]) -> None:
        """Queue generations, all or none: if they do not fit (running + waiting), EngineOverloaded."""
        with self.lock:
            capacity = self.max_batch_size + self.max_waiting
            taken = len(self.batch.rows) + len(self.waiting)
            if taken + len(requests) > capacity:
                raise EngineOverloaded(f"{taken} generations running or waiting, {len(requests)} more asked, room for {capacity}",
                                       self.retry_after())  # fmt: skip
            for req, emit in zip(requests, emits):
                self.waiting.append(_Row(req, emit, self.tokenizer, self.device))
            self.lock.notify()

    def retry_after(self) -> float:
        """A client's wait before retrying: the time for the running and waiting rows' tokens at the recent step rate."""
        step = sum(self.step_seconds) / len(self.step_seconds) if self.step_seconds else 0.05
        remaining = [r.req.max_new_tokens - len(r.tokens) for r in self.batch.rows] or [1]
        return max(1.0, min(60.0, step * (sorted(remaining)[len(remaining) // 2] + len(self.waiting))))

    def cancel(self, request_id: str) -> None:
        """Stop a request (its client went away): removed at the next step, nothing more is emitted."""
        with self.lock:
            self.cancelled.add(request_id)
            self.lock.notify()

    # ------------------------------------------------------------------------------------------- the loop
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="asclepius-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.lock:
            self._stop = True
            self.lock.notify()
        if self._thread:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self._stop and not self.waiting and not self.batch.rows:
                    self.lock.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception:  # never let the engine thread die: the step already failed its rows
                log.exception("engine step failed")

    def run_until_done(self) -> None:
        """Drive the loop in this thread until nothing is left (tests, benchmarks, offline use)."""
        while self.waiting or self.batch.rows:
            self.step()

    def generate(self, requests: list[GenRequest]) -> list[tuple[str, int, str]]:
        """Offline: (text, completion tokens, finish reason) per request, in this thread."""
        texts, results = [""] * len(requests), [("", 0, "length")] * len(requests)

        def emitter(i):
            def emit(chunk):
                texts[i] += chunk.text
                if chunk.finish_reason:
                    results[i] = (texts[i], chunk.completion_tokens, chunk.finish_reason)

            return emit

        self.submit(requests, [emitter(i) for i in range(len(requests))])
        self.run_until_done()
        return results

    # ------------------------------------------------------------------------------------------- one step
    @torch.inference_mode()
    def step(self) -> None:
        """Admit newcomers (prefill), sample one token for every row from its next-token logits, retire the rows
        that finished, and run one decoding forward for the rest: every row's cache then holds all its tokens and
        its logits predict its next one."""
        started = time.perf_counter()
        self._retire_cancelled()
        self._admit()
        rows = self.batch.rows
        if not rows:
            return
        fed = []
        for r in rows:
            try:
                token = self._pick(r)
                r.step(token, self.eos_ids, self._logprob(r, token))
                fed.append(token)
            except Exception as err:  # confined to this request
                log.exception("request %s failed while sampling", r.req.request_id)
                r.fail(f"{type(err).__name__} while generating")
                fed.append(self.eos)
        keep = [i for i, r in enumerate(rows) if not r.done]
        tokens = [fed[i] for i in keep]
        self.batches.append(len(rows))
        self.batch.keep(keep)
        if self.batch.rows:
            self._decode(tokens)
        self.steps += 1
        self.step_seconds.append(time.perf_counter() - started)

    def _pick(self, r: _Row) -> int:
        logits = r.adjust(r.logits.clone(), self.eos)
        if r.req.temperature <= 0:
            return int(logits.argmax())
        scaled = logits / r.req.temperature
        if r.req.top_p < 1.0:
            scaled = _filter_top_p(scaled, r.req.top_p)
        return int(torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=r.generator))

    @staticmethod
    def _logprob(r: _Row, token: int) -> TokenLogprob | None:
        if r.req.logprobs is None:
            return None
        return _logprob_entry(token, torch.log_softmax(r.logits, dim=-1), r.req.logprobs)  # the model's own distribution

    def _decode(self, tokens: list[int]) -> None:
        b = self.batch
        ids = torch.tensor(tokens, device=self.device)[:, None]
        positions = torch.tensor([r.position for r in b.rows], device=self.device)[:, None]
        b.mask = torch.cat([b.mask, torch.ones((len(b.rows), 1), dtype=b.mask.dtype, device=b.mask.device)], dim=1)
        try:
            out = self.model(input_ids=ids, attention_mask=b.mask, position_ids=positions, use_cache=True, **{self._cache_arg: b.cache})
        except Exception as err:  # the shared forward: every request in it fails, the engine goes on
            log.exception("decoding step of %d requests failed", len(b.rows))
            for r in b.rows:
                r.fail(f"{type(err).__name__} in the batch's forward pass")
            b.keep([])
            return
        b.cache = _cache_of(out)
        for i, r in enumerate(b.rows):
            r.logits = out.logits[i, -1, :].float()
            r.position += 1

    def _retire_cancelled(self) -> None:
        with self.lock:
            cancelled, self.cancelled = self.cancelled, set()
            if cancelled:
                self.waiting = deque(r for r in self.waiting if r.req.request_id not in cancelled)
        if cancelled:
            for r in self.batch.rows:
                if r.req.request_id in cancelled:
                    r.done = r.cancelled = True
            self.batch.keep([i for i, r in enumerate(self.batch.rows) if not r.done])

    def _admit(self) -> None:
        """Move waiting requests into the batch while rows and the padded token budget allow, prefilled together."""
        newcomers: list[_Row] = []
        with self.lock:
            while self.waiting and len(self.batch.rows) + len(newcomers) < self.max_batch_size:
                cand = self.waiting[0]
                if newcomers and cand.req.prompt_logprobs is not None:
                    break  # a prompt-logprobs request is prefilled alone (it needs every position's logits)
                group = self.batch.rows + newcomers + [cand]
                need = len(group) * max(len(r.req.prompt_ids) + r.req.max_new_tokens for r in group)
                if (self.batch.rows or newcomers) and need > self.max_batch_tokens:
                    break  # the padded batch would exceed the token budget: it waits for rows to finish
                newcomers.append(self.waiting.popleft())
                if cand.req.prompt_logprobs is not None:
                    break
        if newcomers:
            try:
                self._prefill(newcomers)
            except Exception as err:
                log.exception("prefill of %d requests failed", len(newcomers))
                for r in newcomers:
                    r.fail(f"{type(err).__name__} in the prefill")

    def _prefill(self, rows: list[_Row]) -> None:
        width = max(len(r.req.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every prompt ends at the last column
            ids[i, width - len(r.req.prompt_ids) :] = torch.tensor(r.req.prompt_ids)
            mask[i, width - len(r.req.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        every = rows[0].req.prompt_logprobs is not None
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=0 if every else 1)
        if every:
            r, k = rows[0], rows[0].req.prompt_logprobs
            lp = torch.log_softmax(out.logits[0].float(), dim=-1)
            r.first_chunk_extra = [TokenLogprob(r.req.prompt_ids[0], None, [])] + [
                _logprob_entry(t, lp[i], k) for i, t in enumerate(r.req.prompt_ids[1:])
            ]
        for i, r in enumerate(rows):
            r.logits = out.logits[i, -1, :].float()
        self.batch.merge(rows, _cache_of(out), mask)
