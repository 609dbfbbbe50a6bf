"""Request bodies of the HTTP API, in OpenAI's shapes (validated; unknown OpenAI fields are accepted and ignored)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    def budget(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    # vLLM's extension (extra_body): the reply is exactly one of these strings, chosen by the model's own scores
    guided_choice: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(None, min_length=1, max_length=256)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class AnswerRequest(BaseModel):
    """The clinical endpoint: a note and a question, formatted with the recipe's trained model prompt."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None  # default: the first served model
    note: str = Field(min_length=1)
    question: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)  # deterministic by default: a clinical answer should not vary
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    echo_prompt: bool = False
