"""Our metrics reach Ray's Prometheus export (what the dashboard's Grafana reads), recorded by the real code paths."""

import asyncio
import os
import re
import time

import pandas as pd
import pytest
import ray

from asclepius import metrics
from asclepius.config import TeacherConfig, config_from_dict
from asclepius.run import RunDir, Stage, run_stage
from asclepius.testing.prometheus import scrape_metrics, values
from asclepius.testing.server_process import openai_test_server


def test_metric_definitions_are_what_ray_accepts():
    # Ray refuses a metric whose description is not ASCII (UnicodeEncodeError), and our recorder swallows errors
    for name, (kind, description, tags) in metrics.DEFINITIONS.items():
        assert description.isascii() and name.isidentifier() and kind in ("counter", "gauge", "histogram"), name


@ray.remote(num_cpus=0)
class Worker:
    """A long-lived worker process, as a request-sending actor or a training worker is: its metrics are exported
    every few seconds while it lives (a task's short-lived process may exit before the first export)."""

    def send_requests(self, base_url: str, n: int) -> list[str]:
        """As a request-sending actor does: the client, its limiter, n requests at once, at a price."""
        from asclepius.teacher.client import ChatRequest, LocalLimiter, TeacherClient
        from asclepius.teacher.limiter import RateLimiter

        cfg = TeacherConfig(provider="openai_compatible", base_url=base_url, model="m", max_attempts=8, backoff_base_s=0.2,
                            backoff_max_s=2, requests_per_minute=1e5, tokens_per_minute=1e8,
                            prices={"m": {"prompt_per_1m": 1.0, "completion_per_1m": 2.0}})  # fmt: skip
        client = TeacherClient(cfg, LocalLimiter(RateLimiter(1e5, 1e8)))

        async def go():
            try:
                msgs = [[{"role": "user", "content": f"question {i}"}] for i in range(n)]
                return await asyncio.gather(*(client.complete(ChatRequest(m, 20, stage="probe-questions", sample_index=i)) for i, m in enumerate(msgs)))
            finally:
                await client.aclose()

        return [o.status for o in asyncio.run(go())]

    def training_step(self) -> None:  # what rank 0 records after each optimizer step (train/ray_train.py)
        metrics.training_step("probe-finetune", 7, 1.25, 1234.0, 0.41)


@pytest.mark.ray
def test_teacher_stage_and_training_metrics_are_scraped(ray_local, tmp_path):
    # a provider with 2 requests per 2 s: of 5 requests sent at once some are answered 429, retried, then served
    worker = Worker.remote()
    with openai_test_server(rpm=2, tpm=10**8, window_s=2, latency_s=0.01) as srv:
        assert ray.get(worker.send_requests.remote(srv.base_url, 5)) == ["ok"] * 5
        rate_limited = srv.stats()["statuses"].get("429", 0)
    assert rate_limited > 0

    cfg = config_from_dict({"run_dir": str(tmp_path / "run"), "notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]}})

    def work(ctx):
        ctx.run.write_frame(ctx.output("kept_rows"), pd.DataFrame({"x": [1, 2]}), "t.parquet")
        return {"counts": {"read": 5, "kept": 2, "dropped": {"too_long": 3}}}

    run_stage(Stage("metrics_probe", work, sections=("split",), outputs=("kept_rows",)), cfg, RunDir.open(cfg.run_dir))
    ray.get(worker.training_step.remote())

    found = scrape_metrics([
        "ray_asclepius_teacher_requests_total", "ray_asclepius_teacher_rate_limited_total", "ray_asclepius_teacher_retries_total",
        "ray_asclepius_teacher_tokens_total", "ray_asclepius_teacher_spend_usd_total", "ray_asclepius_stage_rows_total",
        "ray_asclepius_train_loss", "ray_asclepius_train_mfu", "ray_asclepius_train_tokens_per_second",
    ], until=lambda f: bool(values(f["ray_asclepius_stage_rows_total"], stage="metrics_probe", outcome="read"))
       and sum(values(f["ray_asclepius_teacher_requests_total"], stage="probe-questions", outcome="ok")) == 5
       and bool(values(f["ray_asclepius_train_loss"], stage="probe-finetune")))  # other tests' series show first: wait for ours
    missing = [n for n, lines in found.items() if not lines]
    assert not missing, missing
    assert sum(values(found["ray_asclepius_teacher_requests_total"], stage="probe-questions", outcome="ok")) == 5
    assert sum(values(found["ray_asclepius_teacher_rate_limited_total"], stage="probe-questions")) == rate_limited
    assert sum(values(found["ray_asclepius_teacher_retries_total"], stage="probe-questions")) >= rate_limited
    assert sum(values(found["ray_asclepius_teacher_tokens_total"], stage="probe-questions", kind="completion")) > 0
    assert sum(values(found["ray_asclepius_teacher_spend_usd_total"], stage="probe-questions")) > 0
    rows = found["ray_asclepius_stage_rows_total"]
    assert values(rows, stage="metrics_probe", outcome="read") == [5.0]
    assert values(rows, stage="metrics_probe", outcome="dropped_too_long") == [3.0]
    assert values(found["ray_asclepius_train_loss"], stage="probe-finetune") == [1.25]
    assert values(found["ray_asclepius_train_mfu"], stage="probe-finetune") == [0.41]
    # a gauge set once (a slow training step) stays on the dashboard between sets: Ray exports a set value once, and
    # our recorder sets it again every GAUGE_REFRESH_S. More than two exports later it is there again, within a
    # refresh and an export (waited for: on a busy machine the refresh and the export run late, and other tests'
    # series of the same name show first)
    time.sleep(2.5 * int(os.environ["RAY_metrics_report_interval_ms"]) / 1000)
    again = scrape_metrics(["ray_asclepius_train_loss"], timeout_s=3 * metrics.GAUGE_REFRESH_S,
                           until=lambda f: bool(values(f["ray_asclepius_train_loss"], stage="probe-finetune")))  # fmt: skip
    assert values(again["ray_asclepius_train_loss"], stage="probe-finetune") == [1.25]
    # the Grafana dashboard's panels query exactly the series names Ray exported here (asclepius.dashboard)
    from asclepius.dashboard import series_name

    for metric in ("asclepius_teacher_requests", "asclepius_teacher_rate_limited", "asclepius_teacher_retries", "asclepius_teacher_tokens",
                   "asclepius_teacher_spend_usd", "asclepius_stage_rows", "asclepius_train_loss", "asclepius_train_mfu",
                   "asclepius_train_tokens_per_second"):  # fmt: skip
        assert found[series_name(metric)], metric
    # labels name stages and outcomes, never a prompt
    assert not any(re.search(r"question \d", line) for lines in found.values() for line in lines)


def test_the_grafana_dashboard_shows_every_series_we_export_and_nothing_else():
    import json
    from pathlib import Path

    from asclepius.dashboard import dashboard, series_name
    from asclepius.metrics import DEFINITIONS

    committed = json.loads((Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "asclepius.json").read_text())
    assert committed == dashboard(), "deploy/grafana/asclepius.json is stale: python -m asclepius.dashboard > deploy/grafana/asclepius.json"
    exprs = [t["expr"] for p in committed["panels"] for t in p.get("targets", [])]
    used = {name for e in exprs for name in re.findall(r"\bray_asclepius_\w+", e)}
    assert used == {series_name(m) for m in DEFINITIONS}  # every exported series has a panel; no panel queries a name we do not export
    assert all(p["datasource"]["uid"] == "${datasource}" for p in committed["panels"] if p["type"] != "row")
    assert {p["title"] for p in committed["panels"] if p["type"] == "row"} == {"Teacher", "Stages", "Training", "Serving"}
    grid = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in committed["panels"]]
    assert len(grid) == len(set(grid))  # importable as laid out: no two panels on one spot
