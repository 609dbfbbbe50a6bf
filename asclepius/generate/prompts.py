"""The recipe's prompts, filled exactly as its code filled them; notes fitted to the teacher's context."""

from __future__ import annotations

from asclepius.run import stable_fraction
from asclepius.teacher.cost import TokenCounter


def synthesis_prompt(template: str, case_report: str) -> str:
    return template.format(pmc=case_report)


def question_prompt(template: str, task: str, note: str, examples: list[str]) -> str:
    return template.format(task=task, note=note, samples="\n".join(examples))


def answer_prompt(template: str, note: str, question: str) -> str:
    return template.format(note=note, question=question)


def fit_note(note: str, render, counter: TokenCounter, budget: int) -> tuple[str, bool] | None:
    """Shorten `note` until render(note) counts at most `budget` tokens.

    Returns (note, truncated) or None if even an empty note does not fit. The note is cut at the end (the start
    of a discharge summary holds the admission, history and course the questions are about), by characters in
    proportion to the excess, then checked again, so it converges in a few steps without tokenizing per char.
    """
    if counter.count_text(render(note)) <= budget:
        return note, False
    if counter.count_text(render("")) > budget:
        return None
    keep = len(note)
    for _ in range(20):
        over = counter.count_text(render(note[:keep])) - budget
        if over <= 0:
            return note[:keep], True
        keep = max(0, keep - max(16, int(keep * over / max(1, counter.count_text(note[:keep]))) + 8))
    return note[:keep], True


def is_eval_note(note_id: str, fraction: float, seed: int) -> bool:
    return fraction > 0 and stable_fraction(seed, f"eval:{note_id}") < fraction


def task_for(note_id: str, seed: int, n_tasks: int) -> int:
    """One of the tasks, uniformly, reproducibly per note (the recipe used an unseeded randint)."""
    return int(stable_fraction(seed, f"task:{note_id}") * n_tasks)
