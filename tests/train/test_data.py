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
    varlen = model_inputs({**batch, "cu_seq_lens": torch.tensor([0, 8, 16], dtype=torch.int32), "max_length": 8}, torch.float32, "varlen")
    assert "attention_mask" not in varlen and varlen["max_length_q"] == 8  # flash-attn reads the boundaries given
    assert model_inputs(batch, torch.float32, "mask")["attention_mask"].shape == (2, 1, 8, 8)
    assert attention_seq_len(batch["segment_ids"]) == 8.0
    packed = torch.tensor([[1, 1, 1, 2, 0, 0], [1, 1, 2, 2, 2, 2]])  # examples of 3, 1, 2, 4 tokens
    assert attention_seq_len(packed) == pytest.approx((9 + 1 + 4 + 16) / 10)


# ----------------------------------------------------------------------------------------------- attention paths
def packed_rows(tok, lengths_of_rows: list[list[int]], seed: int = 0) -> list[dict]:
    """Stored rows of packed examples: each row the examples of the given lengths, then padding to the longest row."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in lengths_of_rows:
        ids, seg = [], []
        for k, n in enumerate(lengths, start=1):
            ids += torch.randint(3, len(tok), (n,), generator=gen).tolist()
            seg += [k] * n
        rows.append({"input_ids": ids, "loss_mask": [1] * len(ids), "segment_ids": seg})
    width = max(len(r["input_ids"]) for r in rows) + 5  # a padded tail on every row
    for r in rows:
        pad = width - len(r["input_ids"])
        r["input_ids"] += [0] * pad
        r["loss_mask"] += [0] * pad
        r["segment_ids"] += [0] * pad
    return rows


def test_collate_gives_the_varlen_boundaries_transformers_would_derive_in_every_layer(tiny):
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    from asclepius.train.data import collate

    for layout in ([[7, 30, 1, 12]], [[40], [3, 3, 3], [20, 19]], [[64]]):
        batch = collate(packed_rows(tiny[0], layout))
        (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
        assert batch["cu_seq_lens"].dtype == torch.int32 and torch.equal(batch["cu_seq_lens"], cu_q) and torch.equal(cu_q, cu_k)
        assert isinstance(batch["max_length"], int) and batch["max_length"] == int(max_q)  # a Python int: no read-back
    # every example is one segment, and a row's padding one more
    batch = collate(packed_rows(tiny[0], [[7, 30, 1, 12]]))
    assert torch.diff(batch["cu_seq_lens"]).tolist() == [7, 30, 1, 12, 5]


def _segment_causal_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A CPU stand-in for flash-attention's varlen kernel that reads ONLY what model_inputs passes for varlen
    (cu_seq_lens_q/k, max_length_q/k): causal attention inside each segment of the flattened batch."""
    cu, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    assert attention_mask is None and torch.equal(kwargs["cu_seq_lens_k"], cu) and isinstance(longest, int)
    _SEEN.append(cu.data_ptr())
    b, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    q = query.transpose(1, 2).reshape(b * length, heads, dim)
    k = key.repeat_interleave(groups, 1).transpose(1, 2).reshape(b * length, heads, dim)
    v = value.repeat_interleave(groups, 1).transpose(1, 2).reshape(b * length, heads, dim)
    out = torch.empty_like(q)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert end - start <= longest
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1), is_causal=True, scale=scaling
        ).transpose(0, 1)
    return out.reshape(b, length, heads, dim), None


_SEEN: list[int] = []


def _loss_and_logits(model, implementation, inputs):
    model.set_attn_implementation(implementation)
    try:
        with torch.no_grad():  # flex_attention has no backward on CPU; the forward is the same computation
            out = model(**inputs)
    finally:
        model.set_attn_implementation("sdpa")
    return out.loss.item(), out.logits


def test_flex_and_varlen_give_the_dense_masks_loss_and_never_attend_across_examples(tiny):
    """The GPU paths against the CPU fallback on one packed batch: the same loss to 1e-4, and changing one example's
    tokens changes no other example's logits. flex runs here (forward); varlen runs through a stand-in kernel that
    sees only the boundaries collate computed, once for every layer."""
    from transformers import AttentionInterface

    from asclepius.train.data import collate
    from asclepius.train.settings import ATTENTION_IMPLEMENTATION

    tok, model = tiny
    AttentionInterface.register("segment_causal_cpu", _segment_causal_attention)
    rows = packed_rows(tok, [[40, 70, 9, 25], [100, 33]])
    batch = collate(rows)
    paths = {"mask": ATTENTION_IMPLEMENTATION["mask"], "flex": ATTENTION_IMPLEMENTATION["flex"], "varlen": "segment_causal_cpu"}
    assert ATTENTION_IMPLEMENTATION["flex"] == "flex_attention" and ATTENTION_IMPLEMENTATION["varlen"] == "flash_attention_2"
    _SEEN.clear()
    results = {path: _loss_and_logits(model, impl, model_inputs(batch, torch.float32, path)) for path, impl in paths.items()}
    assert len(_SEEN) == model.config.num_hidden_layers and len(set(_SEEN)) == 1  # one cu_seq_lens, handed to every layer
    reference_loss, reference_logits = results["mask"]
    for path in ("flex", "varlen"):
        loss, logits = results[path]
        assert abs(loss - reference_loss) < 1e-4, path
        real = batch["segment_ids"] > 0
        assert torch.allclose(logits[real], reference_logits[real], atol=1e-4), path

    # change every token of the second example of row 0: only that example's logits may move
    changed = [dict(r) for r in rows]
    ids = list(changed[0]["input_ids"])
    ids[40:110] = [(t % (len(tok) - 3)) + 3 if t + 1 >= len(tok) else t + 1 for t in ids[40:110]]
    changed[0]["input_ids"] = ids
    other = collate(changed)
    for path, impl in paths.items():
        _, logits = _loss_and_logits(model, impl, model_inputs(other, torch.float32, path))
        untouched = (batch["segment_ids"] > 0) & (batch["segment_ids"] != 2)
        untouched[1] = batch["segment_ids"][1] > 0
        assert torch.allclose(logits[untouched], results[path][1][untouched], atol=1e-5), path
        assert not torch.allclose(logits[0, 40:110], results[path][1][0, 40:110]), path


def test_the_dense_mask_stays_the_cpu_fallback_and_gpu_paths_are_chosen_by_what_is_installed():
    from asclepius.config import config_from_dict
    from asclepius.train.settings import attention_for, packed_block_len, rows_per_batch

    def hp(**over):
        base = {"micro_batch": 4, "global_batch": 8, "max_len": 2048, **over}
        return config_from_dict({"run_dir": "/tmp/x", "notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]}, "finetune": base}).finetune

    assert attention_for(hp(), "finetune", use_gpu=False) == ("mask", "sdpa")
    assert attention_for(hp(use_gpu=True), "finetune", use_gpu=True, has_flash_attn=True) == ("varlen", "flash_attention_2")
    assert attention_for(hp(use_gpu=True), "finetune", use_gpu=True, has_flash_attn=False) == ("flex", "flex_attention")
    assert attention_for(hp(use_gpu=True), "pretrain", use_gpu=True) == ("causal", "sdpa")  # one sequence per block: no mask
    with pytest.raises(RuntimeError, match="varlen needs flash-attn"):
        attention_for(hp(packed_attention="varlen", use_gpu=True), "finetune", use_gpu=True, has_flash_attn=False)
    with pytest.raises(RuntimeError, match="flex needs GPU"):
        attention_for(hp(packed_attention="flex"), "finetune", use_gpu=False)
    assert hp(packed_attention="position_ids").packed_attention == "varlen"  # the old name still reads
    # one row of micro_batch × max_len without a dense mask; max_len rows with it
    assert (packed_block_len(hp(use_gpu=True)), rows_per_batch(hp(use_gpu=True))) == (4 * 2048, 1)
    assert (packed_block_len(hp()), rows_per_batch(hp())) == (2048, 4)
