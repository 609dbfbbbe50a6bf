"""Serve in the session's Ray instance ends with this package. Each module starts the apps it needs (Serve with them);
left running, Serve's controller and proxy would take ~3 % of a core for the rest of the session (the controller's
loop runs every 0.1 s, idle or not), from every later test."""

import sys

import pytest


@pytest.fixture(scope="package", autouse=True)
def serve_ends_with_the_package():
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        from ray import serve

        serve.shutdown()
