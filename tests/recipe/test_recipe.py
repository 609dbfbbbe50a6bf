import hashlib
import json
from importlib import resources
from pathlib import Path

from asclepius.config import config_from_dict
from asclepius.recipe import load_recipe, mimic3_eval_row_ids

# The shipped recipe file is the recipe: pin its bytes so an edit cannot slip in unnoticed.
RECIPE_SHA256 = "a5f6c9093daaef279434fa16941d56b59fa03f20ff06b569b3e715495b1300ad"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "recipe"


def _packaged(name: str) -> bytes:
    return resources.files("asclepius.recipe").joinpath(name).read_bytes()


def test_packaged_recipe_is_the_recipe_file():
    assert hashlib.sha256(_packaged("asclepius_recipe.json")).hexdigest() == RECIPE_SHA256
    if SHARED.is_dir():  # in this project's checkout the source of truth sits beside it: byte-identical
        assert _packaged("asclepius_recipe.json") == (SHARED / "asclepius_recipe.json").read_bytes()
        assert _packaged("mimiciii_filter_index.txt") == (SHARED / "mimiciii_filter_index.txt").read_bytes()


def test_loaded_prompts_tasks_and_seeds_are_exactly_the_files():
    raw = json.loads(_packaged("asclepius_recipe.json"))
    recipe = load_recipe()
    for key in ("note_synthesis_prompt", "question_prompt", "answer_prompt", "model_prompt", "judge_prompt"):
        assert getattr(recipe, key) == raw[key]
    assert recipe.task_names == [
        "Named Entity Recognition",
        "Abbreviation Expansion",
        "Relation Extraction",
        "Temporal Information Extraction",
        "Coreference Resolution",
        "Paraphrasing",
        "Summarization",
        "Question Answering",
    ]
    for task in raw["tasks"]:
        assert list(recipe.seed_questions(task["task"])) == task["seed_questions"]
        assert len(task["seed_questions"]) == 5
    assert recipe.seed_questions("Abbreviation Expansion")[0] == "What is the expanded form of the abbreviation 'COPD'?"
    # the trained prompt keeps the recipe's typo; the released checkpoints expect it
    assert recipe.model_prompt.startswith("You are an intelligent clinical languge model.\n")
    assert recipe.model_prompt.endswith("[Instruction End]\n")
    assert "{note}" in recipe.answer_prompt and "{question}" in recipe.answer_prompt
    assert recipe.deid_tag_map["Age over 90"] == "[Age]" and len(recipe.deid_tag_map) == 39


def test_mimic3_eval_ids_are_the_517_row_ids():
    ids = mimic3_eval_row_ids()
    assert len(ids) == 517
    assert 917067 in ids and 2042 in ids
    assert all(isinstance(i, int) for i in ids)


def test_config_defaults_are_the_recipes():
    cfg = config_from_dict({"run_dir": "/tmp/x", "notes": {"sources": [{"kind": "mimic3", "path": "sample:mimic3"}]}})
    recipe = load_recipe()
    assert cfg.notes.deid_tag_map == recipe.deid_tag_map
    assert cfg.notes.sources[0].keep_categories == ["Discharge summary"]
    assert (cfg.pretrain.lr, cfg.pretrain.epochs, cfg.pretrain.global_batch, cfg.pretrain.max_len) == (2e-5, 1, 128, 2048)
    assert (cfg.finetune.epochs, cfg.finetune.warmup_ratio, cfg.finetune.lr_scheduler) == (3, 0.03, "cosine")
