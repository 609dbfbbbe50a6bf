"""Runs the stages in order under the stage contract (asclepius.run): each is skipped when its recorded outputs
match its config and inputs, resumed when it was cut off, and redone otherwise.

The pipeline joins the stages (no stage imports another): it picks the stages the config asks for, hands the
stages that call an LLM a way to get the teacher — for the embedded default a model of our own Serve app
(`teacher_from_serve`) — and shares one Serve app between the teacher, the serve stage and the evaluation, taking
it down while training runs.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from asclepius.cluster import init_ray
from asclepius.config import Config, ConfigError, TeacherConfig, placeholders
from asclepius.console import publish_log, shown
from asclepius.evaluate.stage import STAGE as EVALUATE
from asclepius.fits import check_fits
from asclepius.generate.answers import STAGE as ANSWERS
from asclepius.generate.importing import STAGE as IMPORT
from asclepius.generate.questions import EVAL_STAGE as EVAL_QUESTIONS
from asclepius.generate.questions import STAGE as QUESTIONS
from asclepius.generate.split import STAGE as SPLIT
from asclepius.generate.synthesize import STAGE as SYNTHESIZE
from asclepius.keys import check_keys
from asclepius.lease import RunLease
from asclepius.notes.stage import NOTES_STAGE
from asclepius.run import RunDir, Stage, StageStatus, run_stage, stage_status
from asclepius.serve.stage import STAGE_DEF as SERVE
from asclepius.stages import STAGE_ORDER, TEACHER_STAGES, TRAINING  # noqa: F401 — STAGE_ORDER re-exported
from asclepius.serve.stage import ServedApp
from asclepius.storage import storage_env
from asclepius.train.ray_train import FINETUNE_STAGE, PRETRAIN_STAGE

log = logging.getLogger("asclepius")



class TeacherSource:
    """The teacher for the stages that call one, made ready only when a stage has requests to send. With
    `teacher_from_serve` it is a model of this run's Serve app, (re)deployed when needed."""

    def __init__(self, cfg: Config, served: ServedApp | None):
        self.cfg, self.served = cfg, served
        self._teacher: TeacherConfig | None = None

    def __call__(self) -> TeacherConfig:
        cfg = self.cfg
        if not cfg.teacher_from_serve:
            if cfg.teacher is None:
                raise ValueError("this stage needs a `teacher` section (or `teacher_from_serve`)")
            return cfg.teacher
        names = [m.name for m in cfg.serve.models] if cfg.serve else []
        if cfg.teacher_from_serve not in names:
            raise ValueError(f"teacher_from_serve: {cfg.teacher_from_serve!r} is not one of serve.models {names}")
        base_url = self.served.url()  # deploys the app if it is not up (it is taken down for training)
        if self._teacher is None:
            log.info("teacher: %s served by our Ray Serve app at %s", cfg.teacher_from_serve, base_url)
            base = cfg.teacher or TeacherConfig(provider="openai_compatible", base_url=base_url)
            key = {"api_key_env": cfg.serve.api_key_env, "api_key_file": cfg.serve.api_key_file}  # the app's own key
            self._teacher = TeacherConfig.model_validate(
                {**base.model_dump(), **key, "provider": "openai_compatible", "base_url": base_url, "model": cfg.teacher_from_serve}
            )
        return self._teacher


def pipeline_stages(cfg: Config) -> list[Stage]:
    """The stages this config runs, in order."""
    stages = [NOTES_STAGE]
    if cfg.instructions_import is not None:
        stages += [SPLIT, IMPORT]  # released instruction data takes the generating stages' place
    else:
        stages += [SYNTHESIZE, SPLIT, QUESTIONS, ANSWERS]
    if cfg.evaluate is not None and cfg.evaluate.dataset is None:
        stages.append(EVAL_QUESTIONS)  # while the teacher is up: the held-out notes' questions
    if cfg.model is not None:
        stages += [PRETRAIN_STAGE, FINETUNE_STAGE]
    if cfg.serve is not None:
        stages.append(SERVE)  # it serves what the stages before it produced
    if cfg.evaluate is not None:
        stages.append(EVALUATE)
    return stages


def pipeline_status(cfg: Config) -> list[StageStatus]:
    """Each stage's state in the run directory (complete, stale, running, never run) and why."""
    storage_env(cfg.storage.endpoint_url, cfg.storage.region)
    run = RunDir.open(cfg.run_dir)
    return [stage_status(s, cfg, run) for s in pipeline_stages(cfg)]


def run_pipeline(cfg: Config, stages: list[str] | None = None, force: bool = False) -> dict[str, dict]:
    """Before any stage: the config has no placeholder left, every stage fits the cluster, every key file is readable
    where it will be read, and this driver holds the run directory's lease. Then the stages, in order."""
    unknown = [s for s in stages or [] if s not in STAGE_ORDER]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages: {STAGE_ORDER}")
    left = placeholders(cfg)
    if left:
        raise ConfigError(f"the config still holds the preset's placeholders (YOUR-...) in {', '.join(left)}: set them, e.g. "
                          f"`{left[0]}=...` after the config path")  # fmt: skip
    started = time.time()
    env = storage_env(cfg.storage.endpoint_url, cfg.storage.region)
    RunLease.refuse_if_held(cfg.run_dir, cfg.lease.stale_after_s)  # a second driver stops at once, before Ray starts
    init_ray(cfg.ray, env)
    selected = [s for s in pipeline_stages(cfg) if not stages or s.name in stages]
    if cfg.ray.check_fits:  # a stage that cannot be placed would leave the job pending forever: stop before any work
        check_fits(cfg, [s.name for s in selected])
    check_keys(cfg, [s.name for s in selected])
    run = RunDir.open(cfg.run_dir)
    lease = RunLease.acquire(cfg.run_dir, cfg.lease.heartbeat_s, cfg.lease.stale_after_s)
    run = dataclasses.replace(run, lease=lease)
    served = ServedApp(cfg, run) if cfg.serve is not None else None
    teacher = TeacherSource(cfg, served)
    extra = {"served": served, "served_url": lambda: served.url(with_run_models=True) if served else _no_serve(),
             "keep_app": any(s.name == "evaluate" for s in selected)}  # fmt: skip
    results = {}
    try:
        for stage in selected:
            if stage.name in TRAINING and served is not None:
                served.release()  # training gets every CPU/GPU; the app comes back when a stage needs it
            t = time.time()
            try:
                entry = run_stage(stage, cfg, run, force=force, teacher=teacher if stage.name in TEACHER_STAGES else None, extra=extra)
            finally:
                publish_log(run)  # the full log where the run is, at every stage's end (and when one fails)
            if entry.get("skipped"):
                shown(log, "%s: up to date, skipped", stage.name)
            elif stage.summary:
                shown(log, "%s", stage.summary(entry))
            results[stage.name] = {**entry, "wall_seconds": round(time.time() - t, 2)}
    finally:
        if served is not None and not cfg.serve.keep_running:
            served.release()
        if lease is not None:
            lease.release()
    shown(log, "pipeline: %d stage(s) done in %.1f s; run directory %s", len(results), time.time() - started, cfg.run_dir)
    publish_log(run)
    return results


def _no_serve():
    raise ValueError("evaluate: a `served` candidate needs a `serve` section (serve.models)")
