"""Progress of a long stage, handed down: the teacher reports to whatever display the console plugged in here,
and imports nothing above it (asclepius.console sets the display; tests and library users may set their own)."""

from __future__ import annotations

from typing import Callable, Protocol


class Bar(Protocol):
    def update(self, done: int, info: str) -> None: ...

    def close(self) -> None: ...


_DISPLAY: dict[str, Callable[[str, int], Bar | None] | None] = {"make_bar": None}


def set_display(make_bar: Callable[[str, int], Bar | None] | None) -> None:
    """`make_bar(stage, total)` returns a live bar, or None for log lines only."""
    _DISPLAY["make_bar"] = make_bar


def live_bar(stage: str, total: int) -> Bar | None:
    make_bar = _DISPLAY["make_bar"]
    if make_bar is None:
        return None
    try:
        return make_bar(stage, total)
    except Exception:  # no rich, or no terminal after all: log lines instead
        return None
