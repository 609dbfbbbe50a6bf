"""Runs the stages in order; each stage skips itself when its manifest entry matches its inputs and config."""

from __future__ import annotations

import logging
import time
from typing import Callable

from asclepius.cluster import init_ray
from asclepius.config import Config
from asclepius.notes.stage import format_summary as notes_summary
from asclepius.notes.stage import run_notes_stage
from asclepius.run import RunDir
from asclepius.serve.stage import format_summary as serve_summary
from asclepius.serve.stage import run_serve_stage

log = logging.getLogger("asclepius")

# stage name → (runner, summary formatter). Later stages are appended here as they land.
STAGES: dict[str, tuple[Callable[..., dict], Callable[[dict], str]]] = {
    "notes": (run_notes_stage, notes_summary),
    "serve": (run_serve_stage, serve_summary),  # stays last: it serves what the stages before it produced
}


def run_stage(name: str, cfg: Config, force: bool = False) -> dict:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {list(STAGES)}")
    init_ray(cfg.ray)
    run = RunDir.open(cfg.run_dir)
    runner, summary = STAGES[name]
    entry = runner(cfg, run, force=force)
    log.info("%s", summary(entry) if not entry.get("skipped") else f"{name}: up to date, skipped")
    return entry


def run_pipeline(cfg: Config, stages: list[str] | None = None, force: bool = False) -> dict[str, dict]:
    started = time.time()
    results = {}
    for name in stages or list(STAGES):
        results[name] = run_stage(name, cfg, force=force)
    log.info("pipeline: %d stage(s) done in %.1f s; run directory %s", len(results), time.time() - started, cfg.run_dir)
    return results
