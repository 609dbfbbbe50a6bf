"""Instruction tuning's loss: transformers' own (logits at every position) vs the loop's `next_token_loss` (the
vocabulary projection only where the next token is learned), forward + backward on SmolLM2-135M (the demo's base,
shipped in a package: no download).

    python benchmarks/loss_projection.py                 # 6 packed blocks of 1,024 tokens, 2 rounds, CPU
    python benchmarks/loss_projection.py --max-len 2048 --blocks 4

Examples are sft_packing's (recipe prompt, notes of 300–1,900 tokens, answers of 20–400), packed into max_len blocks
as the CPU path trains them. The two losses alternate block by block, so a machine's drift weighs on both alike; each
block's two losses must agree. Appends a row to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from asclepius.models import load_model  # noqa: E402
from asclepius.train.data import collate, model_inputs, packed_table  # noqa: E402
from asclepius.train.loop import next_token_loss  # noqa: E402
from record import record  # noqa: E402
from sft_packing import make_examples  # noqa: E402


def transformers_loss(model, inputs: dict) -> torch.Tensor:
    return model(**inputs).loss


def loop_loss(model, inputs: dict) -> torch.Tensor:
    return next_token_loss(model, inputs)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    # the tiny tokenizer's ids (< 1,000) are valid SmolLM2 inputs: the text is meaningless, the shapes and the share of
    # learned tokens are the recipe's
    rows = packed_table(make_examples(args.blocks * 3, args.max_len), args.max_len, 0).to_pylist()[: args.blocks]
    batches = [collate([r]) for r in rows]
    learned = sum(sum(r["loss_mask"]) for r in rows) / sum(len(r["loss_mask"]) for r in rows)
    model = load_model("smollm2")
    model.config.use_cache = False
    model.train(False)  # no dropout: both losses see the same network
    seconds = {"transformers": 0.0, "next_token_loss": 0.0}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for batch in batches:
            for name, loss_fn in (("transformers", transformers_loss), ("next_token_loss", loop_loss)):
                inputs = model_inputs(batch, torch.float32, "mask")
                started = time.perf_counter()
                loss = loss_fn(model, inputs)
                loss.backward()
                if round_:
                    seconds[name] += time.perf_counter() - started
                model.zero_grad(set_to_none=True)
                if name == "transformers":
                    expected = loss.item()
                elif abs(loss.item() - expected) > 1e-4:
                    raise SystemExit(f"the losses differ: {expected} vs {loss.item()}")
    timed = args.blocks * args.rounds
    full, kept = seconds["transformers"] / timed, seconds["next_token_loss"] / timed
    vocab = model.config.vocab_size
    print(f"\n{args.blocks} blocks of {args.max_len} tokens, {learned:.1%} of tokens learned, SmolLM2-135M fp32, {torch.get_num_threads()} threads")
    print(f"forward + backward per block: transformers' loss {full:.2f} s, next_token_loss {kept:.2f} s ({full / kept:.2f}x)")
    print(f"fp32 logits per block: {args.max_len * vocab * 4 / 2**20:,.0f} MiB at every position; ~{learned * args.max_len * vocab * 4 / 2**20:,.0f} MiB "
          f"where the next token is learned (at Llama 3's 128,256-token vocabulary and 2,048 tokens: {2048 * 128256 * 4 / 2**30:.2f} GiB)")  # fmt: skip
    if not args.no_record:
        record(
            "loss_projection", f"python benchmarks/loss_projection.py --max-len {args.max_len} --blocks {args.blocks}",
            f"{args.blocks} packed blocks of {args.max_len} tokens ({learned:.1%} learned), sft_packing's examples, SmolLM2-135M fp32, CPU",
            f"forward + backward per block: transformers' loss {full:.2f} s, next_token_loss {kept:.2f} s; losses equal",
            f"{full / kept:.2f}x faster", f"{os.cpu_count()} CPU",
        )  # fmt: skip


if __name__ == "__main__":
    main()
