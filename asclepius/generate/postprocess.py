"""Cleaning teacher replies and the recipe's instruction filters."""

from __future__ import annotations

import re

_QUOTES = "\"'“”‘’`"
_LIST_MARK = re.compile(r"^\s*(?:\d+[.)]|[-*•]|Q\d*[:.)]|Question\s*\d*[:.)])\s*", re.IGNORECASE)


def clean_question(reply: str | None) -> tuple[str | None, str]:
    """(question, outcome). Outcomes: ok, multiple (kept the first), empty.

    The recipe used the reply as is; replies sometimes wrap the question in quotes, prefix it ("Question:"), or
    list several — we keep one question, the first.
    """
    if reply is None or not reply.strip():
        return None, "empty"
    lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
    outcome = "ok"
    questions = [ln for ln in lines if ln.rstrip(_QUOTES).endswith("?")]
    if len(questions) > 1 or (len(lines) > 1 and questions):
        outcome = "multiple"
        text = questions[0]
    else:
        text = " ".join(lines)
    text = _LIST_MARK.sub("", text).strip().strip(_QUOTES).strip()
    return (text, outcome) if text else (None, "empty")


def instruction_drop_reason(note: str, question: str, answer: str, regex: re.Pattern, answer_end: str) -> str | None:
    """The recipe's filters: any field mentioning a model ("AI language", "the model", ...), or an answer that
    ends with "?" (it asked back instead of answering)."""
    for name, value in (("note", note), ("question", question), ("answer", answer)):
        if regex.search(value or ""):
            return f"model_mention_in_{name}"
    if answer_end and (answer or "").endswith(answer_end):
        return "answer_ends_with_question_mark"
    return None


def compile_filter(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.IGNORECASE)
