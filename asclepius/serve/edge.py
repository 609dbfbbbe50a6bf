"""The edge of the server: what is checked before any request reaches a model, and how a refusal is put.

A malformed body, a number too large, JSON nested too deep, a lone surrogate, an unsupported field: each a 400 with
an OpenAI-style error naming the field (never its value: it may be clinical text). Plain functions, tested without
Ray (tests/serve/).
"""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse

from asclepius.serve.schemas import RefusedField

MAX_BODY_BYTES = 16 << 20


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


