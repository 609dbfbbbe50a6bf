"""Single-GPU training throughput and MFU for a LLaMA-shaped ~1B model (bf16, seq 2048, packed blocks). No Ray.

    python benchmarks/train_mfu.py                         # on a GPU: ~1.1B LLaMA, 20 timed steps
    python benchmarks/train_mfu.py --device cpu --size tiny --steps 3   # a smoke run on CPU

It runs the same per-step work as the train loop (asclepius/train/loop.py): packed instruction blocks from
asclepius.train.data, position ids restarting per example (flash-attention varlen when flash-attn is installed,
else SDPA with the block-diagonal mask), bf16 weights, fused AdamW, gradient clipping — but without DeepSpeed,
so it runs on a machine that has only PyTorch and transformers. MFU = tokens/s × (6·N + 12·L·H·T) / peak, with
peak from asclepius.train.settings (dense bf16). Appends a row to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from record import record  # noqa: E402

from asclepius.train.data import Example, model_inputs, pack, to_columns  # noqa: E402
from asclepius.train.settings import flops_per_token, peak_flops  # noqa: E402

SIZES = {
    # ~1.1B: the TinyLlama-1.1B shape (22 layers, hidden 2048, GQA 32/4 heads, MLP 5632)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),
}


def blocks(n: int, seq: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    examples = []
    while sum(len(e) for e in examples) < n * seq * 1.05:
        length = rng.randint(seq // 8, seq)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        cut = length // 2
        examples.append(Example(ids, [-100] * cut + ids[cut:]))
    return pack(examples, seq, 0)[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        import flash_attn  # noqa: F401

        attn, packed_attention = "flash_attention_2", "position_ids"  # varlen kernels read the boundaries
    except ImportError:
        attn, packed_attention = "sdpa", "mask"
    config = LlamaConfig(**SIZES[args.size], max_position_embeddings=args.seq, attn_implementation=attn, use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0, fused=device.type == "cuda")
    data = blocks(args.micro_batch * (args.steps + args.warmup), args.seq, config.vocab_size)
    flops = flops_per_token(n_params, config.num_hidden_layers, config.hidden_size, args.seq)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(device_name)

    tokens = 0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started, tokens = time.time(), 0
        group = data[step * args.micro_batch : (step + 1) * args.micro_batch]
        batch = {k: torch.tensor(v, device=device) for k, v in to_columns(group).items()}
        loss = model(**model_inputs(batch, dtype, packed_attention)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int((batch["segment_ids"] > 0).sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.time() - started
    tps = tokens / elapsed
    mfu = tps * flops / peak if peak else None
    print(f"{args.size}: {n_params / 1e9:.2f}B params, seq {args.seq}, micro-batch {args.micro_batch}, {attn}, {device_name}")
    print(f"{tps:,.0f} non-pad tokens/s, {flops / 1e9:.1f} GFLOP/token, MFU {f'{mfu:.1%}' if mfu is not None else 'n/a'}")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    if not args.no_record:
        record(
            "train_mfu", f"python benchmarks/train_mfu.py --size {args.size} --device {args.device}",
            f"{n_params / 1e9:.2f}B LLaMA, seq {args.seq}, micro-batch {args.micro_batch}, {attn}, packed",
            f"{tps:,.0f} tokens/s, MFU {f'{mfu:.1%}' if mfu is not None else 'n/a'}", "goal >= 50 % MFU on H100", device_name,
        )  # fmt: skip

if __name__ == "__main__":
    main()
