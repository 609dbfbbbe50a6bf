"""Shared fixtures. Tests that need Ray take `ray_local`: one local instance for the whole session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        from asclepius.testing.server_process import free_port

        # our own instance even if the machine runs a Ray cluster (a bare init would attach to it); its node serves
        # the Prometheus metrics on a port of its own (tests/test_metrics.py scrapes it)
        port = free_port()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=port)
        os.environ["ASCLEPIUS_TEST_METRICS_PORT"] = str(port)
    yield ray
    ray.shutdown()

