"""Training data: pretraining blocks from notes, instruction examples with loss on the answer only, and packing.

Plain Python + PyTorch; the Ray adapter tokenizes with Ray Data and hands these functions the token lists.

Packing puts several instruction examples into one block of `max_len` tokens. Position ids restart at 0 for each
example and attention stays inside each example (a block-diagonal causal mask; flash-attention's varlen kernels
read the same boundaries from the position ids), so a packed example's loss equals its loss alone, while padding
waste falls from the recipe's pad-to-longest to almost nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

IGNORE = -100


# ----------------------------------------------------------------------------------------------- pretraining
def pretraining_blocks(notes: list[list[int]], bos: int, eos: int, block_len: int) -> list[list[int]]:
    """The recipe's layout: [bos] note [eos] [bos] note [eos] ... cut into blocks of `block_len`; the remainder
    is dropped. Labels are the inputs (the model shifts them)."""
    stream: list[int] = []
    for ids in notes:
        stream.append(bos)
        stream.extend(ids)
        stream.append(eos)
    return [stream[i : i + block_len] for i in range(0, len(stream) - block_len + 1, block_len)]


def shuffled(items: list, seed: int) -> list:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


# ----------------------------------------------------------------------------------------------- instructions
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated_note: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


def instruction_example(tokenizer, prompt_template: str, note: str, question: str, answer: str, max_len: int) -> Example | None:
    """source = the recipe's model prompt (fields stripped of surrounding newlines), target = answer + eos; loss
    only on the target. Too long: the note is shortened, never the answer; None if even an empty note is too long."""
    note, question = note.strip("\n"), question.strip("\n")
    target = list(tokenizer(answer, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def source_ids(n: str) -> list[int]:
        return bos + list(tokenizer(prompt_template.format(note=n, question=question), add_special_tokens=False)["input_ids"])

    source = source_ids(note)
    truncated = False
    if len(source) + len(target) > max_len:
        note_ids = list(tokenizer(note, add_special_tokens=False)["input_ids"])
        overflow = len(source) + len(target) - max_len
        keep = len(note_ids) - overflow
        while True:
            if keep <= 0:
                return None
            source = source_ids(tokenizer.decode(note_ids[:keep]))
            if len(source) + len(target) <= max_len:
                break
            keep -= max(1, len(source) + len(target) - max_len)  # re-tokenizing can shift a token or two
        truncated = True
    return Example(source + target, [IGNORE] * len(source) + target, truncated)


# ----------------------------------------------------------------------------------------------- packing
@dataclass
class Block:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    segment_ids: list[int]  # 1, 2, ... per example; 0 = padding

    @property
    def real_tokens(self) -> int:
        return sum(1 for s in self.segment_ids if s)


def pack(examples: list[Example], max_len: int, pad_id: int) -> list[Block]:
    """First-fit-decreasing packing of examples into blocks of max_len (each example must fit one block)."""
    bins: list[list[Example]] = []
    space: list[int] = []
    for ex in sorted(examples, key=len, reverse=True):
        for i, free in enumerate(space):
            if len(ex) <= free:
                bins[i].append(ex)
                space[i] -= len(ex)
                break
        else:
            bins.append([ex])
            space.append(max_len - len(ex))
    return [_block(b, max_len, pad_id) for b in bins]


def _block(examples: list[Example], length: int, pad_id: int) -> Block:
    ids, labels, pos, seg = [], [], [], []
    for n, ex in enumerate(examples, 1):
        ids += ex.input_ids
        labels += ex.labels
        pos += list(range(len(ex)))
        seg += [n] * len(ex)
    pad = length - len(ids)
    return Block(ids + [pad_id] * pad, labels + [IGNORE] * pad, pos + [0] * pad, seg + [0] * pad)


def pad_to_longest(examples: list[Example], pad_id: int, micro_batch: int) -> list[Block]:
    """The recipe's batching: micro-batches of examples in order, right-padded to the longest of each."""
    blocks = []
    for i in range(0, len(examples), micro_batch):
        group = examples[i : i + micro_batch]
        longest = max(len(e) for e in group)
        blocks += [_block([e], longest, pad_id) for e in group]
    return blocks


def padding_fraction(blocks: list[Block]) -> float:
    total = sum(len(b.input_ids) for b in blocks)
    return 1 - sum(b.real_tokens for b in blocks) / total if total else 0.0


# ----------------------------------------------------------------------------------------------- batches
def block_diagonal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, L, L) additive mask: a token attends to earlier tokens of its own example only. Padding rows
    attend to themselves so no row is fully masked (their labels are ignored anyway)."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.tril(torch.ones(segment_ids.shape[1], segment_ids.shape[1], dtype=torch.bool, device=segment_ids.device))
    allowed = same & causal[None]
    allowed |= torch.eye(segment_ids.shape[1], dtype=torch.bool, device=segment_ids.device)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def model_inputs(batch: dict[str, torch.Tensor], dtype: torch.dtype, packed_attention: str = "mask") -> dict:
    """Forward arguments for a batch of blocks. `mask`: a 4-D block-diagonal mask (CPU, SDPA, eager);
    `position_ids`: flash-attention derives the example boundaries from the restarting position ids."""
    inputs = {"input_ids": batch["input_ids"], "labels": batch["labels"], "position_ids": batch["position_ids"]}
    if packed_attention == "mask":
        inputs["attention_mask"] = block_diagonal_mask(batch["segment_ids"], dtype)
    return inputs


def to_columns(blocks: list[Block]) -> dict[str, list[list[int]]]:
    return {
        "input_ids": [b.input_ids for b in blocks],
        "labels": [b.labels for b in blocks],
        "position_ids": [b.position_ids for b in blocks],
        "segment_ids": [b.segment_ids for b in blocks],
    }
