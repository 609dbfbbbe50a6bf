"""Training data without Ray: pretraining blocks, instruction examples, packing and its attention mask."""

import pytest
import torch

from asclepius.models import load_model, load_tokenizer
from asclepius.recipe import load_recipe
from asclepius.train.data import (
    IGNORE,
    Example,
    block_diagonal_mask,
    instruction_example,
    model_inputs,
    pack,
    pad_to_longest,
    padding_fraction,
    pretraining_blocks,
    to_columns,
)

PROMPT = load_recipe().model_prompt


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer("tiny"), load_model("tiny")


def test_pretraining_blocks_layout():
    blocks = pretraining_blocks([[10, 11, 12], [20, 21], [30, 31, 32, 33]], bos=1, eos=2, block_len=4)
    # stream: 1 10 11 12 2 | 1 20 21 2 | 1 30 31 32 33 2 → 15 tokens → 3 blocks of 4, remainder (3 tokens) dropped
    assert blocks == [[1, 10, 11, 12], [2, 1, 20, 21], [2, 1, 30, 31]]


def test_instruction_example_masks_the_source_and_ends_with_eos(tiny):
    tok, _ = tiny
    ex = instruction_example(tok, PROMPT, "\nPt w/ CHF.\n", "What is the EF?\n", "EF 35%.", max_len=512)
    source = [tok.bos_token_id] + tok(PROMPT.format(note="Pt w/ CHF.", question="What is the EF?"), add_special_tokens=False)["input_ids"]
    target = tok("EF 35%.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids == source + target and ex.labels == [IGNORE] * len(source) + target and not ex.truncated_note


def test_a_long_note_is_truncated_never_the_answer(tiny):
    tok, _ = tiny
    answer = "The patient was discharged home on lasix."
    ex = instruction_example(tok, PROMPT, "word " * 2000, "Summarize.", answer, max_len=256)
    assert ex.truncated_note and len(ex) <= 256
    target = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids[-len(target):] == target and ex.labels[-len(target):] == target
    assert instruction_example(tok, PROMPT, "note", "q", "a " * 300, max_len=64) is None  # the answer alone is too long


def test_packing_positions_segments_and_low_padding():
    examples = [Example([5] * n, [IGNORE] * (n // 2) + [6] * (n - n // 2)) for n in (60, 50, 40, 30, 20, 10, 64, 22)]
    blocks = pack(examples, max_len=100, pad_id=0)
    assert sorted(len(b.input_ids) for b in blocks) == [100] * len(blocks)
    assert sum(b.real_tokens for b in blocks) == sum(len(e) for e in examples)  # nothing lost, nothing repeated
    first = blocks[0]
    starts = [i for i, p in enumerate(first.position_ids) if p == 0 and first.segment_ids[i]]
    assert len(starts) == max(first.segment_ids) >= 2  # position ids restart at each example
    assert padding_fraction(blocks) < padding_fraction(pad_to_longest(examples, 0, micro_batch=4))


def test_block_diagonal_mask():
    seg = torch.tensor([[1, 1, 2, 2, 0]])
    allowed = block_diagonal_mask(seg, torch.float32)[0, 0] == 0
    assert allowed.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [False, False, True, False, False],  # example 2 does not see example 1
        [False, False, True, True, False],
        [False, False, False, False, True],  # padding attends to itself only
    ]


def test_an_examples_loss_is_the_same_packed_or_alone(tiny):
    tok, model = tiny
    a = instruction_example(tok, PROMPT, "Pt w/ COPD on home O2.", "Which device?", "Home oxygen.", 256)
    b = instruction_example(tok, PROMPT, "Pt s/p CABG x3, AF post-op.", "Which arrhythmia?", "Atrial fibrillation.", 256)

    def loss_of(blocks):
        cols = {k: torch.tensor(v) for k, v in to_columns(blocks).items()}
        with torch.no_grad():
            logits = model(**{k: v for k, v in model_inputs(cols, torch.float32).items() if k != "labels"}).logits
        return logits, cols

    alone_logits, alone = loss_of(pack([a], len(a), tok.eos_token_id))
    packed_blocks = pack([a, b], len(a) + len(b), tok.eos_token_id)
    packed_logits, packed = loss_of(packed_blocks)
    # find a inside the packed block (first-fit-decreasing may put it second) and compare its logits and loss
    seg_of_a = 1 if packed_blocks[0].input_ids[: len(a)] == a.input_ids else 2
    idx = (packed["segment_ids"][0] == seg_of_a).nonzero().squeeze(-1)
    assert torch.allclose(packed_logits[0, idx], alone_logits[0, : len(a)], atol=1e-4)

    def ce(logits, labels):
        return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE)

    assert ce(packed_logits[0, idx], packed["labels"][0, idx]).item() == pytest.approx(ce(alone_logits[0], alone["labels"][0]).item(), abs=1e-4)
