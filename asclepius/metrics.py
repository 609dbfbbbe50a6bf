"""Our metrics in Ray's Prometheus export, so the Ray dashboard's Metrics view and its Grafana show them next to
Ray's own: every node serves them at http://<node>:<metrics-export-port>/metrics as `ray_asclepius_*`.

What to watch, and where the numbers come from:
  teacher   requests by outcome (ok, 429, 5xx, timeout...), prompt/completion tokens (rate() of them is tokens/min,
            to hold against the quota), 429s, retries and spend — recorded by every request-sending actor
  stages    rows read / kept / dropped by reason, per stage — recorded when a stage finishes
  training  tokens/s, loss, MFU and the step, per stage — recorded by rank 0 at every optimizer step
  serving   generations running and waiting per model (the queue), request latency by route — by each replica

Labels carry stage, outcome, model and route names only: never note text, answers, ids or keys. Recording is a no-op
in a process without Ray (unit tests, benchmarks), and a metric that cannot be recorded never fails the work.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("asclepius")
_LOCK = threading.Lock()
_METRICS: dict[str, object] = {}
LATENCY_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]

DEFINITIONS = {
    "asclepius_teacher_requests": ("counter", "Teacher requests sent, by outcome (ok, or the HTTP status / error).", ("stage", "outcome")),
    "asclepius_teacher_tokens": ("counter", "Tokens the teacher counted (usage), by kind (prompt, completion).", ("stage", "kind")),
    "asclepius_teacher_rate_limited": ("counter", "Teacher answers 429 (rate limited).", ("stage",)),
    "asclepius_teacher_retries": ("counter", "Teacher requests sent again after a retryable failure.", ("stage",)),
    "asclepius_teacher_spend_usd": ("counter", "Dollars spent on the teacher (usage times price).", ("stage",)),
    "asclepius_stage_rows": ("counter", "Rows a stage read, kept, dropped (dropped_<reason>) or otherwise counted.", ("stage", "outcome")),
    "asclepius_train_tokens_per_second": ("gauge", "Training tokens/s of the whole job (non-padding).", ("stage",)),
    "asclepius_train_loss": ("gauge", "Training loss at the last optimizer step.", ("stage",)),
    "asclepius_train_mfu": ("gauge", "Model FLOPs utilization at the last step (0-1; absent on CPU).", ("stage",)),
    "asclepius_train_step": ("gauge", "The last optimizer step.", ("stage",)),
    "asclepius_serve_generations": ("gauge", "Generations in a replica's engine, by state (running, waiting).", ("model", "state")),
    "asclepius_serve_request_seconds": ("histogram", "Request latency at the HTTP ingress, by route and status class.", ("route", "status")),
}


def _metric(name: str):
    with _LOCK:
        if name not in _METRICS:
            from ray.util import metrics

            kind, description, tags = DEFINITIONS[name]
            if kind == "counter":
                _METRICS[name] = metrics.Counter(name, description=description, tag_keys=tags)
            elif kind == "gauge":
                _METRICS[name] = metrics.Gauge(name, description=description, tag_keys=tags)
            else:
                _METRICS[name] = metrics.Histogram(name, description=description, boundaries=LATENCY_BOUNDARIES_S, tag_keys=tags)
        return _METRICS[name]


def _record(name: str, method: str, value: float, tags: dict[str, str]) -> None:
    try:
        import ray

        if not ray.is_initialized():
            return
        getattr(_metric(name), method)(value, tags={k: str(v) for k, v in tags.items()})
    except Exception as err:  # noqa: BLE001 — a metric never fails a request, a step or a stage
        log.debug("metric %s not recorded (%s)", name, type(err).__name__)


def count(name: str, value: float = 1, **tags: str) -> None:
    if value:
        _record(name, "inc", value, tags)


_LAST_GAUGES: dict[tuple, float] = {}
GAUGE_REFRESH_S = 5.0


def gauge(name: str, value: float, **tags: str) -> None:
    """Set a gauge, and keep setting it: Ray exports a gauge's value once after each set, so a value set once
    (a training step every 30 s, a queue that stays empty) would vanish from the dashboard between sets."""
    _record(name, "set", value, tags)
    with _LOCK:
        first = not _LAST_GAUGES
        _LAST_GAUGES[(name, tuple(sorted(tags.items())))] = value
    if first:
        threading.Thread(target=_refresh_gauges, name="asclepius-gauges", daemon=True).start()


def _refresh_gauges() -> None:
    while True:
        time.sleep(GAUGE_REFRESH_S)
        with _LOCK:
            current = list(_LAST_GAUGES.items())
        for (name, tags), value in current:
            _record(name, "set", value, dict(tags))


def observe(name: str, value: float, **tags: str) -> None:
    _record(name, "observe", value, tags)


# ----------------------------------------------------------------------------------------------- recorders
def teacher_request(stage: str, outcome: str, prompt_tokens: int | None = None, completion_tokens: int | None = None,
                    cost_usd: float = 0.0, retrying: bool = False) -> None:  # fmt: skip
    count("asclepius_teacher_requests", stage=stage, outcome=outcome)
    count("asclepius_teacher_tokens", prompt_tokens or 0, stage=stage, kind="prompt")
    count("asclepius_teacher_tokens", completion_tokens or 0, stage=stage, kind="completion")
    count("asclepius_teacher_spend_usd", cost_usd, stage=stage)
    if outcome == "429":
        count("asclepius_teacher_rate_limited", stage=stage)
    if retrying:
        count("asclepius_teacher_retries", stage=stage)


def stage_rows(stage: str, counts: dict | None) -> None:
    """A finished stage's row counts as the manifest records them: read, kept, every other count by its name, and
    a nested `dropped` by reason (dropped_<reason>)."""
    for outcome, n in (counts or {}).items():
        if isinstance(n, dict) and outcome == "dropped":
            for reason, m in n.items():
                if isinstance(m, (int, float)):
                    count("asclepius_stage_rows", m, stage=stage, outcome=f"dropped_{reason}")
        elif isinstance(n, (int, float)) and not isinstance(n, bool):
            count("asclepius_stage_rows", n, stage=stage, outcome=outcome)


def training_step(stage: str, step: int, loss: float, tokens_per_s: float, mfu: float | None) -> None:
    gauge("asclepius_train_step", step, stage=stage)
    gauge("asclepius_train_loss", loss, stage=stage)
    gauge("asclepius_train_tokens_per_second", tokens_per_s, stage=stage)
    if isinstance(mfu, (int, float)):
        gauge("asclepius_train_mfu", mfu, stage=stage)


def serve_queue(model: str, running: int, waiting: int) -> None:
    gauge("asclepius_serve_generations", running, model=model, state="running")
    gauge("asclepius_serve_generations", waiting, model=model, state="waiting")


def serve_request(route: str, status: int, seconds: float) -> None:
    observe("asclepius_serve_request_seconds", seconds, route=route, status=f"{status // 100}xx")
