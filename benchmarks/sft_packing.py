"""Instruction tuning: padding and non-pad tokens/s of the recipe's pad-to-longest batches vs our packed blocks.

    python benchmarks/sft_packing.py                     # 2,000 examples, max_len 2048, tiny LLaMA on CPU
    python benchmarks/sft_packing.py --examples 500 --measure-blocks 8

Examples are built with the recipe's model prompt from notes of 300–1,900 tokens and answers of 20–400 tokens
(the spread of MIMIC discharge summaries and the recipe's 400-token answers), tokenized by the tiny test
tokenizer. Padding is counted over all examples; tokens/s is forward + backward on the tiny model over the same
number of real tokens in each layout. Appends a row to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from asclepius.models import load_model, load_tokenizer  # noqa: E402
from asclepius.recipe import load_recipe  # noqa: E402
from record import record  # noqa: E402

from asclepius.train.data import Example, model_inputs, pack, pad_to_longest, padding_fraction, to_columns  # noqa: E402

WORDS = "pt admitted with chest pain troponin negative discharged home on aspirin statin follow up cardiology".split()


def make_examples(n: int, max_len: int, seed: int = 0) -> list[Example]:
    tok = load_tokenizer("tiny")
    prompt_ids = tok(load_recipe().model_prompt.format(note="", question="What was the plan?"), add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    word_ids = [tok(w, add_special_tokens=False)["input_ids"] for w in WORDS]
    examples = []
    for _ in range(n):
        note_len, answer_len = rng.randint(300, 1900), rng.randint(20, 400)
        note = [t for _ in range(note_len) for t in rng.choice(word_ids)][:note_len]
        answer = [t for _ in range(answer_len) for t in rng.choice(word_ids)][:answer_len] + [tok.eos_token_id]
        source = [tok.bos_token_id] + prompt_ids + note
        if len(source) + len(answer) > max_len:
            source = source[: max_len - len(answer)]  # the note is cut, never the answer
        examples.append(Example(source + answer, [-100] * len(source) + answer))
    return examples


def throughput(blocks, micro_batch: int, model) -> float:
    """Non-pad tokens per second of forward + backward over these blocks."""
    model.train()
    real = 0
    started = time.time()
    for i in range(0, len(blocks), micro_batch):
        group = blocks[i : i + micro_batch]
        length = max(len(b.input_ids) for b in group)
        cols = {k: torch.tensor([list(v) + [0 if k != "labels" else -100] * (length - len(v)) for v in vals])
                for k, vals in to_columns(group).items()}  # fmt: skip
        loss = model(**model_inputs(cols, torch.float32)).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        real += int((cols["segment_ids"] > 0).sum())
    return real / (time.time() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--measure-blocks", type=int, default=16, help="max_len sequences' worth of each layout timed for tokens/s")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    examples = make_examples(args.examples, args.max_len)
    tok = load_tokenizer("tiny")
    pad = tok.eos_token_id
    layouts = {
        # the recipe: micro-batches of examples right-padded to the longest
        "pad-to-longest": (pad_to_longest(examples, pad, args.micro_batch), args.micro_batch),
        # packed into max_len blocks, block-diagonal mask (the CPU/SDPA path): micro_batch blocks per micro-batch
        "packed, max_len blocks (mask)": (pack(examples, args.max_len, pad), args.micro_batch),
        # packed into one block of micro_batch × max_len tokens (the flash-attention varlen path)
        "packed, token-budget block (varlen)": (pack(examples, args.micro_batch * args.max_len, pad), 1),
    }
    model = load_model("tiny")
    budget = sum(len(b.input_ids) for b in layouts["pad-to-longest"][0][: args.measure_blocks])
    results = {}
    for name, (blocks, per_batch) in layouts.items():
        sample, got = [], 0
        for b in blocks:  # about the same number of real tokens in every layout
            if got >= budget * 0.76:
                break
            sample.append(b)
            got += b.real_tokens
        results[name] = (len(blocks), padding_fraction(blocks), throughput(sample, per_batch, model))

    print(f"\n{args.examples} examples (mean {sum(len(e) for e in examples) / len(examples):,.0f} tokens), max_len {args.max_len}, micro-batch {args.micro_batch}")
    print(f"{'':38}{'blocks':>8}{'padding':>10}{'non-pad tokens/s':>18}")
    for name, (n, frac, tps) in results.items():
        print(f"{name:38}{n:>8}{frac:>10.1%}{tps:>18,.0f}")
    base = results["pad-to-longest"][2]
    mask, varlen = results["packed, max_len blocks (mask)"], results["packed, token-budget block (varlen)"]
    print(f"tokens/s vs pad-to-longest: mask-packed {mask[2] / base:.2f}x, token-budget block {varlen[2] / base:.2f}x "
          f"(on CPU it pays a dense {args.micro_batch * args.max_len}-square mask; flash-attention varlen does not)")
    print(f"goal padding <= 2 %: token-budget block {varlen[1]:.2%} ({'met' if varlen[1] <= 0.02 else 'NOT met'}), max_len blocks {mask[1]:.2%}")
    if not args.no_record:
        record(
            "sft_packing", f"python benchmarks/sft_packing.py --examples {args.examples}",
            f"{args.examples} examples, notes 300-1,900 + answers 20-400 tokens, max_len {args.max_len}, micro-batch {args.micro_batch}, tiny LLaMA, CPU",
            f"padding: pad-to-longest {results['pad-to-longest'][1]:.1%}, packed max_len blocks {mask[1]:.1%}, packed token-budget "
            f"block {varlen[1]:.2%}; non-pad tokens/s {base:,.0f} / {mask[2]:,.0f} / {varlen[2]:,.0f}",
            f"mask-packed {mask[2] / base:.2f}x tokens/s", f"{os.cpu_count()} CPU",
        )  # fmt: skip

if __name__ == "__main__":
    main()
