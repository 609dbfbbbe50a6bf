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
