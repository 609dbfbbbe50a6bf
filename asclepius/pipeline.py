"""Runs the stages in order under the stage contract (asclepius.run): each is skipped when its recorded outputs
match its config and inputs, resumed when it was cut off, and redone otherwise.

The pipeline joins the stages (no stage imports another): it picks the stages the config asks for and hands the
generating stages a way to get the teacher, which for the embedded default deploys our own Serve app first
(`teacher_from_serve`).
"""

from __future__ import annotations

import logging
import time

from asclepius.cluster import init_ray
from asclepius.config import Config, TeacherConfig
from asclepius.generate.answers import STAGE as ANSWERS
from asclepius.generate.importing import STAGE as IMPORT
from asclepius.generate.questions import STAGE as QUESTIONS
from asclepius.generate.split import STAGE as SPLIT
from asclepius.generate.synthesize import STAGE as SYNTHESIZE
from asclepius.notes.stage import NOTES_STAGE
from asclepius.run import RunDir, Stage, StageStatus, run_stage, stage_status
from asclepius.serve.stage import STAGE_DEF as SERVE
from asclepius.train.ray_train import FINETUNE_STAGE, PRETRAIN_STAGE

log = logging.getLogger("asclepius")

STAGE_ORDER = ["notes", "synthesize", "split", "questions", "answers", "pretrain", "finetune", "serve"]
GENERATING = {"synthesize", "questions", "answers"}


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


def pipeline_stages(cfg: Config) -> list[Stage]:
    """The stages this config runs, in order."""
    stages = [NOTES_STAGE]
    if cfg.instructions_import is not None:
        stages += [SPLIT, IMPORT]  # released instruction data takes the generating stages' place
    else:
        stages += [SYNTHESIZE, SPLIT, QUESTIONS, ANSWERS]
    if cfg.model is not None:
        stages += [PRETRAIN_STAGE, FINETUNE_STAGE]
    if cfg.serve is not None:
        stages.append(SERVE)  # last: it serves what the stages before it produced
    return stages


def pipeline_status(cfg: Config) -> list[StageStatus]:
    """Each stage's state in the run directory (complete, stale, running, never run) and why."""
    run = RunDir.open(cfg.run_dir)
    return [stage_status(s, cfg, run) for s in pipeline_stages(cfg)]


def run_pipeline(cfg: Config, stages: list[str] | None = None, force: bool = False) -> dict[str, dict]:
    unknown = [s for s in stages or [] if s not in STAGE_ORDER]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages: {STAGE_ORDER}")
    started = time.time()
    init_ray(cfg.ray)
    run = RunDir.open(cfg.run_dir)
    teacher = TeacherSource(cfg)
    selected = [s for s in pipeline_stages(cfg) if not stages or s.name in stages]
    results = {}
    try:
        for stage in selected:
            t = time.time()
            entry = run_stage(stage, cfg, run, force=force, teacher=teacher if stage.name in GENERATING else None)
            if entry.get("skipped"):
                log.info("%s: up to date, skipped", stage.name)
            elif stage.summary:
                log.info("%s", stage.summary(entry))
            results[stage.name] = {**entry, "wall_seconds": round(time.time() - t, 2)}
            if stage.name == "answers":
                teacher.release()  # the generating stages are done: give the teacher's resources to training
    finally:
        teacher.release()
    log.info("pipeline: %d stage(s) done in %.1f s; run directory %s", len(results), time.time() - started, cfg.run_dir)
    return results
