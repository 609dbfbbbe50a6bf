"""The demo's ending, as a newcomer reads it: with the demo's own fine-tune settings (configs/demo.yaml) SmolLM2-135M's
loss falls over its steps, and the answer the console prints ends where an answer ends — no prompt marker, no line
said over and over — in a few lines."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported in this process

import re  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from asclepius.config import load_config  # noqa: E402
from asclepius.console import model_answer, shown_answer  # noqa: E402
from asclepius.models import load_model, load_tokenizer  # noqa: E402
from asclepius.notes.readers import sample_path  # noqa: E402
from asclepius.recipe import load_recipe  # noqa: E402
from asclepius.serve.schemas import PROMPT_MARKERS  # noqa: E402
from asclepius.train.data import BlockSource, instruction_example, packed_table, write_blocks  # noqa: E402
from asclepius.train.loop import TrainContext, train  # noqa: E402
from asclepius.train.settings import accumulation_steps, torch_extensions_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())


def demo_notes() -> list[str]:
    mimic3 = pd.read_csv(sample_path("mimic3"))
    mimic4 = pd.read_csv(sample_path("mimic4"))
    return list(mimic3[mimic3.CATEGORY == "Discharge summary"].TEXT) + list(mimic4.text)


def instructions(tok, max_len: int):
    """An instruction per note and task as the demo's stages make them (the recipe's model prompt), with answers
    taken from the note itself: a fixed, learnable target, as a teacher's answers are."""
    recipe = load_recipe()
    examples = []
    for i, note in enumerate(demo_notes()):
        sentences = [s.strip() for s in re.split(r"(?<=[.:])\s+", note) if len(s.strip()) > 20]
        for k, task in enumerate(recipe.tasks[:2]):
            answer = sentences[(i + k) % len(sentences)] if sentences else note[:80]
            ex = instruction_example(tok, recipe.model_prompt, note, task.seed_questions[0], answer, max_len)
            if ex is not None:
                examples.append(ex)
    return examples


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["finetune.num_workers=1"])  # the demo's settings, on one process
    hp = cfg.finetune
    tok = load_tokenizer(cfg.model.base)
    out = tmp_path_factory.mktemp("demo-finetune")
    table = packed_table(instructions(tok, hp.max_len), hp.max_len, tok.eos_token_id)
    source = BlockSource([write_blocks(table, str(out))])
    accumulation = accumulation_steps(hp, 1, "finetune")  # the demo's global batch: 2 blocks per step
    per_epoch = len(source) // accumulation

    def batches(epoch, first):
        return source.batches(epoch, first, seed=hp.seed, rank=0, world=1, per_epoch=per_epoch * accumulation, rows=1)

    result = train(load_model(cfg.model.base), batches, per_epoch, hp, "finetune", TrainContext(), export_dir=str(out / "final"),
                   tokenizer=tok, max_steps=hp.max_steps, accumulation=accumulation)  # fmt: skip
    return result, str(out / "final"), hp


def test_the_demo_settings_make_the_fine_tune_loss_fall(trained):
    result, _, hp = trained
    losses = [h["loss"] for h in result.history]
    assert len(losses) == hp.max_steps and hp.max_steps >= 8  # enough steps for a curve, not two points
    assert losses[-1] < losses[0] and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses  # clearly, not by noise


def test_the_printed_answer_is_an_answer(trained):
    _, model_dir, _ = trained
    note = demo_notes()[0]
    text = model_answer(model_dir, note, load_recipe().tasks[7].seed_questions[1])
    shown = shown_answer(text)
    assert not any(marker in shown for marker in PROMPT_MARKERS)
    lines = [line.strip() for line in shown.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 4 and max(Counter(lines).values()) <= 2, shown


def test_what_the_console_prints_of_a_looping_answer():
    looped = "\n".join(["The instructions are to provide the accurate answer."] * 6)
    shown = shown_answer(looped)
    assert len(shown.splitlines()) == 4 and shown.endswith("…")
