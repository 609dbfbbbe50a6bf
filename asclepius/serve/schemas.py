"""Request bodies of the HTTP API in OpenAI's shapes, validated at the edge so a bad request never reaches a batch.

Every field OpenAI documents is either implemented or refused with a 400 that names it; an unknown field is refused
too (`extra="forbid"`), so nothing a client asks for is silently ignored. Implemented beyond plain sampling:
logprobs/top_logprobs, logit_bias, frequency/presence penalties, stream_options.include_usage, completions echo and
token-id prompts, content given as a list of text parts, and vLLM's `guided_choice`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

INT64 = 2**63
# The recipe's model prompt frames a note and an instruction with these; an answer that reaches one has ended
# (a small model goes on writing prompts). The default stop sequences of /v1/answer.
PROMPT_MARKERS = ("[Discharge Summary Begin]", "[Discharge Summary End]", "[Instruction Begin]", "[Instruction End]")
def _check_stop_lengths(stops: list[str]) -> None:
    """One rule for every endpoint's stop sequences."""
    if any(not s or len(s) > 256 for s in stops):
        raise ValueError("a stop sequence must be 1 to 256 characters")


REPEATS = 3  # /v1/answer's cut_repetition: a span generated this many times in a row is a loop (asclepius.serve.engine)
MAX_PROMPTS = 64  # prompts in one /v1/completions request (a batch of prompts × n counts against the queue)
Text = Annotated[str, Field(max_length=2_000_000)]

# Documented OpenAI fields this server cannot honour: a 400 that says why, never a silent no-op.
REFUSED = {
    "tools": "function calling (tools) is not supported by this server",
    "tool_choice": "function calling (tool_choice) is not supported by this server",
    "functions": "function calling (functions) is not supported by this server",
    "function_call": "function calling (function_call) is not supported by this server",
    "parallel_tool_calls": "function calling (parallel_tool_calls) is not supported by this server",
    "audio": "audio output is not supported by this server",
    "modalities": "output modalities other than text are not supported by this server",
    "prediction": "predicted outputs are not supported by this server",
    "reasoning_effort": "reasoning_effort applies to reasoning models; this server's models take none",
    "web_search_options": "web search is not supported by this server",
    "suffix": "suffix (insertion) is not supported by this server",
}


class RefusedField(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no "yes" for true, no "5" for 5


class StreamOptions(Strict):
    include_usage: bool = False


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class _Sampling(Strict):
    model: str | None = Field(None, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=2**31)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=300)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    user: str | None = Field(None, max_length=256)  # the caller's end user, for their own records: logged as a hash
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    store: bool | None = None
    service_tier: Literal["auto", "default"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, why in REFUSED.items():
                if name in data and data[name] not in (None, [], False):
                    raise RefusedField(name, f"{name}: {why}")
            if data.get("store") is True:
                raise RefusedField("store", "store: this server keeps no completions")
            fmt = data.get("response_format")
            if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
                raise RefusedField("response_format", f"response_format: {fmt.get('type')} needs guided JSON decoding, which this "
                                   "server does not do (guided_choice constrains a reply to a list of strings)")  # fmt: skip
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        _check_stop_lengths(stops)
        return v

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v):
        for key in v or {}:
            if not key.isdigit() or len(key) > 9:
                raise ValueError("logit_bias keys are token ids (non-negative integers)")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise RefusedField("stream_options", "stream_options: only with stream: true")
        return self

    @property
    def stops(self) -> list[str]:
        return [] if self.stop is None else ([self.stop] if isinstance(self.stop, str) else list(self.stop))

    def budget(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def bias(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: str | None = Field(None, max_length=64)

    @model_validator(mode="before")
    @classmethod
    def _parts(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("role") == "tool":
                raise RefusedField("messages", "messages: role tool needs function calling, which this server does not do")
            content = data.get("content")
            if isinstance(content, list):
                for part in content:
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind != "text":
                        raise RefusedField("messages", f"messages: content parts of type {kind!r} are not supported (text only)")
        return data

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # vLLM's extension (extra_body): the reply is exactly one of these strings, chosen by the model's own scores
    guided_choice: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise RefusedField("top_logprobs", "top_logprobs: needs logprobs: true")
        return self

    def plain_messages(self) -> list[dict]:
        role = {"developer": "system"}  # OpenAI's newer name for the system role
        return [{"role": role.get(m.role, m.role), "content": m.text()} for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[Annotated[int, Field(ge=0, lt=2**31)]] | list[list[Annotated[int, Field(ge=0, lt=2**31)]]]
    max_tokens: int | None = Field(None, ge=0, le=2**31)  # 0 with echo: only the prompt's log-probabilities
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1, le=16)

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.prompt, list) and not self.prompt:
            raise RefusedField("prompt", "prompt: an empty list")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], list) and any(not p for p in self.prompt):
            raise RefusedField("prompt", "prompt: an empty token list")
        if self.best_of is not None and self.best_of != self.n:
            raise RefusedField("best_of", "best_of: only best_of = n is supported (every generation is returned)")
        if self.max_tokens == 0 and not self.echo:
            raise RefusedField("max_tokens", "max_tokens: 0 only with echo: true")
        if self.stream and self.max_tokens == 0:
            raise RefusedField("max_tokens", "max_tokens: 0 is not streamed")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        if len(p) > MAX_PROMPTS:
            raise RefusedField("prompt", f"prompt: at most {MAX_PROMPTS} prompts in one request")
        return list(p)


class AnswerRequest(Strict):
    """The clinical endpoint: a note and a question, formatted with the recipe's trained model prompt."""

    model: str | None = Field(None, max_length=256)  # default: the first served model
    note: Text = Field(min_length=1)
    question: Text = Field(min_length=1, max_length=20_000)
    max_tokens: int | None = Field(None, ge=1, le=2**31)
    temperature: float = Field(0.0, ge=0, le=2)  # deterministic by default: a clinical answer should not vary
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    echo_prompt: bool = False
    stop: list[Text] | None = Field(None, max_length=8, description="Stop sequences. Default: the recipe's prompt "
                                    "markers, so an answer ends where the model would start a new prompt; [] for none.")
    cut_repetition: bool = Field(True, description=f"End the answer when the same tokens come {REPEATS} times in a row, "
                                 "keeping one copy (finish_reason 'repetition'). Stage 8 turns it off: the recipe's settings.")

    @field_validator("stop")
    @classmethod
    def _answer_stops(cls, v):
        _check_stop_lengths(v or [])
        return v

    @property
    def stops(self) -> list[str]:
        return list(PROMPT_MARKERS) if self.stop is None else list(self.stop)
