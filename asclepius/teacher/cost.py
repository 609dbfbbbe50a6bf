"""Counting tokens and dollars before and while a stage spends them."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache

log = logging.getLogger("asclepius.teacher")

# USD per 1M tokens (prompt, completion), list prices of OpenAI / Azure OpenAI pay-as-you-go. Prices change:
# override or extend them with `teacher.prices` in the config. Self-hosted endpoints cost 0 unless priced there.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-3.5-turbo": (0.50, 1.50),
    "gpt-4": (30.00, 60.00),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
}
# Chat formatting adds a few tokens per message and per reply (OpenAI's cookbook: 3 per message + 3 for the reply).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3


class BudgetExceeded(RuntimeError):
    pass


def price_for(model: str, overrides: dict[str, tuple[float, float]], self_hosted: bool) -> tuple[float, float]:
    if model in overrides:
        return overrides[model]
    if self_hosted:
        return (0.0, 0.0)
    # dated snapshots (gpt-4o-2024-08-06) cost what their family costs: the longest matching prefix wins
    for name in sorted(DEFAULT_PRICES, key=len, reverse=True):
        if model.startswith(name):
            return DEFAULT_PRICES[name]
    log.warning("no price known for model %s; cost is reported as 0 — set teacher.prices", model)
    return (0.0, 0.0)


def cost_usd(prompt_tokens: int, completion_tokens: int, price: tuple[float, float]) -> float:
    return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1_000_000


@lru_cache(maxsize=8)
def _tiktoken_encoding(model: str):
    try:
        import tiktoken

        try:
            return tiktoken.encoding_for_model(model)
        except KeyError:
            return tiktoken.get_encoding("cl100k_base")
    except Exception as err:  # no tiktoken, or its vocabulary cannot be downloaded here
        log.warning("tiktoken unavailable for %s (%s); estimating tokens as UTF-8 bytes / 4", model, type(err).__name__)
        return None


@lru_cache(maxsize=4)
def _hf_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@dataclass(frozen=True)
class TokenCounter:
    """`tiktoken` for OpenAI models, the served model's own tokenizer (`hf:<path>`), or UTF-8 bytes / 4."""

    method: str  # "tiktoken", "bytes" or "hf"
    model: str = ""
    tokenizer_path: str | None = None

    def count_text(self, text: str) -> int:
        if self.method == "tiktoken":
            enc = _tiktoken_encoding(self.model)
            if enc is not None:
                return len(enc.encode(text, disallowed_special=()))
        elif self.method == "hf" and self.tokenizer_path:
            return len(_hf_tokenizer(self.tokenizer_path)(text, add_special_tokens=False)["input_ids"])
        return byte_estimate(text)

    def count_messages(self, messages: list[dict]) -> int:
        return sum(TOKENS_PER_MESSAGE + self.count_text(str(m.get("content", ""))) for m in messages) + TOKENS_PER_REPLY


def byte_estimate(text: str) -> int:
    """~4 UTF-8 bytes per token for English clinical text with BPE vocabularies; always at least 1."""
    return max(1, math.ceil(len(text.encode("utf-8")) / 4))


@dataclass
class SpendEstimate:
    requests: int
    prompt_tokens: int
    completion_tokens_max: int
    usd_max: float

    def line(self, model: str) -> str:
        return (
            f"{self.requests:,} requests to {model}: ~{self.prompt_tokens:,} prompt tokens + up to "
            f"{self.completion_tokens_max:,} completion tokens, at most ${self.usd_max:,.2f}"
        )


def estimate(prompt_tokens: list[int], max_tokens: list[int], n: int, price: tuple[float, float]) -> SpendEstimate:
    prompt = sum(prompt_tokens)
    completion = sum(max_tokens) * n
    return SpendEstimate(len(prompt_tokens), prompt, completion, cost_usd(prompt, completion, price))


def check_budget(est: SpendEstimate, budget_usd: float | None, already_spent_usd: float = 0.0, in_flight_reserve_usd: float = 0.0) -> None:
    """`in_flight_reserve_usd`: what the requests that may be in flight at once would cost if sent twice — a request in
    flight when its node is lost has no record yet, so a rerun sends it (and the provider bills it) again."""
    if budget_usd is not None and est.usd_max + already_spent_usd + in_flight_reserve_usd > budget_usd:
        raise BudgetExceeded(
            f"the stage may cost up to ${est.usd_max:,.2f} (+ ${already_spent_usd:,.2f} already spent, + "
            f"${in_flight_reserve_usd:,.2f} for the requests in flight, which a lost node would send again), over the "
            f"budget of ${budget_usd:,.2f} (teacher.budget_usd); raise the budget or reduce the rows"
        )
