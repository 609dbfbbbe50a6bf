"""The GPU proof of the training loop, for the first machine with a GPU: one script, a few minutes, rows + JSON.

    python benchmarks/gpu_smoke.py [--out DIR]         # on one GPU; DeepSpeed from a carried wheel (see README)

Each check runs the project's loop exactly as a Ray Train worker does, without Ray (benchmarks/train_mfu.run):
DeepSpeed with nccl at world size 1 — its collectives only take tensors on the GPU, the bug the CPU tests could not
see —, bf16, activation checkpointing, packed examples with flash-attention 2 when flash-attn is installed.

1. SmolLM2-135M's shape, ZeRO-2, checkpointing: the loss must fall over 30 steps; memory and MFU recorded.
2. A ~1.1B LLaMA, ZeRO-2, checkpointing (the 7B preset's setting): MFU and memory (goal ≥ 50 % on H100).
3. SmolLM2's shape, ZeRO-3, 4 steps, exported: the 16-bit gather and save_pretrained on GPU, reloaded.
4. SmolLM2's shape, ZeRO-2 with `offload_optimizer`: DeepSpeed's CPU Adam (a client AdamW is refused).

Writes `gpu_smoke.json` to --out and a row per check to BENCHMARKS.md; exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from record import record  # noqa: E402
from train_mfu import run  # noqa: E402

CHECKS = [
    ("smollm2 zero-2 checkpointing", dict(size="smollm2", steps=30, warmup=2, checkpointing=True, zero=2), "loss falls"),
    ("1b zero-2 checkpointing", dict(size="1b", steps=12, warmup=3, checkpointing=True, zero=2), "MFU"),
    ("smollm2 zero-3 export", dict(size="smollm2", steps=3, warmup=1, checkpointing=True, zero=3), "export reloads"),
    ("smollm2 zero-2 offload", dict(size="smollm2", steps=3, warmup=1, checkpointing=True, zero=2, offload=True), "CPU Adam runs"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--only", help="comma-separated check names (prefixes)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_smoke: no GPU here; this script is for a machine with one")
        return 2
    results, failed = [], False
    for name, kwargs, claim in CHECKS:
        if args.only and not any(name.startswith(o) for o in args.only.split(",")):
            continue
        started = time.time()
        entry = {"check": name, "claim": claim}
        try:
            with tempfile.TemporaryDirectory() as tmp:
                export = f"{tmp}/export" if "export" in name else None
                r = run(device="cuda", seq=args.seq, micro_batch=args.micro_batch, export_dir=export, **kwargs)
                if export:
                    from transformers import AutoModelForCausalLM

                    reloaded = AutoModelForCausalLM.from_pretrained(export)
                    r["export_params_b"] = sum(p.numel() for p in reloaded.parameters()) / 1e9
            entry.update(r, ok=True)
            if claim == "loss falls" and not r["last_loss"] < 0.9 * r["first_loss"]:
                entry.update(ok=False, error=f"loss did not fall: {r['first_loss']:.3f} -> {r['last_loss']:.3f}")
        except Exception as err:  # record and go on: one failed check must not hide the others
            entry.update(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-3000:])
        entry["seconds"] = round(time.time() - started, 1)
        failed |= not entry["ok"]
        results.append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "traceback"}), flush=True)
        if entry["ok"]:
            mfu = f"{entry['mfu']:.1%}" if entry.get("mfu") is not None else "n/a"
            record("gpu_smoke", f"python benchmarks/gpu_smoke.py --only '{name}'",
                   f"{entry['params_b']:.2f}B LLaMA-shape ({kwargs['size']}), seq {args.seq}, micro-batch {args.micro_batch}, {entry['attn']}, "
                   f"ZeRO-{kwargs['zero']}{', offload' if kwargs.get('offload') else ''}, checkpointing",
                   f"{entry['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, loss {entry['first_loss']:.2f} -> {entry['last_loss']:.2f}, "
                   f"{entry['max_memory_gib']:.1f} GiB", claim, entry["device"])  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_smoke.json").write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
