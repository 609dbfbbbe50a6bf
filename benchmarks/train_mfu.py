"""Training throughput and MFU of the project's own loop on one GPU: DeepSpeed, the real data path, no Ray.

    python benchmarks/train_mfu.py                          # on a GPU: ~1.1B LLaMA, bf16, seq 2048, 20 timed steps
    python benchmarks/train_mfu.py --size smollm2 --steps 10
    python benchmarks/train_mfu.py --device cpu --size tiny --steps 3 --no-record   # a smoke run on CPU

What runs is what a Ray Train worker runs (asclepius/train/ray_train.py `_worker`), minus Ray: instruction examples
packed by `packed_table` into Arrow block files, read back through `BlockSource` in the epoch's seeded order,
`collate`d, and trained by `asclepius.train.loop.train` — DeepSpeed ZeRO (world size 1, nccl on a GPU), bf16,
the recipe's AdamW, gradient clipping, activation checkpointing if asked, flash-attention 2 varlen when flash-attn is
installed (else SDPA with the block-diagonal mask). MFU is the loop's own: model FLOPs (6·N + 12·L·H·T, T the
attended span of each example) per second over the device's dense bf16 peak, averaged over the timed steps.
Appends a row to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from asclepius.config import TrainHyperparams  # noqa: E402
from asclepius.train.data import BlockSource, Example, packed_table, write_blocks  # noqa: E402
from asclepius.train.loop import TrainContext, train  # noqa: E402
from asclepius.train.settings import attention_for, global_batch_accumulation, packed_block_len, rows_per_batch  # noqa: E402
from asclepius.train.settings import torch_extensions_dir  # noqa: E402
from record import record  # noqa: E402

SIZES = {
    # ~1.1B: the TinyLlama-1.1B shape (22 layers, hidden 2048, GQA 32/4 heads, MLP 5632)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    # LLaMA-7B's shape (the recipe's base): 6.7B parameters
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    # SmolLM2-135M's shape (the demo's model), randomly initialised: its weights are not on a bare GPU image
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    vocab_size=49152, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),
}  # fmt: skip


def examples(n_tokens: int, max_len: int, vocab: int, distinct: int = 64, seed: int = 0) -> list[Example]:
    """Instruction-shaped examples (prompt masked, answer learned) of 1/8 to all of max_len tokens, drawn from
    `distinct` sequences so a few steps can show the loss falling."""
    rng = random.Random(seed)
    pool = []
    for _ in range(distinct):
        length = rng.randint(max_len // 8, max_len)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        cut = length // 2
        pool.append(Example(ids, [-100] * cut + ids[cut:]))
    out, total = [], 0
    while total < n_tokens:
        out.append(pool[rng.randrange(distinct)])
        total += len(out[-1])
    return out


def run(size: str, device: str, seq: int, micro_batch: int, steps: int, warmup: int, checkpointing: bool, zero: int,
        offload: bool = False, export_dir: str | None = None, attention: str = "auto", global_batch: int = 128) -> dict:  # fmt: skip
    """`attention`: the finetune stage's packed_attention (auto: varlen with flash-attn, else flex, on GPU; mask on
    CPU). `global_batch` counts examples, as the presets do: the accumulation is what a preset's global batch of 128
    examples gives on one worker (asclepius.train.settings.global_batch_accumulation), not one step per micro-batch."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
    cuda = device == "cuda"
    hp = TrainHyperparams(epochs=1000, lr=2e-4, weight_decay=0.0, warmup_ratio=0.0, lr_scheduler="constant", global_batch=global_batch,
                          micro_batch=micro_batch, max_len=seq, bf16=True, gradient_checkpointing=checkpointing, zero_stage=zero,
                          use_gpu=cuda, packing="packed", packed_attention=attention, offload_optimizer=offload)  # fmt: skip
    packed_attention, attn = attention_for(hp, "finetune", cuda)
    block_len, rows = packed_block_len(hp), rows_per_batch(hp)
    config = LlamaConfig(**SIZES[size], max_position_embeddings=seq, use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.bfloat16 if cuda else torch.float32).to(device)
    params_b = sum(p.numel() for p in model.parameters()) / 1e9  # before ZeRO-3 partitions them (then numel() is 0)
    with tempfile.TemporaryDirectory() as tmp:
        pool = examples(int(seq * micro_batch * 64), seq, config.vocab_size)  # enough for the examples-per-row estimate
        table = packed_table(pool, block_len, 0)
        stats = {"examples": len(pool), "blocks": table.num_rows}
        accum, _ = global_batch_accumulation(hp, stats, 1, rows, "finetune")
        total_steps = warmup + steps
        need = total_steps * accum * rows
        if table.num_rows < need:  # repeat the pool until every timed step has its micro-batches
            table = packed_table(pool * (need // table.num_rows + 1), block_len, 0)
        source = BlockSource([write_blocks(table, tmp)])
        per_epoch = len(source) // rows // accum

        def batches(epoch, first):
            return source.batches(epoch, first, seed=0, rank=0, world=1, per_epoch=per_epoch * accum, rows=rows)

        result = train(model, batches, per_epoch, hp, "finetune", TrainContext(), packed_attention=packed_attention, max_steps=total_steps,
                       accumulation=accum, export_dir=export_dir)  # fmt: skip
    timed = result.history[warmup:] or result.history
    mfu = [h["mfu"] for h in timed if isinstance(h["mfu"], float)]
    return {
        "size": size, "params_b": params_b, "attn": packed_attention, "accumulation": accum,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "tokens_per_s": sum(h["tokens_per_s"] for h in timed) / len(timed), "mfu": sum(mfu) / len(mfu) if mfu else None,
        "first_loss": result.history[0]["loss"], "last_loss": result.history[-1]["loss"],
        "max_memory_gib": max((h.get("max_memory_gib", 0) for h in result.history), default=0), "steps": len(result.history),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing (the 7B preset's setting)")
    ap.add_argument("--zero", type=int, choices=[2, 3], default=2)
    ap.add_argument("--attention", choices=["auto", "varlen", "flex", "mask"], default="auto")
    ap.add_argument("--global-batch", type=int, default=128, help="examples per optimizer step (the presets' 128)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    r = run(args.size, args.device, args.seq, args.micro_batch, args.steps, args.warmup, args.checkpointing, args.zero,
            attention=args.attention, global_batch=args.global_batch)
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    print(f"{r['size']}: {r['params_b']:.2f}B params, seq {args.seq}, micro-batch {args.micro_batch}, accumulation {r['accumulation']}, {r['attn']}, ZeRO-{args.zero}, "
          f"checkpointing {'on' if args.checkpointing else 'off'}, {r['device']}")  # fmt: skip
    print(f"{r['tokens_per_s']:,.0f} non-pad tokens/s, MFU {mfu}, loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, "
          f"peak memory {r['max_memory_gib']:.1f} GiB")  # fmt: skip
    if not args.no_record:
        record("train_mfu", f"python benchmarks/train_mfu.py --size {args.size}" + (" --checkpointing" if args.checkpointing else ""),
               f"{r['params_b']:.2f}B LLaMA, seq {args.seq}, micro-batch {args.micro_batch}, {r['attn']}, packed, DeepSpeed ZeRO-{args.zero}, the project's loop",
               f"{r['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, loss {r['first_loss']:.2f} -> {r['last_loss']:.2f}, {r['max_memory_gib']:.1f} GiB",
               "goal >= 50 % MFU on H100", r["device"])  # fmt: skip


if __name__ == "__main__":
    main()
