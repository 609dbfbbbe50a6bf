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


def recipe_preprocess(tok, note, question, answer):
    """The recipe's instruction_ft.py: fields stripped of newlines, source = PROMPT.format_map, target = answer +
    eos_token, input = tokenizer(source + target) (LLaMA adds bos), labels masked over len(tokenizer(source))."""
    note, question, answer = note.strip("\n"), question.strip("\n"), answer.strip("\n")
    source = PROMPT.format_map({"note": note, "question": question})
    target = f"{answer}{tok.eos_token}"
    full = [tok.bos_token_id] + tok(source + target, add_special_tokens=False)["input_ids"]
    source_len = 1 + len(tok(source, add_special_tokens=False)["input_ids"])
    return full, [IGNORE] * source_len + full[source_len:]


def test_instruction_example_is_tokenized_as_the_recipe_did(tiny):
    tok, _ = tiny
    for note, question, answer in [("\nPt w/ CHF.\n", "What is the EF?\n", "EF 35%."), ("DKA, glucose 542.", "Summarize.", "Insulin gtt, resolved."),
                                   ("Pt s/p CABG x3.", "Which arrhythmia?", " Atrial fibrillation")]:  # fmt: skip
        ex = instruction_example(tok, PROMPT, note, question, answer, max_len=512)
        ids, labels = recipe_preprocess(tok, note, question, answer)
        assert (ex.input_ids, ex.labels) == (ids, labels) and not ex.truncated_note
        assert ex.input_ids[-1] == tok.eos_token_id
    # the answer is not tokenized apart: its first token follows the prompt's last newline, without a word boundary
    ex = instruction_example(tok, PROMPT, "Pt w/ CHF.", "What is the EF?", "EF 35%.", max_len=512)
    first_answer_token = tok.convert_ids_to_tokens([next(t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE)])[0]
    assert first_answer_token == "E" and tok.convert_ids_to_tokens(tok("EF", add_special_tokens=False)["input_ids"])[0] == "▁E"


def test_a_long_note_is_truncated_never_the_answer(tiny):
    tok, _ = tiny
    answer = "The patient was discharged home on lasix."
    ex = instruction_example(tok, PROMPT, "word " * 2000, "Summarize.", answer, max_len=256)
    assert ex.truncated_note and len(ex) <= 256
    learned = [t for t in ex.labels if t != IGNORE]
    assert tok.decode(learned[:-1]) == answer and learned[-1] == tok.eos_token_id and ex.input_ids[-len(learned):] == learned
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


def test_best_fit_decreasing_packing_is_fast_and_tight():
    import random
    import time

    from asclepius.train.data import pack_bins

    rng = random.Random(0)
    lengths = [min(2048, max(64, int(rng.lognormvariate(7.1, 0.35)))) for _ in range(50_000)]
    started = time.time()
    bins = pack_bins(lengths, 2048)
    assert time.time() - started < 5  # O(n log n): the old first-fit scan took ~3 s for 10k, ~11 min for 158k
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every example once
    assert all(sum(lengths[i] for i in b) <= 2048 for b in bins)
    lower_bound = -(-sum(lengths) // 2048)
    assert len(bins) <= 1.12 * lower_bound  # within 12 % of perfect packing
    with pytest.raises(ValueError, match="does not fit"):
        pack_bins([10, 3000], 2048)


def test_packed_table_is_the_compact_form_of_pack():
    from asclepius.train.data import blocks_table, collate, packed_table

    examples = [Example([7] * n, [IGNORE] * (n // 3) + [7] * (n - n // 3)) for n in (30, 25, 20, 12, 9, 40)]
    table = packed_table(examples, 50, pad_id=0)
    assert table.equals(blocks_table(pack(examples, 50, 0)))
    batch = collate(table.to_pylist())
    expected = {k: torch.tensor(v) for k, v in to_columns(pack(examples, 50, 0)).items()}
    for key in ("input_ids", "labels", "position_ids", "segment_ids"):
        padding = expected["segment_ids"] == 0
        assert torch.equal(batch[key][~padding], expected[key][~padding]), key


def test_each_epoch_has_its_own_seeded_order_dealt_to_the_workers():
    from asclepius.train.data import epoch_rows

    e0 = [epoch_rows(100, 3, 0, r, 4, 25) for r in range(4)]
    assert sorted(int(i) for part in e0 for i in part) == list(range(100))  # a partition: every block once per epoch
    assert all((a == b).all() for a, b in zip(e0, [epoch_rows(100, 3, 0, r, 4, 25) for r in range(4)]))  # reproducible
    assert not (epoch_rows(100, 3, 1, 0, 4, 25) == e0[0]).all()  # another epoch, another order
    assert not (epoch_rows(100, 4, 0, 0, 4, 25) == e0[0]).all()  # another seed, another order


def test_pretraining_batches_are_causal_without_a_mask_and_attention_spans_examples():
    from asclepius.train.data import attention_seq_len

    batch = {"input_ids": torch.ones(2, 8, dtype=torch.long), "labels": torch.ones(2, 8, dtype=torch.long),
             "position_ids": torch.arange(8).repeat(2, 1), "segment_ids": torch.ones(2, 8, dtype=torch.long)}  # fmt: skip
    assert "attention_mask" not in model_inputs(batch, torch.float32, "causal")  # SDPA keeps its causal flash kernel
    assert "attention_mask" not in model_inputs(batch, torch.float32, "position_ids")  # flash-attn reads the positions
    assert model_inputs(batch, torch.float32, "mask")["attention_mask"].shape == (2, 1, 8, 8)
    assert attention_seq_len(batch["segment_ids"]) == 8.0
    packed = torch.tensor([[1, 1, 1, 2, 0, 0], [1, 1, 2, 2, 2, 2]])  # examples of 3, 1, 2, 4 tokens
    assert attention_seq_len(packed) == pytest.approx((9 + 1 + 4 + 16) / 10)
