"""Build DeepSpeed's CPU Adam for this Python environment ahead of its first use: `make install` runs
`python -m asclepius.train.prebuild`.

On a CPU machine (the demo, CI), ZeRO-Offload's optimizer is DeepSpeed's CPU Adam, a C++ op that DeepSpeed compiles
the first time a process asks for it (~100 s on 2 cores). Built here, into the folder `torch_extensions_dir()` names
for this environment, a training worker loads it in well under a second. On a GPU machine nothing is built here:
DeepSpeed builds its ops against the CUDA it finds where it trains."""

from __future__ import annotations

import os
import sys
import time


def build_cpu_adam() -> str:
    """Compile (or find already compiled) DeepSpeed's CPU Adam for the CPU accelerator; the folder it is kept in."""
    from asclepius.train.settings import torch_extensions_dir

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())  # as a training worker sets it
    os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is imported: the CPU accelerator's builder
    from deepspeed.ops.op_builder import CPUAdamBuilder

    CPUAdamBuilder().load(verbose=False)
    return os.environ["TORCH_EXTENSIONS_DIR"]


def main() -> int:
    import torch

    if torch.cuda.is_available():
        print("prebuild: a GPU is visible; DeepSpeed builds its ops where it trains, against the CUDA it finds there")
        return 0
    started = time.time()
    try:
        where = build_cpu_adam()
    except Exception as exc:  # noqa: BLE001 — a missing compiler must not fail the install; DeepSpeed retries at first use
        print(f"prebuild: DeepSpeed's CPU Adam was not built ({type(exc).__name__}: {exc}); it is built at first use instead",
              file=sys.stderr)  # fmt: skip
        return 0
    print(f"prebuild: DeepSpeed's CPU Adam ready in {where} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
