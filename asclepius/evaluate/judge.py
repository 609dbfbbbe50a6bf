"""The recipe's LLM judge: its prompt, the agents' order, and reading the scores out of a reply.

The recipe (eval/gpt4_evaluate.py) shows the judge every model's answer as "Agent A", "Agent B", ... in a random
order per item and reads one score per answer from the reply. Differences, each deliberate:

- The order is seeded per item (the recipe's was unseeded), so a rerun asks the same prompts (answered from the
  ledger) and `order` can be reversed for the second judgement of the position-bias control.
- The recipe split the whole reply on white space and gave every model 0 when that failed, which drags every mean
  down silently. Here the first line is read robustly (commas, quotes, brackets, "Agent A: 3", "3/4", extra
  words), and anything that is not exactly one integer 1-4 per answer is a parse failure: the stage re-asks, and
  an item that still fails is counted as unscored and left out of the means.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from asclepius.run import stable_fraction

LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def answers_block(answers: list[str]) -> str:
    """The recipe's block: '[Agent X's Answer Begin]\\n{answer}\\n[Agent X's Answer End]\\n\\n' per answer."""
    return "".join(f"[Agent {LABELS[i]}'s Answer Begin]\n{a}\n[Agent {LABELS[i]}'s Answer End]\n\n" for i, a in enumerate(answers))


def judge_prompt(template: str, note: str, question: str, answers: list[str]) -> str:
    return template.format(note=note, question=question, answers=answers_block(answers), num_samples=len(answers))


def agent_order(seed: int, item_id: str, n: int, reverse: bool = False) -> list[int]:
    """Which candidate is Agent A, B, ...: a seeded permutation per item; `reverse` shows the same answers in the
    opposite order (the second judgement of the position-bias control)."""
    order = list(range(n))
    random.Random(int(stable_fraction(seed, f"judge-order:{item_id}") * 2**53)).shuffle(order)
    return order[::-1] if reverse else order


def repair_message(n: int) -> str:
    """The follow-up when a reply could not be read: the recipe's own output rule, restated."""
    return (f"Your reply could not be read. The first line must contain only {n} values, one integer score from 1 to 4 "
            f"for each model (Agent {LABELS[0]} to Agent {LABELS[n - 1]}), separated by a space, without explanation.")  # fmt: skip


@dataclass(frozen=True)
class ParsedScores:
    scores: list[int] | None  # one per agent, in agent order (A, B, ...)
    error: str | None = None


_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\w.])")
_OUT_OF_FOUR = re.compile(r"(?<![\w.])(\d+)\s*/\s*4(?![\w.])")
_LABEL = re.compile(r"\bagent\s+([A-Z])\b|(?<![\w'])([A-Z])\s*[:=]", re.IGNORECASE)  # "Agent B ...", "B: 4"
_NUMBERED_LIST = re.compile(r"^\s*(\d+)[.)]\s+(.*)$")


def _check(values: list[str], n: int) -> ParsedScores:
    if len(values) != n:
        return ParsedScores(None, f"{len(values)} scores for {n} answers")
    scores = []
    for v in values:
        if not re.fullmatch(r"[-+]?\d+", v):
            return ParsedScores(None, f"a score is not an integer ({v})")
        if not 1 <= int(v) <= 4:
            return ParsedScores(None, f"a score is outside 1-4 ({v})")
        scores.append(int(v))
    return ParsedScores(scores)


def _labelled(text: str, n: int) -> ParsedScores | None:
    """Scores given with their agents' letters ("Agent B: 4, Agent A: 3"), read by letter in any order and on any
    line: the first number after each label. None unless every agent is labelled exactly once."""
    marks = [(m.start(), m.end(), (m.group(1) or m.group(2)).upper()) for m in _LABEL.finditer(text)]
    letters = [letter for _, _, letter in marks]
    if sorted(letters) != list(LABELS[:n]):
        return None
    values = {}
    for k, (_, end, letter) in enumerate(marks):
        segment = _OUT_OF_FOUR.sub(r"\1", text[end : marks[k + 1][0] if k + 1 < len(marks) else len(text)])
        found = _NUMBER.findall(segment)
        if not found:
            return None
        values[letter] = found[0]
    return _check([values[letter] for letter in LABELS[:n]], n)


def parse_scores(reply: str | None, n: int) -> ParsedScores:
    """One integer 1-4 per answer from a judge reply, or the reason it could not be read."""
    if not reply or not reply.strip():
        return ParsedScores(None, "empty reply")
    text = reply.replace("\r", "")
    labelled = _labelled(text, n)
    if labelled is not None and labelled.scores is not None:
        return labelled
    lines = [ln for ln in text.split("\n") if ln.strip()]
    listed = _NUMBERED_LIST.match(lines[0])
    if listed and listed.group(1) == "1" and len(lines) >= n:  # "1. 3\n2. 4": one score per numbered line
        values = []
        for i, line in enumerate(lines[:n], 1):
            m = _NUMBERED_LIST.match(line)
            if not m or m.group(1) != str(i):
                return ParsedScores(None, "a numbered list that is not 1..n")
            values += _NUMBER.findall(_OUT_OF_FOUR.sub(r"\1", m.group(2)))
        return _check(values, n)
    first = _OUT_OF_FOUR.sub(r"\1", lines[0])  # "3/4" is a score of 3
    first = re.sub(r"[\"'`*\[\](){},;|]", " ", first)  # quotes, markdown, brackets, separators
    return labelled if labelled is not None and not _NUMBER.findall(first) else _check(_NUMBER.findall(first), n)
