"""The Grafana dashboard for every `ray_asclepius_*` series (asclepius.metrics), built from the metric definitions so
that it shows all of them and nothing the code does not export:

    python -m asclepius.dashboard > deploy/grafana/asclepius.json

Import it in Grafana (Dashboards → Import), or let the launcher's head (cluster.yaml) and KubeRay's Grafana sidecar
(deploy/kuberay/monitoring.yaml) load it. Ray exports a counter `x` as `ray_x_total`, a gauge as `ray_x`, a histogram
as `ray_x_bucket` / `_sum` / `_count` (tests/test_metrics.py checks this against a real scrape).
"""

from __future__ import annotations

import json

from asclepius.metrics import DEFINITIONS

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
UID = "asclepius-pipeline"


def series_name(metric: str) -> str:
    """The name Ray's Prometheus export gives one of our metrics (histograms: the bucket series)."""
    kind = DEFINITIONS[metric][0]
    return {"counter": f"ray_{metric}_total", "gauge": f"ray_{metric}", "histogram": f"ray_{metric}_bucket"}[kind]


# Per metric: (panel title, PromQL over the series, unit, legend). Every definition needs one (a test says so).
PANELS: dict[str, tuple[str, str, str, str]] = {
    "asclepius_teacher_requests": ("Teacher requests/s by outcome", "sum by (stage, outcome) (rate({s}[1m]))", "reqps", "{{stage}} {{outcome}}"),
    "asclepius_teacher_tokens": ("Teacher tokens/min (hold against the quota)", "60 * sum by (stage, kind) (rate({s}[1m]))", "short", "{{stage}} {{kind}}"),
    "asclepius_teacher_rate_limited": ("Teacher 429s/min", "60 * sum by (stage) (rate({s}[5m]))", "short", "{{stage}}"),
    "asclepius_teacher_retries": ("Teacher retries/min", "60 * sum by (stage) (rate({s}[5m]))", "short", "{{stage}}"),
    "asclepius_teacher_spend_usd": ("Teacher spend (USD)", "sum by (stage) ({s})", "currencyUSD", "{{stage}}"),
    "asclepius_stage_rows": ("Stage rows by outcome (read, kept, dropped_<reason>)", "sum by (stage, outcome) ({s})", "short", "{{stage}} {{outcome}}"),
    "asclepius_train_tokens_per_second": ("Training tokens/s", "sum by (stage) ({s})", "short", "{{stage}}"),
    "asclepius_train_loss": ("Training loss", "max by (stage) ({s})", "short", "{{stage}}"),
    "asclepius_train_mfu": ("Training MFU", "max by (stage) ({s})", "percentunit", "{{stage}}"),
    "asclepius_train_step": ("Training step", "max by (stage) ({s})", "short", "{{stage}}"),
    "asclepius_serve_generations": ("Serving: generations running / waiting per model", "sum by (model, state) ({s})", "short", "{{model}} {{state}}"),
    "asclepius_serve_request_seconds": ("Serving: request latency p50 / p95 by route",
                                        "histogram_quantile({q}, sum by (le, route) (rate({s}[5m])))", "s", "{{route}} p{p}"),
}  # fmt: skip
ROWS = [("Teacher", "asclepius_teacher_"), ("Stages", "asclepius_stage_"), ("Training", "asclepius_train_"), ("Serving", "asclepius_serve_")]


def _targets(metric: str) -> list[dict]:
    _, query, _, legend = PANELS[metric]
    s = series_name(metric)
    if "{q}" in query:  # latency quantiles
        return [{"datasource": DATASOURCE, "expr": query.format(q=q, s=s), "legendFormat": legend.replace("{p}", str(int(q * 100))),
                 "refId": chr(65 + i)} for i, q in enumerate((0.5, 0.95))]  # fmt: skip
    return [{"datasource": DATASOURCE, "expr": query.replace("{s}", s), "legendFormat": legend, "refId": "A"}]


def dashboard() -> dict:
    missing = set(DEFINITIONS) - set(PANELS)
    if missing:
        raise KeyError(f"metrics without a dashboard panel: {sorted(missing)}")
    panels, y, pid = [], 0, 1
    for title, prefix in ROWS:
        panels.append({"type": "row", "title": title, "id": pid, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        for i, metric in enumerate(m for m in DEFINITIONS if m.startswith(prefix)):
            panels.append({
                "type": "timeseries", "id": pid, "title": PANELS[metric][0], "description": DEFINITIONS[metric][1],
                "datasource": DATASOURCE, "targets": _targets(metric),
                "fieldConfig": {"defaults": {"unit": PANELS[metric][2]}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}, "tooltip": {"mode": "multi"}},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": y + 8 * (i // 2)},
            })  # fmt: skip
            pid += 1
        y += 8 * ((i + 2) // 2)
    return {
        "uid": UID, "title": "Asclepius pipeline", "tags": ["asclepius", "ray"], "timezone": "browser", "schemaVersion": 39,
        "version": 1, "editable": True, "refresh": "30s", "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
                                 "current": {}, "hide": 0, "refresh": 1}]},
        "annotations": {"list": []}, "panels": panels,
    }  # fmt: skip


def main() -> None:
    print(json.dumps(dashboard(), indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
