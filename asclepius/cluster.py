"""Connecting to Ray: a local instance for the embedded default, or an existing cluster."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

from asclepius.config import RayConfig

log = logging.getLogger("asclepius")
QUIET = {"on": False}  # set by asclepius.console for `asclepius run` without --verbose


WORKER_LOGS: dict = {"route": None}  # set by asclepius.console: what to do with a batch of a worker's output lines


def configure_worker_logging() -> None:
    """Ray's worker_process_setup_hook for the quiet console: our loggers in workers print their level and name, so
    the driver can tell a warning (shown) from an info line (log file only). It also names this worker's own Ray
    instance in RAY_ADDRESS: code in a worker that finds "the" cluster by itself (Ray Train's placement-group cleaner
    asks the state API) fails with "Found multiple active Ray instances" on a machine that runs another one."""
    import os
    import sys

    if not os.environ.get("RAY_ADDRESS") and ray.is_initialized():  # (get_runtime_context() would start Ray otherwise)
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    ours = logging.getLogger("asclepius")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def _route_worker_logs() -> None:
    route = WORKER_LOGS["route"]
    if route is None or not QUIET["on"]:
        return
    from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler("ray_print_logs")  # Ray's printer: every line of every worker on the console
    dispatcher.add_handler("asclepius_worker_logs", route)


def started_here() -> bool:
    """This process started the Ray instance it uses (`ray.init` of a local instance): no autoscaler, its nodes are
    all there is. A driver that joined a cluster (`ray job submit`, address=auto) holds a connect-only, non-head node."""
    node = getattr(ray._private.worker, "_global_node", None)
    return bool(node is not None and node.head and getattr(node, "ray_init_cluster", True))


def init_ray(cfg: RayConfig, env: dict[str, str] | None = None) -> None:
    """Start or join Ray once per process; a job run by `ray job submit` joins its cluster. `env`: variables every
    worker of this job needs (object storage's endpoint), passed in the job's runtime_env (Ray merges it with the
    one `ray job submit` gave)."""
    if ray.is_initialized():
        return
    # Our package must be importable by every worker: under `ray job submit --working-dir .` Ray ships it; for a
    # local run the workers inherit the driver's environment.
    quiet = QUIET["on"]  # the quiet console: Ray's own lines go to its log files, not to the driver's console
    # Workers' output always comes to the driver (so `ray job logs` has the teacher's and training's warnings); the quiet
    # console routes it (WORKER_LOGS): warnings and errors on the console, everything in the log file.
    kwargs: dict = {"log_to_driver": True, "include_dashboard": cfg.include_dashboard}
    runtime_env: dict = {"worker_process_setup_hook": "asclepius.cluster.configure_worker_logging"}
    if quiet:
        kwargs.update(logging_level=logging.WARNING, configure_logging=False)
    if env:
        runtime_env["env_vars"] = dict(env)
    kwargs["runtime_env"] = runtime_env
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **{k: v for k, v in kwargs.items() if k != "include_dashboard"})
        _route_worker_logs()
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
    start_local_ray(kwargs)
    _route_worker_logs()
    log.info("started a local Ray instance (%s CPUs)", ray.cluster_resources().get("CPU"))


LOCAL_START_ATTEMPTS = 3


def start_local_ray(kwargs: dict) -> None:
    """`ray.init(address="local")`, tried again when the new node does not come up. Ray's raylet waits a fixed ~15 s
    (not configurable) for its dashboard agent to write its port, then aborts, and ray.init fails with "The current
    node timed out during startup". On a busy machine the agent's Python start-up alone can take longer (22 s on 2
    cores while two test processes trained). The failed attempt's processes (GCS, log monitor, the dead raylet) are
    this process's children; they are stopped before the next attempt."""
    import psutil

    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            ray.init(address="local", **kwargs)
            return
        except Exception as err:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(err) or attempt == LOCAL_START_ATTEMPTS:
                raise
            left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
            for p in left:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(left, timeout=10)
            log.warning("Ray's local instance did not start in time (attempt %d of %d; Ray waits a fixed ~15 s for its "
                        "agent, which a busy machine can exceed); starting it again", attempt, LOCAL_START_ATTEMPTS)  # fmt: skip
