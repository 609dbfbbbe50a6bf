"""Packing time: the previous first-fit-decreasing scan (quadratic) vs best-fit decreasing with a segment tree.

    python benchmarks/packing_speed.py                    # 5k, 10k, 20k, 158k examples (the recipe's instruction count)

Lengths follow a log-normal around 1,260 tokens (64–2,048), the spread of the recipe's prompts + answers. The
baseline is measured up to 20k examples (at 158k it runs ~11 minutes); both pack into 2,048-token blocks and the
padding of each is printed. `packed_table` (the stored Arrow form the workers read) is timed at 158k too.
Appends a row to BENCHMARKS.md.
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

from asclepius.train.data import Example, pack_bins, packed_table  # noqa: E402
from record import record  # noqa: E402


def first_fit_decreasing(lengths: list[int], max_len: int) -> list[list[int]]:
    """The previous packing (asclepius.train.data.pack before this change): scan every open block per example."""
    bins: list[list[int]] = []
    space: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(space):
            if lengths[i] <= free:
                bins[b].append(i)
                space[b] -= lengths[i]
                break
        else:
            bins.append([i])
            space.append(max_len - lengths[i])
    return bins


def lengths_for(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [min(2048, max(64, int(rng.lognormvariate(7.1, 0.35)))) for _ in range(n)]


def timed(fn, *args):
    started = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5000,10000,20000,158000")
    ap.add_argument("--baseline-up-to", type=int, default=20000)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        lengths = lengths_for(n)
        ours, t_ours = timed(pack_bins, lengths, 2048)
        pad = 1 - sum(lengths) / (len(ours) * 2048)
        base_t = base_pad = None
        if n <= args.baseline_up_to:
            base, base_t = timed(first_fit_decreasing, lengths, 2048)
            base_pad = 1 - sum(lengths) / (len(base) * 2048)
        rows.append((n, t_ours, pad, base_t, base_pad))
        print(f"{n:>7} examples: best-fit decreasing {t_ours:6.2f} s (padding {pad:.2%})"
              + (f"; first-fit scan {base_t:6.2f} s (padding {base_pad:.2%}), {base_t / t_ours:,.0f}x" if base_t else ""))  # fmt: skip
    n = max(r[0] for r in rows)
    examples = [Example([1] * k, [-100] * (k // 2) + [1] * (k - k // 2)) for k in lengths_for(n)]
    _, t_table = timed(packed_table, examples, 2048, 0)
    print(f"packed_table at {n:,} examples (bins + the Arrow blocks the workers read): {t_table:.1f} s")
    if not args.no_record:
        figures = "; ".join(f"{r[0]:,}: ours {r[1]:.2f} s" + (f", scan {r[3]:.2f} s" if r[3] else "") for r in rows)
        biggest = max((r for r in rows if r[3]), key=lambda r: r[0])
        record("packing_speed", f"python benchmarks/packing_speed.py --sizes {args.sizes}",
               "log-normal lengths 64-2,048 (mean ~1,260), 2,048-token blocks",
               f"{figures}; padding ours {rows[-1][2]:.1%}; packed_table at {n:,}: {t_table:.1f} s",
               f"{biggest[3] / biggest[1]:,.0f}x at {biggest[0]:,}", "2 CPU")  # fmt: skip


if __name__ == "__main__":
    main()
