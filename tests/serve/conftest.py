"""Serve in the session's Ray instance ends with this folder's last test. Each module starts the apps it needs (Serve
with them); left running, Serve's controller and proxy would take ~3 CPU-s a minute for the rest of the session (the
controller's loop runs every 0.1 s, idle or not), from every later test. (A package-scoped fixture does not do this:
this folder is not a Python package, and pytest tore such a fixture down only at the session's end.)"""

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(trylast=True)  # after pytest's own teardown, which ran the modules' fixtures' finalizers (their apps)
def pytest_runtest_teardown(item, nextitem):
    if nextitem is not None and Path(nextitem.path).resolve().parent == HERE:
        return
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        from ray import serve

        serve.shutdown()
