"""The training loop's context under Ray Train: what a step reports, where checkpoints go, where one is restored from.

Imported by the training workers only (it brings torch and DeepSpeed's loop with it), never by the driver.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import ray.train
from ray.train import Checkpoint, CheckpointUploadMode

from asclepius.train.loop import TrainContext


@dataclass
class RayTrainContext(TrainContext):
    metrics_log: Any = None  # rank 0's metrics log (asclepius.train.ray_train._MetricsLog); None on the other ranks
    section: str = ""  # "pretrain" or "finetune": the dashboard's label

    @property
    def keeps_checkpoints(self) -> bool:
        return True

    def report(self, metrics: dict, checkpoint_dir: str | None = None, step: int = 0) -> None:
        self.history.append(metrics)
        if self.metrics_log is not None:  # rank 0: a JSON lines log for the loss curve, and the dashboard's gauges
            self.metrics_log.append(metrics, force_upload=checkpoint_dir is not None)
            from asclepius import metrics as dashboard

            dashboard.training_step(self.section, metrics["step"], metrics["loss"], metrics["tokens_per_s"], metrics.get("mfu"))
        if checkpoint_dir is None:
            # Only checkpoints go to Ray Train. A worker's reports reach Ray Train's controller through a queue of
            # one, which the controller empties once per health check (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s). With
            # a report every step, they queued in the upload thread behind one another whenever a step took less than
            # that: a checkpoint was committed long after it was cut, and the run ended 2 s per step late (12 steps of
            # the tiny model: 60 s, 38 s without). The step metrics are in the metrics log above; every rank skips
            # the same steps, so the ranks' reports stay in step.
            return
        # uploaded in the background (Ray Train's one upload thread), the local copy deleted after: a 7B ZeRO state
        # of ~94 GB no longer stops training for its upload; the last one is awaited before the run ends
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir), checkpoint_dir_name=f"step-{step:06d}",
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC)  # fmt: skip

    def latest_checkpoint(self):
        ckpt = ray.train.get_checkpoint()
        return ckpt.as_directory() if ckpt else contextlib.nullcontext(None)
