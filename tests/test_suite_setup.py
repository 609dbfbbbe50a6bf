"""How the suite itself runs (tests/conftest.py): under `make test`'s processes each one, and the processes it starts,
runs torch on its share of the cores."""

import os
import subprocess
import sys

import torch


def test_each_test_process_uses_its_share_of_the_cores():
    """torch runs one thread per core of the process's share (OMP_NUM_THREADS, unless the caller set it): more spin
    against the other process's work."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True,
                           text=True, check=True)  # fmt: skip
    assert int(child.stdout) == torch.get_num_threads()


def test_serve_did_not_outlive_the_serve_tests():
    """tests/serve/conftest.py shuts Serve down after that folder's last test (this file runs after it in `make test`):
    an idle controller and proxy left in the session's instance take ~3 CPU-s a minute from every later test."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return  # run alone, or before any test started the session's instance: no Serve there to outlive anything
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"}
    assert not names, names
