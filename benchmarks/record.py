"""One place that appends a benchmark's result row to BENCHMARKS.md (date | benchmark | command | data |
figures | ratio | machine)."""

from __future__ import annotations

import time
from pathlib import Path

TABLE = Path(__file__).resolve().parent / "BENCHMARKS.md"


def record(benchmark: str, command: str, data: str, figures: str, ratio: str, machine: str) -> None:
    cells = [time.strftime("%Y-%m-%d"), benchmark, f"`{command}`", data, figures, ratio, machine]
    with open(TABLE, "a", encoding="utf-8") as f:
        f.write("| " + " | ".join(cells) + " |\n")
