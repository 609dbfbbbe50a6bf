"""Every GPU figure in one run on a lent device (~6 min on one H200), or every step of it here on `tiny` in seconds.

    python benchmarks/device_run.py --out $OUT           # on the device image (benchmarks/device_check.sh calls it)
    python benchmarks/device_run.py --cpu-dry-run        # here: the same steps on tiny, CPU (tests/test_device_script.py)

Steps, each in its own process with its own time limit, so that one that fails (an import, an out-of-memory, a
compile) is recorded and the others still run:
  attention 1b / 7b  a LLaMA-shaped random-init model (bf16, seq 2048, activation checkpointing, fused AdamW), one
                     training step per micro-batch of packed examples, for each attention path: the dense mask
                     (SDPA), flex_attention with a BlockMask, flash-attention varlen where flash-attn is there.
                     The 7B shape is LLaMA-7B's (hidden 4096, 32 layers); MFU = 6·N + 12·L·H·T per token / peak.
  loop 1b            the project's training loop (asclepius.train.loop: DeepSpeed ZeRO-2, the presets' global
                     batch of 128 examples) where DeepSpeed is installed or carried.
  serve 1b           our continuous-batching engine against HF `generate`, 16 concurrent requests, mixed lengths.
It writes `device.json` (every step: figures, or the error and the tail of its output) to --out and a row per
figure to benchmarks/BENCHMARKS.md. Only the standard library is imported here: an import error is a step's result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = [("environment", "-", 60), ("attention", "1b", 150), ("attention", "7b", 210), ("loop", "1b", 120), ("serve", "1b", 120)]  # (step, size, seconds)
DRY_SIZE = "tiny"


# ----------------------------------------------------------------------------------------------- steps (child processes)
def _setup_path() -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))


def step_attention(size: str, dry: bool) -> list[dict]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from asclepius.train.data import attention_seq_len, collate, model_inputs, packed_table
    from asclepius.train.settings import ATTENTION_IMPLEMENTATION, flops_per_token, peak_flops
    from train_mfu import SIZES, examples

    cuda = torch.cuda.is_available() and not dry
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    seq, micro_batch, warmup, steps = (2048, 8, 2, 4) if not dry else (256, 2, 1, 2)
    try:
        import flash_attn  # noqa: F401

        paths = ["mask", "flex", "varlen"] if cuda else ["mask", "flex"]
    except ImportError:
        paths = ["mask", "flex"]
    config = LlamaConfig(**SIZES[size], max_position_embeddings=seq, use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it trains: a 7B model is not built on the host first
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    matmul_params = n_params - model.get_input_embeddings().weight.numel()  # the loop's compute_params
    peak = peak_flops(torch.cuda.get_device_name()) if cuda else None
    pool = examples(int((warmup + steps + 1) * micro_batch * seq * 1.3), seq, config.vocab_size)
    results = []
    for path in paths:
        model.set_attn_implementation(ATTENTION_IMPLEMENTATION[path])
        rows, block_len = (micro_batch, seq) if path == "mask" else (1, micro_batch * seq)  # settings.packed_block_len
        stored = packed_table(pool, block_len, 0).to_pylist()
        batches = [collate(stored[i * rows : (i + 1) * rows]) for i in range(warmup + steps)]
        backward = cuda or path != "flex"  # flex_attention has no backward on CPU: the dry run times its forward
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        tokens = flops = 0.0
        losses = []
        for i, batch in enumerate(batches):
            if i == warmup:
                if cuda:
                    torch.cuda.synchronize()
                started, tokens, flops = time.perf_counter(), 0.0, 0.0
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            inputs = model_inputs(batch, dtype, path)
            if backward:
                loss = model(**inputs).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    loss = model(**inputs).loss
            losses.append(float(loss))
            real = float((batch["segment_ids"] > 0).sum())
            per_token = flops_per_token(matmul_params, config.num_hidden_layers, config.hidden_size, attention_seq_len(batch["segment_ids"]))
            tokens += real
            flops += real * per_token * (1.0 if backward else 1 / 3)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        results.append({
            "step": "attention", "size": size, "path": path, "params_b": round(n_params / 1e9, 3), "seq": seq, "micro_batch": micro_batch,
            "rows": rows, "training": backward, "tokens_per_s": tokens / elapsed, "mfu": flops / elapsed / peak if peak else None,
            "loss_first": losses[0], "loss_last": losses[-1], "timed_steps": steps,
            "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
        })  # fmt: skip
        del optimizer
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()
    return results


def step_loop(size: str, dry: bool) -> list[dict]:
    import torch

    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        return [{"step": "loop", "size": size, "skipped": f"DeepSpeed is not installed or carried ({err})"}]
    from train_mfu import run

    cuda = torch.cuda.is_available() and not dry
    if dry:
        r = run("tiny", "cpu", seq=256, micro_batch=2, steps=2, warmup=1, checkpointing=True, zero=2, global_batch=16)
    else:
        r = run(size, "cuda", seq=2048, micro_batch=8, steps=5, warmup=2, checkpointing=True, zero=2)
    return [{"step": "loop", **r, "zero": 2, "device": r["device"] if cuda else "cpu"}]


def step_serve(size: str, dry: bool) -> list[dict]:
    import torch

    from asclepius.models import load_tokenizer, resolve_model_source
    from serve_throughput import engine_only

    cuda = torch.cuda.is_available() and not dry
    args = argparse.Namespace(model="tiny", device="cuda" if cuda else "cpu", clients=16, seconds=20.0 if cuda else 4.0,
                              warmup=5.0 if cuda else 0.5, threads=os.cpu_count())  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        if cuda:  # a random-init model of the size, with tiny's tokenizer (no weights can be fetched on the device)
            from transformers import LlamaConfig, LlamaForCausalLM

            from train_mfu import SIZES

            tok = load_tokenizer(resolve_model_source("tiny"))
            config = LlamaConfig(**{**SIZES[size], "vocab_size": len(tok)}, max_position_embeddings=4096, tie_word_embeddings=False)
            torch.manual_seed(0)
            LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).save_pretrained(tmp)
            tok.save_pretrained(tmp)
            args.model = tmp
        ours, naive, machine = engine_only(args)
    return [{"step": "serve", "size": size if cuda else DRY_SIZE, "clients": args.clients, "ours_tokens_per_s": ours["tps"],
             "naive_tokens_per_s": naive["tps"], "speedup": ours["tps"] / max(naive["tps"], 1e-9), "ours_p95_short_s": ours["p95_short"],
             "ours_p95_long_s": ours["p95_long"], "naive_p95_short_s": naive["p95_short"], "requests": ours["requests"], "device": machine}]  # fmt: skip


def step_environment(size: str, dry: bool) -> list[dict]:
    import importlib
    import importlib.metadata
    import platform

    found = {}
    for name in ("torch", "transformers", "deepspeed", "flash_attn", "pydantic", "pyarrow", "accelerate"):
        try:
            importlib.import_module(name)
            found[name] = importlib.metadata.version(name.replace("_", "-"))
        except Exception as err:  # noqa: BLE001 - what is missing is the result
            found[name] = f"missing: {type(err).__name__}"
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return [{"step": "environment", "python": platform.python_version(), "packages": found, "gpu": gpu, "dry_run": dry}]


STEP_FUNCTIONS = {"environment": step_environment, "attention": step_attention, "loop": step_loop, "serve": step_serve}


# ----------------------------------------------------------------------------------------------- orchestration (stdlib only)
def run_step(name: str, size: str, limit_s: float, dry: bool, results_file: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--size", size, "--results", str(results_file)]
    if dry:
        cmd.append("--cpu-dry-run")
    started = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s, cwd=ROOT)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, output = "timeout", (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
    entry = {"step": name, "size": size, "rc": rc, "seconds": round(time.time() - started, 1)}
    if rc != 0:
        entry["output_tail"] = output[-3000:]
    return entry


def rows_for_benchmarks(results: list[dict]) -> list[tuple]:
    rows = []
    for r in results:
        mfu = f"MFU {r['mfu']:.1%}" if isinstance(r.get("mfu"), float) else "MFU n/a"
        memory = f"{r['max_memory_gib']:.1f} GiB" if isinstance(r.get("max_memory_gib"), (int, float)) and r["max_memory_gib"] else "memory n/a"
        if r.get("step") == "attention":
            rows.append(("device_run", f"python benchmarks/device_run.py (attention {r['size']})",
                         f"{r['params_b']:.2f}B LLaMA-shape, bf16, seq {r['seq']}, micro-batch {r['micro_batch']} ({r['rows']} row(s)), "
                         f"packed, activation checkpointing, fused AdamW, attention {r['path']}",
                         f"{r['tokens_per_s']:,.0f} tokens/s, {mfu}, {memory}" + ("" if r["training"] else ", forward only"),
                         "goal >= 50 % MFU at 7B shape", r["device"]))  # fmt: skip
        elif r.get("step") == "loop" and "skipped" not in r:
            rows.append(("device_run", "python benchmarks/device_run.py (loop)",
                         f"{r['params_b']:.2f}B LLaMA-shape, the project's loop, DeepSpeed ZeRO-2, attention {r['attn']}, accumulation {r['accumulation']}",
                         f"{r['tokens_per_s']:,.0f} tokens/s, {mfu}, loss {r['first_loss']:.2f} -> {r['last_loss']:.2f}, {memory}",
                         "goal >= 50 % MFU", r["device"]))  # fmt: skip
        elif r.get("step") == "serve":
            rows.append(("device_run", "python benchmarks/device_run.py (serve)",
                         f"{r['size']} random-init, {r['clients']} concurrent requests, max_tokens 8-256 mixed, greedy, engine without Ray",
                         f"ours {r['ours_tokens_per_s']:.0f} tok/s, p95 short {r['ours_p95_short_s']:.2f} s; HF generate {r['naive_tokens_per_s']:.0f} tok/s",
                         f"{r['speedup']:.2f}x tok/s", r["device"]))  # fmt: skip
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/device-out"))
    ap.add_argument("--cpu-dry-run", action="store_true", help="every step on tiny, on the CPU, in seconds")
    ap.add_argument("--only", help="comma-separated steps (attention,loop,serve)")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--results", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.step:  # a child: one step, its results appended as JSON lines
        _setup_path()
        if not args.cpu_dry_run:
            os.environ.pop("DS_ACCELERATOR", None)
        else:
            os.environ["DS_ACCELERATOR"] = "cpu"
        if args.cpu_dry_run and args.step in ("attention", "loop"):
            from train_mfu import SIZES

            missing = [size for step, size, _ in STEPS if step == args.step and size not in SIZES]
            assert not missing, f"sizes {missing} of step {args.step} are not in train_mfu.SIZES"  # the device would find out
        results = STEP_FUNCTIONS[args.step](DRY_SIZE if args.cpu_dry_run and args.step != "serve" else args.size, args.cpu_dry_run)
        with open(args.results, "a", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
                print(json.dumps(r), flush=True)
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "device_steps.jsonl"
    results_file.unlink(missing_ok=True)
    steps = [s for s in STEPS if not args.only or s[0] in args.only.split(",")]
    if args.cpu_dry_run:  # one size is enough to go through every step
        steps = [s for i, s in enumerate(steps) if s[0] not in [t[0] for t in steps[:i]]]
    runs = []
    for name, size, limit_s in steps:
        entry = run_step(name, size, limit_s * (3 if args.cpu_dry_run else 1), args.cpu_dry_run, results_file)
        runs.append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "output_tail"}), flush=True)
        if entry["rc"] != 0:
            print(entry["output_tail"][-1500:], flush=True)
    results = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    environment = {"python": sys.version.split()[0], "dry_run": args.cpu_dry_run}
    summary = {"environment": environment, "runs": runs, "results": results}
    (out / "device.json").write_text(json.dumps(summary, indent=1))
    _setup_path()
    from record import record

    rows = rows_for_benchmarks(results)
    (out / "device_rows.md").write_text("".join("| " + " | ".join(str(c) for c in row) + " |\n" for row in rows))
    if not args.cpu_dry_run:  # a dry run proves the steps run; its CPU figures are not GPU figures
        for row in rows:
            record(*row)
    failed = [r for r in runs if r["rc"] != 0]
    print(f"device_run: {len(runs) - len(failed)}/{len(runs)} steps ran, {len(results)} results -> {out / 'device.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
