"""Training data: pretraining blocks from notes, instruction examples with loss on the answer only, packing, and
the order in which a worker sees blocks. Plain Python + NumPy/PyTorch; the Ray adapter (asclepius.train.ray_train)
runs tokenization and packing in Ray Data tasks and hands the blocks to the workers as Arrow files.

- **Instruction examples** are tokenized as the recipe did (its instruction_ft.py `preprocess`): the prompt and the
  answer + eos as ONE string, the loss masked over the length of the prompt tokenized alone. Tokenizing the answer
  apart would start it with a word-boundary token (▁) the recipe's model never saw there.
- **Packing** puts several examples into one block: position ids restart at 0 for each example and attention stays
  inside each example, so a packed example's loss equals its loss alone. Best-fit decreasing, O(n log n): examples
  longest first, each into the block with the least free space that still holds it, found with a segment tree over
  free-space values (the old first-fit scan was quadratic: ~11 min at the recipe's 158k examples).
- **Order**: blocks are stored in packing order (longest first); each epoch a worker reads them in a permutation
  seeded by (seed, epoch) — a fresh shuffle every epoch, like the recipe's HF sampler, and the same one when a run
  resumes, so a resumed run trains exactly the micro-batches it had not trained yet.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from asclepius.storage import is_remote, open_uri, uri_join, write_bytes

IGNORE = -100
BLOCK_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8())), ("segment_ids", pa.list_(pa.int32()))])


# ----------------------------------------------------------------------------------------------- pretraining
def pretraining_blocks(notes: list[list[int]], bos: int | None, eos: int, block_len: int) -> list[list[int]]:
    """The recipe's layout: [bos] note [eos] [bos] note [eos] ... cut into blocks of `block_len`; the remainder
    is dropped (as HF's group_texts does per batch of notes). Labels are the inputs (the model shifts them).
    A tokenizer without bos (Qwen2) gives note [eos] note [eos] ...: eos alone separates the notes."""
    stream: list[int] = []
    for ids in notes:
        if bos is not None:
            stream.append(bos)
        stream.extend(ids)
        stream.append(eos)
    return [stream[i : i + block_len] for i in range(0, len(stream) - block_len + 1, block_len)]


# ----------------------------------------------------------------------------------------------- instructions
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated_note: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


def instruction_example(tokenizer, prompt_template: str, note: str, question: str, answer: str, max_len: int) -> Example | None:
    """source = the recipe's model prompt (fields stripped of surrounding newlines), target = answer + eos, tokenized
    together as the recipe did; loss only on the target. Too long: the note is shortened, never the answer; None if
    even an empty note is too long."""
    note, question = note.strip("\n"), question.strip("\n")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def encode(n: str) -> tuple[int, list[int]]:
        source = prompt_template.format(note=n, question=question)
        source_len = len(bos) + len(tokenizer(source, add_special_tokens=False)["input_ids"])
        full = bos + list(tokenizer(source + answer, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
        return source_len, full

    source_len, ids = encode(note)
    truncated = False
    if len(ids) > max_len:
        note_ids = list(tokenizer(note, add_special_tokens=False)["input_ids"])
        keep = len(note_ids) - (len(ids) - max_len)
        while True:
            if keep <= 0:
                return None
            source_len, ids = encode(tokenizer.decode(note_ids[:keep]))
            if len(ids) <= max_len:
                break
            keep -= max(1, len(ids) - max_len)  # re-tokenizing can shift a token or two
        truncated = True
    if source_len >= len(ids):
        return None  # nothing left to learn from (an empty answer)
    return Example(ids, [IGNORE] * source_len + ids[source_len:], truncated)


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


class _FreeSpace:
    """Open blocks by free space: `take(n)` removes and returns the block with the least free space ≥ n, in
    O(log capacity) — a segment tree of counts over free-space values 0..capacity."""

    def __init__(self, capacity: int):
        self.size = 1 << (capacity + 1).bit_length()
        self.count = [0] * (2 * self.size)
        self.blocks: dict[int, list[int]] = {}

    def add(self, free: int, block: int) -> None:
        self.blocks.setdefault(free, []).append(block)
        i = free + self.size
        while i:
            self.count[i] += 1
            i //= 2

    def take(self, need: int) -> tuple[int, int] | None:
        free = self._first_at_least(need)
        if free is None:
            return None
        i = free + self.size
        while i:
            self.count[i] -= 1
            i //= 2
        return free, self.blocks[free].pop()

    def _first_at_least(self, need: int) -> int | None:
        # walk up from `need`, then down into the leftmost non-empty subtree to its right
        if need >= self.size:
            return None
        i = need + self.size
        if self.count[i]:
            return need
        while i > 1:
            if i % 2 == 0 and self.count[i + 1]:
                i += 1
                while i < self.size:
                    i = 2 * i if self.count[2 * i] else 2 * i + 1
                return i - self.size
            i //= 2
        return None


def pack_bins(lengths: list[int], max_len: int) -> list[list[int]]:
    """Best-fit-decreasing: which examples (by index) go into each block of max_len tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    open_blocks = _FreeSpace(max_len)
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > max_len:
            raise ValueError(f"an example of {n} tokens does not fit a block of {max_len}")
        taken = open_blocks.take(n)
        if taken is None:
            bins.append([i])
            free, b = max_len - n, len(bins) - 1
        else:
            free, b = taken
            bins[b].append(i)
            free -= n
        if free > 0:
            open_blocks.add(free, b)
    return bins


def pack(examples: list[Example], max_len: int, pad_id: int) -> list[Block]:
    """Best-fit-decreasing packing of examples into blocks of max_len (each example must fit one block)."""
    return [_block([examples[i] for i in b], max_len, pad_id) for b in pack_bins([len(e) for e in examples], max_len)]


def packed_table(examples: list[Example], max_len: int, pad_id: int) -> pa.Table:
    """`pack` straight to the stored form, with NumPy (a Python list per token is what made packing slow)."""
    bins = pack_bins([len(e) for e in examples], max_len)
    ids = np.full((len(bins), max_len), pad_id, dtype=np.int32)
    mask = np.zeros((len(bins), max_len), dtype=np.int8)
    seg = np.zeros((len(bins), max_len), dtype=np.int32)
    for row, b in enumerate(bins):
        at = 0
        for n, i in enumerate(b, 1):
            ex = examples[i]
            k = len(ex)
            ids[row, at : at + k] = ex.input_ids
            mask[row, at : at + k] = np.asarray(ex.labels) != IGNORE
            seg[row, at : at + k] = n
            at += k
    return _fixed_width_table(ids, mask, seg)


def _fixed_width_table(ids: np.ndarray, mask: np.ndarray, seg: np.ndarray) -> pa.Table:
    rows, width = ids.shape
    offsets = pa.array(np.arange(0, (rows + 1) * width, width, dtype=np.int32))

    def lists(a, typ):
        return pa.ListArray.from_arrays(offsets, pa.array(a.reshape(-1), typ))

    return pa.Table.from_arrays([lists(ids, pa.int32()), lists(mask, pa.int8()), lists(seg, pa.int32())], schema=BLOCK_SCHEMA)


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


def blocks_table(blocks: list[Block]) -> pa.Table:
    """Blocks in the compact stored form: ids, a loss mask, segments (labels and positions follow from them)."""
    return pa.table(
        {
            "input_ids": [b.input_ids for b in blocks],
            "loss_mask": [[int(lab != IGNORE) for lab in b.labels] for b in blocks],
            "segment_ids": [b.segment_ids for b in blocks],
        },
        schema=BLOCK_SCHEMA,
    )


def pretraining_table(blocks: list[list[int]]) -> pa.Table:
    """Pretraining blocks: every token is learned, and attention spans the whole block (one segment), as the recipe."""
    ids = np.asarray(blocks, dtype=np.int32).reshape(len(blocks), -1)
    return _fixed_width_table(ids, np.ones_like(ids, dtype=np.int8), np.ones_like(ids, dtype=np.int32))


# ----------------------------------------------------------------------------------------------- order and batches
def epoch_rows(n_blocks: int, seed: int, epoch: int, rank: int, world: int, count: int) -> np.ndarray:
    """The blocks worker `rank` trains on in `epoch`, in order: a permutation seeded by (seed, epoch), dealt
    round-robin to the workers, `count` each. The same on every run, so resuming skips exactly what was trained."""
    perm = np.random.default_rng([seed, epoch]).permutation(n_blocks)
    return perm[rank::world][:count]


def collate(rows: list[dict]) -> dict[str, torch.Tensor | int]:
    """Stored blocks (input_ids, loss_mask, segment_ids) → tensors, padded to the longest row of the micro-batch.
    Also the varlen layout, once per batch rather than in every layer: `cu_seq_lens` (int32 offsets of every segment
    — each example, and a row's padding as one more — in the flattened batch) and `max_length` (a Python int, so
    flash-attention never reads it back from the GPU)."""
    import torch  # here, not at the top: the driver and the tokenizing tasks use this module without torch (2 s)

    length = max(len(r["input_ids"]) for r in rows)
    out = {k: np.zeros((len(rows), length), dtype=np.int64) for k in ("input_ids", "labels", "position_ids", "segment_ids")}
    out["labels"][:] = IGNORE
    for i, r in enumerate(rows):
        ids, mask, seg = (np.asarray(r[k], dtype=np.int64) for k in ("input_ids", "loss_mask", "segment_ids"))
        n = len(ids)
        out["input_ids"][i, :n] = ids
        out["labels"][i, :n] = np.where(mask > 0, ids, IGNORE)
        out["segment_ids"][i, :n] = seg
        index = np.arange(n)
        starts = np.maximum.accumulate(np.where(np.r_[True, seg[1:] != seg[:-1]], index, 0))
        out["position_ids"][i, :n] = index - starts  # restart at each example
        out["position_ids"][i, n:] = np.arange(length - n)  # a short row's tail pads as one more segment
    batch: dict = {k: torch.from_numpy(v) for k, v in out.items()}
    starts = np.flatnonzero(out["position_ids"].reshape(-1) == 0)  # every segment starts at position 0
    cu = np.append(starts, out["position_ids"].size).astype(np.int32)
    batch["cu_seq_lens"] = torch.from_numpy(cu)
    batch["max_length"] = int(np.diff(cu).max())
    return batch


def block_diagonal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, L, L) additive mask: a token attends to earlier tokens of its own example only (a row's padding
    is one segment, attending to itself, so no row is fully masked; its labels are ignored anyway)."""
    import torch

    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.tril(torch.ones(segment_ids.shape[1], segment_ids.shape[1], dtype=torch.bool, device=segment_ids.device))
    allowed = same & causal[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def block_causal_block_mask(segment_ids: torch.Tensor):
    """The same rule as `block_diagonal_mask` as a flex_attention BlockMask: built once per batch, stored per
    128×128 tile, and tiles where no token may attend are never computed (cross-example tiles, the upper triangle)."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg = segment_ids

    def same_example_causal(b, h, q, kv):
        return (seg[b, q] == seg[b, kv]) & (q >= kv)

    batch, length = seg.shape
    return create_block_mask(same_example_causal, batch, None, length, length, device=seg.device)


def model_inputs(batch: dict, dtype: torch.dtype, packed_attention: str = "mask") -> dict:
    """Forward arguments for a batch of blocks, by attention path (ATTENTION_IMPLEMENTATION):
    `causal`: one sequence per row (pretraining): no mask at all, so SDPA takes its causal flash kernel.
    `mask`: a dense 4-D block-diagonal mask (the CPU fallback: SDPA computes all L² scores).
    `flex`: a block-causal BlockMask for flex_attention.
    `varlen`: flash-attention 2's varlen kernel with the boundaries collate computed (transformers takes
    cu_seq_lens_q/k and max_length_q/k as given instead of re-deriving them from position_ids in every layer)."""
    inputs = {"input_ids": batch["input_ids"], "labels": batch["labels"], "position_ids": batch["position_ids"]}
    if packed_attention == "mask":
        inputs["attention_mask"] = block_diagonal_mask(batch["segment_ids"], dtype)
    elif packed_attention == "flex":
        inputs["attention_mask"] = block_causal_block_mask(batch["segment_ids"])
    elif packed_attention == "varlen":
        cu, longest = batch["cu_seq_lens"], batch["max_length"]
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    elif packed_attention != "causal":
        raise ValueError(f"unknown attention path {packed_attention!r}")
    return inputs


def attention_seq_len(segment_ids: torch.Tensor) -> float:
    """The attention span that FLOPs are counted over: Σ len² / Σ len over the examples of the batch (an example
    attends only within itself; a single-segment block spans the whole block)."""
    import torch

    seg = segment_ids[segment_ids > 0]
    if seg.numel() == 0:
        return 0.0
    rows = torch.arange(segment_ids.shape[0], device=segment_ids.device)[:, None].expand_as(segment_ids)[segment_ids > 0]
    _, counts = torch.unique(rows * (int(segment_ids.max()) + 1) + seg, return_counts=True)
    counts = counts.double()
    return float((counts**2).sum() / counts.sum())


def to_columns(blocks: list[Block]) -> dict[str, list[list[int]]]:
    return {
        "input_ids": [b.input_ids for b in blocks],
        "labels": [b.labels for b in blocks],
        "position_ids": [b.position_ids for b in blocks],
        "segment_ids": [b.segment_ids for b in blocks],
    }


# ----------------------------------------------------------------------------------------------- files the workers read
def write_blocks(table: pa.Table, out_dir: str) -> str:
    """One Arrow IPC file of blocks under `out_dir` (a path or an object storage URI); returns its name there."""
    name = f"blocks-{uuid.uuid4().hex}.arrow"
    if is_remote(out_dir):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, BLOCK_SCHEMA) as writer:
            writer.write_table(table)
        write_bytes(uri_join(out_dir, name), sink.getvalue().to_pybytes())  # one PUT: whole or absent
        return uri_join(out_dir, name)
    path = os.path.join(out_dir, name)
    with pa.OSFile(path + ".tmp", "wb") as sink, pa.ipc.new_file(sink, BLOCK_SCHEMA) as writer:
        writer.write_table(table)
    os.replace(path + ".tmp", path)  # a file is whole or absent
    return path


def _read_blocks(uri: str) -> pa.Table:
    if not is_remote(uri):
        return pa.ipc.open_file(pa.memory_map(uri, "r")).read_all()
    fs, path = open_uri(uri)
    with fs.open_input_file(path) as f:
        return pa.ipc.open_file(f).read_all()


class BlockSource:
    """A worker's view of the block files: memory-mapped (or read once from object storage), in the epoch's order."""

    def __init__(self, files: list[str]):
        tables = [_read_blocks(f) for f in files]
        self.table = pa.concat_tables(tables) if tables else BLOCK_SCHEMA.empty_table()

    def __len__(self) -> int:
        return self.table.num_rows

    def batches(self, epoch: int, first: int, *, seed: int, rank: int, world: int, per_epoch: int, rows: int):
        order = epoch_rows(len(self), seed, epoch, rank, world, per_epoch * rows)
        for k in range(first, per_epoch):
            picked = self.table.take(pa.array(np.sort(order[k * rows : (k + 1) * rows]))).to_pylist()
            yield collate(picked)
