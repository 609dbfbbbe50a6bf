"""Runs the stages in order; each stage skips itself when its manifest entry matches its inputs and config.

The pipeline joins the stages (no stage imports another): it hands the generating stages a way to get the
teacher, which for the embedded default deploys our own Serve app first (`teacher_from_serve`).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable

from asclepius.cluster import init_ray
from asclepius.config import Config, TeacherConfig
from asclepius.generate.stages import (
    format_summary as generate_summary,
    run_answers_stage,
    run_import_stage,
    run_questions_stage,
    run_synthesize_stage,
)
from asclepius.notes.stage import format_summary as notes_summary
from asclepius.notes.stage import run_notes_stage
from asclepius.run import RunDir
from asclepius.serve.stage import format_summary as serve_summary
from asclepius.serve.stage import run_serve_stage
from asclepius.train.ray_train import format_summary as train_summary
from asclepius.train.ray_train import run_finetune_stage, run_pretrain_stage

log = logging.getLogger("asclepius")

STAGE_ORDER = ["notes", "synthesize", "questions", "answers", "pretrain", "finetune", "serve"]


class TeacherSource:
    """The teacher for the generating stages, made ready only when a stage has requests to send."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._teacher: TeacherConfig | None = None

    def __call__(self) -> TeacherConfig:
        if self._teacher is None:
            self._teacher = self._resolve()
        return self._teacher

    def release(self) -> None:
        """Take down the teacher app we deployed, giving its CPUs/GPUs back before training."""
        if self._teacher is not None and self.cfg.teacher_from_serve:
            from ray import serve

            serve.delete(self.cfg.serve.app_name)
            log.info("teacher: app %s removed", self.cfg.serve.app_name)
            self._teacher = None

    def _resolve(self) -> TeacherConfig:
        cfg = self.cfg
        if cfg.teacher_from_serve:
            from asclepius.serve.app import start

            names = [m.name for m in cfg.serve.models] if cfg.serve else []
            if cfg.teacher_from_serve not in names:
                raise ValueError(f"teacher_from_serve: {cfg.teacher_from_serve!r} is not one of serve.models {names}")
            base_url = start(cfg.serve)
            log.info("teacher: %s served by our Ray Serve app at %s", cfg.teacher_from_serve, base_url)
            base = cfg.teacher or TeacherConfig(provider="openai_compatible", base_url=base_url)
            return TeacherConfig.model_validate(
                {**base.model_dump(), "provider": "openai_compatible", "base_url": base_url, "model": cfg.teacher_from_serve}
            )
        if cfg.teacher is None:
            raise ValueError("the generating stages need a `teacher` section (or `teacher_from_serve`)")
        return cfg.teacher


def stages_for(cfg: Config, teacher: TeacherSource | None = None) -> dict[str, tuple[Callable[..., dict], Callable[[dict], str]]]:
    teacher = teacher or TeacherSource(cfg)
    stages: dict[str, tuple[Callable[..., dict], Callable[[dict], str]]] = {"notes": (run_notes_stage, notes_summary)}
    if cfg.instructions_import is not None:
        stages["answers"] = (run_import_stage, generate_summary("import"))
    else:
        stages["synthesize"] = (functools.partial(run_synthesize_stage, get_teacher=teacher), generate_summary("synthesize"))
        stages["questions"] = (functools.partial(run_questions_stage, get_teacher=teacher), generate_summary("questions"))
        stages["answers"] = (functools.partial(run_answers_stage, get_teacher=teacher), generate_summary("answers"))
    stages["pretrain"] = (run_pretrain_stage, train_summary("pretrain"))
    stages["finetune"] = (run_finetune_stage, train_summary("finetune"))
    stages["serve"] = (run_serve_stage, serve_summary)  # last: it serves what the stages before it produced
    return stages


def run_pipeline(cfg: Config, stages: list[str] | None = None, force: bool = False) -> dict[str, dict]:
    started = time.time()
    init_ray(cfg.ray)
    run = RunDir.open(cfg.run_dir)
    teacher = TeacherSource(cfg)
    available = stages_for(cfg, teacher)
    unknown = [s for s in stages or [] if s not in STAGE_ORDER]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages: {STAGE_ORDER}")
    results = {}
    for name in [s for s in STAGE_ORDER if s in available and (not stages or s in stages)]:
        runner, summary = available[name]
        t = time.time()
        entry = runner(cfg, run, force=force)
        log.info("%s", summary(entry) if not entry.get("skipped") else f"{name}: up to date, skipped")
        results[name] = {**entry, "wall_seconds": round(time.time() - t, 2)}
        if name == "answers":
            teacher.release()  # the generating stages are done
    log.info("pipeline: %d stage(s) done in %.1f s; run directory %s", len(results), time.time() - started, cfg.run_dir)
    return results
