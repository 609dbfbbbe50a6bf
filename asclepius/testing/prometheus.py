"""Reading a Ray node's Prometheus export, as Prometheus (and the dashboard's Grafana) would."""

from __future__ import annotations

import os
from collections.abc import Callable
import time
import urllib.request


def scrape_metrics(names: list[str], port: int | None = None, timeout_s: float = 60.0,
                   until: Callable[[dict[str, list[str]]], bool] | None = None) -> dict[str, list[str]]:
    """Each metric name's sample lines at http://127.0.0.1:<port>/metrics, waiting until every name shows and
    `until(found)` holds (Ray exports each process's metrics every few seconds, on its own schedule: a name other
    processes already export may not carry this one's series yet). The port defaults to the test session's
    (ASCLEPIUS_TEST_METRICS_PORT)."""
    url = f"http://127.0.0.1:{port or os.environ['ASCLEPIUS_TEST_METRICS_PORT']}/metrics"
    deadline, found = time.time() + timeout_s, {}
    while time.time() < deadline:
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        found = {n: [line for line in text.splitlines() if line.startswith(n + "{")] for n in names}
        if all(found.values()) and (until is None or until(found)):
            break
        time.sleep(0.5)
    return found


def values(lines: list[str], **labels: str) -> list[float]:
    """The sample values of the lines whose labels include all of `labels`."""
    return [float(line.rsplit(" ", 1)[1]) for line in lines if all(f'{k}="{v}"' in line for k, v in labels.items())]
