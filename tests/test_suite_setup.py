"""How the suite itself runs (tests/conftest.py): under `make test`'s processes each one, and the processes it starts,
runs torch on its share of the cores."""

import os
import re
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


BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"
CHILDREN_BURN = f"""
import subprocess, sys
def test_two_children_at_once():
    children = [subprocess.Popen([sys.executable, "-c", {BURN.format(s=1.0)!r}]) for _ in range(2)]
    assert [c.wait() for c in children] == [0, 0]
"""


def test_the_cpu_report_charges_each_file_what_its_tests_and_their_processes_used(tmp_path):
    """`make test` prints the machine's busy CPU per test file (asclepius/testing/cpu_report.py): what the tests' own
    processes use counts (Ray's workers, servers and CLI runs are the suite's main cost), not just pytest's."""
    from asclepius.testing.cpu_report import cores

    (tmp_path / "test_burn.py").write_text("def test_burn():\n" + "".join("    " + line + "\n" for line in BURN.format(s=1.0).splitlines()))
    (tmp_path / "test_children.py").write_text(CHILDREN_BURN)
    (tmp_path / "test_quick.py").write_text("def test_quick():\n    pass\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "asclepius.testing.cpu_report", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = run.stdout.split("CPU of the machine while the tests ran")[1].splitlines()[1:]
    total_cpu, total_wall, n = (float(x.replace(",", "")) for x in re.match(r"([\d,.]+) CPU-s busy in ([\d,.]+) s on (\d+) cores", report[0]).groups())
    assert n == cores() and total_wall >= 2.0 and total_cpu >= 3.0 * 0.95 and "stolen by the host" in report[0]
    assert f"at least {total_cpu / n:,.0f} s" in report[1]
    rows = {line.split()[-1]: [float(x.replace(",", "")) for x in line.split()[:2]] for line in report[3:] if line.strip().endswith(".py")}
    assert set(rows) == {"test_burn.py", "test_children.py", "test_quick.py"}
    assert rows["test_burn.py"][0] >= 0.95 and rows["test_burn.py"][1] >= 1.0  # pytest's own CPU
    assert rows["test_children.py"][0] >= 1.9  # two processes it started, at once: CPU, not wall time, and not only pytest's
    assert list(rows) == sorted(rows, key=lambda f: -rows[f][0]) and list(rows)[-1] == "test_quick.py"  # most CPU first


def test_the_cpu_report_under_xdist_gives_the_total_alone():
    """Two test processes share the cores at once: the machine's time cannot be charged to either's test."""
    from asclepius.testing.cpu_report import Cost, summary_lines

    lines = summary_lines({}, Cost(cpu_s=2400.0, wall_s=1500.0), stolen_s=31.0, n_cores=2)
    assert lines == ["2,400 CPU-s busy in 1,500 s on 2 cores (80% of them); stolen by the host: 31 s",
                     "so this much work takes at least 1,200 s (20.0 min) here, in any order and any number of processes"]  # fmt: skip
    files = {f"tests/test_{i}.py": Cost(cpu_s=float(i), wall_s=1.0) for i in range(20)}
    table = summary_lines(files, Cost(cpu_s=190.0, wall_s=20.0), 0.0, 2, top=3)[3:]
    assert [line.split()[-1] for line in table] == ["tests/test_19.py", "tests/test_18.py", "tests/test_17.py"]
