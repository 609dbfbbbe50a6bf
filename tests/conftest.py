"""Shared fixtures. Tests that need Ray take `ray_local`: one local instance for the whole session (`make test
TEST_WORKERS=2` runs two sessions side by side, pytest-xdist's processes, each with its own instance and whole test files)."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# `make test TEST_WORKERS=2` runs two test processes on the machine's cores. torch (and DeepSpeed's CPU Adam) start one OpenMP thread
# per core in every process: beside the other busy process, their threads wait on each other at every parallel region
# and spin. The demo's fine-tune (tests/test_demo_ending.py) beside one busy core took 414 s and 498 CPU-s with 2
# threads, 245 s and 241 CPU-s with 1. Each test process, and every process it starts (Ray's workers inherit it),
# gets its share of the cores. Set before anything imports torch.
TEST_PROCESSES = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if TEST_PROCESSES > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // TEST_PROCESSES)))
# Every Ray instance the tests start (this session's, a CLI run's, a fake cluster's) inherits these. Each changes
# when Ray does things, never what it does:
# - Ray Train's controller looks at its workers every 2 s by default; a tiny model's run waits seconds for those
#   looks (its last checkpoint, its end). Every half second instead.
# - A node keeps up to its CPU count of idle worker processes; while training actors hold processes, the Ray Data
#   workers that tokenized (torch and transformers imported, ~8 s to start again) are killed after a second idle.
#   Kept instead, the next stage's tasks reuse them.
# - Every process exports its metrics every 10 s by default; a test that scrapes them waits for an export (and one
#   that a value outlives an export waits for two). Every 2 s instead.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_num_workers_soft_limit", "6")
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        from asclepius.cluster import start_local_ray
        from asclepius.testing.server_process import free_port

        # our own instance even if the machine runs a Ray cluster (a bare init would attach to it), started again if
        # its agent is slow (as the CLI's); its node serves the Prometheus metrics on a port of its own
        # (tests/test_metrics.py scrapes it)
        port = free_port()
        start_local_ray(dict(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=port))
        os.environ["ASCLEPIUS_TEST_METRICS_PORT"] = str(port)
    yield ray
    ray.shutdown()


def _our_named_actors() -> set[tuple[str, str]]:
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return set()
    return {(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "asclepius"}


@pytest.fixture(autouse=True)
def no_named_actor_outlives_its_test():
    """A run's rate limiter is detached (every job on a cluster shares it): in the session's one Ray instance each
    test's would stay up to the session's end, an idle process that still takes CPU (Ray's heartbeats and metrics)
    from every later test. Any named actor of ours a test leaves behind is killed when the test ends."""
    before = _our_named_actors()
    yield
    after = _our_named_actors()
    if after - before:
        import ray

        for name, namespace in after - before:
            try:
                ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
            except ValueError:  # gone meanwhile
                pass


# The device dry run's venv (tests/test_device_script.py) is pip's work: ~50-60 s in a fresh clone, on about one core
# and partly waiting on the package index. Started as the session starts, at low priority, it is built by the time its
# test comes, from cores the earlier tests leave idle; the test builds it itself if this did not finish it (so a failed
# build's error shows there). One process only: two sessions (`TEST_WORKERS=2`) would build into one folder at once.
_device_venv_build = pytest.StashKey()


def pytest_collection_finish(session):
    if os.environ.get("PYTEST_XDIST_WORKER") or not any("device_venv_build" in item.fixturenames for item in session.items):
        return
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cache = getattr(session.config, "cache", None)  # absent under -p no:cacheprovider
    log = open(cache.mkdir("device-venv") / "build.log", "w") if cache else subprocess.DEVNULL
    session.config.stash[_device_venv_build] = subprocess.Popen(
        [sys.executable, str(root / "benchmarks" / "device_image.py"), "--venv", str(root / ".device-venv")], cwd=root,
        stdout=log, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(10))  # fmt: skip
    if log is not subprocess.DEVNULL:
        log.close()  # the build holds its own copy


def pytest_sessionfinish(session):
    build = session.config.stash.get(_device_venv_build, None)
    if build is not None and build.poll() is None:  # the session ended first: a half-built venv has no stamp, and is built anew
        build.kill()
        build.wait()


@pytest.fixture(scope="session")
def device_venv_build(request):
    """Waits for the background build of the device venv, if this session started one (it does for every session that
    selects a test using this fixture)."""
    build = request.config.stash.get(_device_venv_build, None)
    if build is not None:
        build.wait()
