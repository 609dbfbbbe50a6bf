"""Batched generation with HF transformers: several requests share every forward pass.

Each request keeps its own sampling settings (temperature, top_p, seed, max tokens, stop strings): prompts are
left-padded into one batch, prefilled together, then decoded one token per step for the whole batch with a KV
cache. `generate_stream` yields, per step, one chunk per request (None once a request has finished), so the same
loop serves streaming and non-streaming calls. Plain PyTorch: tested without Ray; Ray Serve's `@serve.batch`
decides which requests form a batch.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    request_id: str = ""
    slot_tokens: int = 0  # the least a request counts for in a padding-aware batch (see serve.app)
    allowed: list[list[int]] | None = None  # guided choice: the reply must be one of these token sequences

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + self.max_new_tokens


@dataclass
class GenChunk:
    text: str  # new text since the previous chunk
    completion_tokens: int  # generated so far
    finish_reason: str | None = None  # "stop" or "length" on the last chunk


class _RowState:
    def __init__(self, req: GenRequest, tokenizer, device):
        self.req = req
        self.tokens: list[int] = []
        self.sent = 0  # characters of text already emitted
        self.done = False
        self.generator = None
        if req.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(req.seed if req.seed is not None else int(time.time_ns() % (2**63)))
        self.tokenizer = tokenizer
        self.hold = max((len(s) for s in req.stop), default=1) - 1  # never emit the start of a stop string

    def allowed_next(self, eos: int) -> list[int] | None:
        """Guided choice: the tokens that continue one of the allowed replies (eos once one is complete)."""
        if self.req.allowed is None:
            return None
        n = len(self.tokens)
        nxt = {seq[n] for seq in self.req.allowed if len(seq) > n and seq[:n] == self.tokens}
        if any(seq == self.tokens for seq in self.req.allowed) or not nxt:
            nxt.add(eos)
        return sorted(nxt)

    def step(self, token: int, eos_ids: set[int]) -> GenChunk:
        finish = None
        if token in eos_ids:
            finish = "stop"
        else:
            self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for stop in self.req.stop:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if stop and at != -1:
                text, finish = text[:at], "stop"
        if finish is None and len(self.tokens) >= self.req.max_new_tokens:
            finish = "length"
        if finish is None:
            # hold back an incomplete UTF-8 character and a possible stop-string prefix
            end = len(text) - self.hold
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
        else:
            end = len(text)
            self.done = True
        end = max(end, self.sent)
        delta, self.sent = text[self.sent : end], end
        return GenChunk(delta, len(self.tokens), finish)


def _filter_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per-row nucleus filtering: keep the smallest set of tokens whose probability reaches top_p."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    cumulative = probs.cumsum(dim=-1)
    remove = cumulative - probs > top_p[:, None]  # a token is kept if the mass before it is below top_p
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Engine:
    def __init__(self, model, tokenizer, max_context: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_context = max_context or getattr(model.config, "max_position_embeddings", 2048)
        eos = tokenizer.eos_token_id
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_ids = {e for e in ([eos] + (gen_eos if isinstance(gen_eos, list) else [gen_eos])) if e is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
        self.batches: deque[int] = deque(maxlen=1000)  # sizes of the latest batches (observability and tests)

    @torch.inference_mode()
    def generate_stream(self, requests: list[GenRequest]) -> Iterator[list[GenChunk | None]]:
        self.batches.append(len(requests))
        rows = [_RowState(r, self.tokenizer, self.device) for r in requests]
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):  # left padding: every prompt ends at the last column
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        temperature = torch.tensor([max(r.temperature, 1e-6) for r in requests], device=self.device)
        greedy = [r.temperature <= 0 for r in requests]
        top_p = torch.tensor([r.top_p for r in requests], device=self.device)

        # logits_to_keep=1: only the last position's logits are needed, not a (batch, prompt, vocab) tensor
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache, logits = out.cache, out.logits[:, -1, :].float()
        last_pos = positions[:, -1]
        sampling = [i for i, g in enumerate(greedy) if not g]
        nucleus = any(requests[i].top_p < 1.0 for i in sampling)
        eos = min(self.eos_ids) if self.eos_ids else self.pad_id
        for _ in range(max(r.max_new_tokens for r in requests)):
            for i, row in enumerate(rows):  # guided choice: only tokens that keep the reply one of the choices
                allowed = None if row.done else row.allowed_next(eos)
                if allowed is not None:
                    keep = logits[i, allowed]
                    logits[i] = float("-inf")
                    logits[i, allowed] = keep
            next_tokens = logits.argmax(dim=-1).tolist()  # greedy rows (and finished ones, whose tokens are ignored)
            if sampling:  # softmax (and the nucleus sort) only for the rows that sample
                scaled = logits[sampling] / temperature[sampling, None]
                if nucleus:
                    scaled = _filter_top_p(scaled, top_p[sampling])
                probs = torch.softmax(scaled, dim=-1)
                for j, i in enumerate(sampling):
                    if not rows[i].done:
                        next_tokens[i] = int(torch.multinomial(probs[j], 1, generator=rows[i].generator))
            chunks: list[GenChunk | None] = []
            for row, token in zip(rows, next_tokens):
                chunks.append(None if row.done else row.step(token, self.eos_ids))
            yield chunks
            if all(r.done for r in rows):
                return
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=self.device)], dim=1)
            last_pos = last_pos + 1
            step_ids = torch.tensor(next_tokens, device=self.device)[:, None]
            out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=last_pos[:, None], cache=cache, use_cache=True)
            cache, logits = out.cache, out.logits[:, -1, :].float()

    def generate(self, requests: list[GenRequest]) -> list[tuple[str, int, str]]:
        """Non-streaming: (text, completion tokens, finish reason) per request."""
        texts = [""] * len(requests)
        results: list[tuple[str, int, str]] = [("", 0, "length")] * len(requests)
        for step in self.generate_stream(requests):
            for i, chunk in enumerate(step):
                if chunk is not None:
                    texts[i] += chunk.text
                    if chunk.finish_reason:
                        results[i] = (texts[i], chunk.completion_tokens, chunk.finish_reason)
        return results
