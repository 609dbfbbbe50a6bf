"""Connecting to Ray: a local instance for the embedded default, or an existing cluster."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

from asclepius.config import RayConfig

log = logging.getLogger("asclepius")
QUIET = {"on": False}  # set by asclepius.console for `asclepius run` without --verbose


def init_ray(cfg: RayConfig, env: dict[str, str] | None = None) -> None:
    """Start or join Ray once per process; a job run by `ray job submit` joins its cluster. `env`: variables every
    worker of this job needs (object storage's endpoint), passed in the job's runtime_env (Ray merges it with the
    one `ray job submit` gave)."""
    if ray.is_initialized():
        return
    # Our package must be importable by every worker: under `ray job submit --working-dir .` Ray ships it; for a
    # local run the workers inherit the driver's environment.
    quiet = QUIET["on"]  # the quiet console: Ray's own lines go to its log files, not to the driver's console
    kwargs: dict = {"log_to_driver": not quiet, "include_dashboard": cfg.include_dashboard}
    if quiet:
        kwargs.update(logging_level=logging.WARNING, configure_logging=False)
    if env:
        kwargs["runtime_env"] = {"env_vars": dict(env)}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **{k: v for k, v in kwargs.items() if k != "include_dashboard"})
        log.info("joined Ray cluster at %s", address)
        return
    # A local instance's workers inherit this process's environment: make sure they can import this package even
    # when it runs from a checkout that is not installed (e.g. `python ray_jobs/notes.py` from another directory).
    package_parent = str(Path(__file__).resolve().parents[1])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if package_parent not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([package_parent, *paths])
    if cfg.num_cpus:
        kwargs["num_cpus"] = cfg.num_cpus
    if cfg.object_store_memory_mb:
        kwargs["object_store_memory"] = cfg.object_store_memory_mb << 20
    # address="local": always a new instance of our own, even when the machine runs a Ray cluster (`ray start
    # --head`, or one that died without `ray stop`): a bare ray.init() would attach to it and refuse num_cpus.
    ray.init(address="local", **kwargs)
    log.info("started a local Ray instance (%s CPUs)", ray.cluster_resources().get("CPU"))
