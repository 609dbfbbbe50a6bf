"""A pytest plugin that prints what the suite cost the machine's cores, beside `--durations`' wall times.

`make test`'s budget is wall time on a 2-core machine, and on 2 cores wall time is bounded by CPU: a suite that keeps
the cores busy for C CPU-seconds takes at least C / 2 seconds, however its tests are ordered or spread over processes.
Most of that CPU is not in the pytest process but in what the tests start (Ray's workers, servers, CLI runs), which
neither `--durations` nor the process's own rusage sees. So each test is charged the machine's busy CPU time while it
runs (setup, call and teardown): the right charge on a machine that runs the suite alone, as CI's does. What the host
took from the virtual machine (steal) is printed apart, since it makes the same work slower without being the suite's.
Under pytest-xdist two tests run at once and the machine's time cannot be split between them: only the total is shown.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import psutil
import pytest


def busy_and_stolen_cpu_s() -> tuple[float, float]:
    """The machine's CPU seconds spent on work since boot (all cores), and those the hypervisor stole."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    stolen = getattr(t, "steal", 0.0)
    guests = getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)  # already counted in user and nice on Linux
    return sum(t) - idle - stolen - guests, stolen


def cores() -> int:
    return psutil.cpu_count() or 1  # the machine's, as the busy time is


@dataclass
class Cost:
    cpu_s: float = 0.0
    wall_s: float = 0.0


def summary_lines(by_file: dict[str, Cost], total: Cost, stolen_s: float, n_cores: int, top: int = 15) -> list[str]:
    """The report: the session's busy CPU against its wall time on these cores, and the test files that used most."""
    floor = total.cpu_s / n_cores
    lines = [f"{total.cpu_s:,.0f} CPU-s busy in {total.wall_s:,.0f} s on {n_cores} cores "
             f"({total.cpu_s / max(total.wall_s * n_cores, 1e-9):.0%} of them); stolen by the host: {stolen_s:,.0f} s",
             f"so this much work takes at least {floor:,.0f} s ({floor / 60:.1f} min) here, in any order and any number of processes"]  # fmt: skip
    if by_file:
        lines.append(f"the {min(top, len(by_file))} test files using most CPU (CPU-s, wall s, share of the cores):")
        for path, cost in sorted(by_file.items(), key=lambda kv: -kv[1].cpu_s)[:top]:
            lines.append(f"{cost.cpu_s:9,.1f} {cost.wall_s:8,.1f} {cost.cpu_s / max(cost.wall_s * n_cores, 1e-9):5.0%}  {path}")
    return lines


class CpuReport:
    def __init__(self, per_test: bool):
        self.per_test = per_test
        self.by_file: dict[str, Cost] = defaultdict(Cost)
        self.start_cpu, self.start_stolen = busy_and_stolen_cpu_s()
        self.start_wall = time.monotonic()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        if not self.per_test:
            yield
            return
        cpu, wall = busy_and_stolen_cpu_s()[0], time.monotonic()
        yield
        cost = self.by_file[item.nodeid.split("::")[0]]
        cost.cpu_s += busy_and_stolen_cpu_s()[0] - cpu
        cost.wall_s += time.monotonic() - wall

    def pytest_terminal_summary(self, terminalreporter):
        cpu, stolen = busy_and_stolen_cpu_s()
        total = Cost(cpu - self.start_cpu, time.monotonic() - self.start_wall)
        terminalreporter.write_sep("=", "CPU of the machine while the tests ran")
        for line in summary_lines(dict(self.by_file), total, stolen - self.start_stolen, cores()):
            terminalreporter.write_line(line)


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # an xdist worker: its controller reports for the whole session
        return
    per_test = not getattr(config.option, "numprocesses", None)
    config.pluginmanager.register(CpuReport(per_test), "asclepius-cpu-report")
