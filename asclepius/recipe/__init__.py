"""The Asclepius recipe as data: prompts, tasks, seed questions, filters and hyper-parameters.

The JSON file next to this module is the recipe's published values (see ATTRIBUTION.md); every config default
that comes from the recipe is read from here, never retyped, so a test can prove they are the recipe's.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict

RECIPE_FILE = "asclepius_recipe.json"
MIMIC3_FILTER_FILE = "mimiciii_filter_index.txt"


class Task(BaseModel):
    model_config = ConfigDict(frozen=True)
    task: str
    seed_questions: tuple[str, ...]


class Recipe(BaseModel):
    """The fields of asclepius_recipe.json that code uses; `raw` keeps the whole file."""

    model_config = ConfigDict(frozen=True)
    source: str
    note_synthesis_prompt: str
    question_prompt: str
    answer_prompt: str
    model_prompt: str
    judge_prompt: str
    tasks: tuple[Task, ...]
    instruction_filters: dict[str, str]
    deid_tag_map: dict[str, str]
    note_synthesis_request: dict[str, Any]
    question_request: dict[str, Any]
    answer_request: dict[str, Any]
    judge_request: dict[str, Any]
    pretraining: dict[str, Any]
    finetuning: dict[str, Any]
    generation_for_eval: dict[str, Any]
    tokenizer_special_tokens: dict[str, str]
    raw: dict[str, Any]

    @property
    def task_names(self) -> list[str]:
        return [t.task for t in self.tasks]

    def seed_questions(self, task: str) -> tuple[str, ...]:
        for t in self.tasks:
            if t.task == task:
                return t.seed_questions
        raise KeyError(f"unknown task {task!r}; the recipe's tasks are {self.task_names}")


def _read_text(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def load_recipe() -> Recipe:
    raw = json.loads(_read_text(RECIPE_FILE))
    fields = {k: raw[k] for k in Recipe.model_fields if k != "raw"}
    return Recipe(**fields, raw=raw)


@lru_cache(maxsize=1)
def mimic3_eval_row_ids() -> frozenset[int]:
    """The 517 MIMIC-III ROW_IDs the recipe keeps out of training (they are in its evaluation sets)."""
    lines = _read_text(MIMIC3_FILTER_FILE).split()
    return frozenset(int(x) for x in lines)
