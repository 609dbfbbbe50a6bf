"""`asclepius status`: a run directory's manifest as a table — each stage's state, rows in and out, time, cost —
and, given the config you would run, which stages would rerun and why."""

from __future__ import annotations

from asclepius.run import RunDir
from asclepius.stages import STAGE_ORDER as ORDER


def _rows_in_out(name: str, e: dict) -> tuple[str, str]:
    if name == "notes" and "totals" in e:
        return str(e["totals"]["read"]), str(e["totals"]["kept"])
    if name in ("pretrain", "finetune") and "data" in e:
        return f"{e['data'].get('examples', e['data'].get('blocks', '?'))} ex.", f"{e.get('final_step', '?')} steps"
    if name == "evaluate" and "items" in e:
        return f"{e['items']} items", f"{len(e.get('models', {}))} models"
    if name == "serve":
        return "", f"{len(e.get('models', []))} models"
    counts = e.get("counts") or {}
    return (str(counts["read"]) if "read" in counts else ""), (str(counts["kept"]) if "kept" in counts else "")


def _cost(e: dict) -> float:
    total = float((e.get("teacher") or {}).get("cost_usd", 0) or 0)
    total += sum(float(c.get("cost_usd", 0) or 0) for c in (e.get("costs") or {}).values() if isinstance(c, dict))
    return total


def status_rows(run: RunDir, stage_statuses: list | None = None) -> list[dict]:
    """One row per stage: recorded state, counts, seconds, dollars; given each stage's status against a config
    (asclepius.run.stage_status, as the pipeline computes it), that state and why."""
    manifest = run.read_manifest()["stages"]
    statuses = {st.name: st for st in stage_statuses or []}
    names = [n for n in ORDER if n in manifest or n in statuses] + sorted(set(manifest) - set(ORDER))
    rows = []
    for name in names:
        e = manifest.get(name) or {}
        rows_in, rows_out = _rows_in_out(name, e)
        st = statuses.get(name)
        rows.append({
            "stage": name, "state": st.state if st else e.get("status", "never run"), "rows_in": rows_in, "rows_out": rows_out,
            "seconds": e.get("seconds"), "cost_usd": round(_cost(e), 4), "recorded_at": e.get("recorded_at"),
            "why": "; ".join(st.reasons) if st and not st.up_to_date else ("" if e.get("status") != "running" else "interrupted"),
        })  # fmt: skip
    return rows


def published_outputs(run: RunDir) -> list[str]:
    """Where each output's published version is (what readers, Serve and the console use)."""
    return [f"  {name}/ → {run.output_uri(name)}" for name in sorted(run.versions())]


def status_table(rows: list[dict], run_dir: str, published: list[str] | None = None) -> str:
    header = f"{'stage':<16}{'state':<11}{'in':>12}{'out':>12}{'time':>9}{'cost':>10}  why it would rerun"
    lines = [f"run {run_dir}", header, "-" * (len(header) + 10)]
    for r in rows:
        seconds = f"{r['seconds']:.0f} s" if isinstance(r["seconds"], (int, float)) else ""
        lines.append(f"{r['stage']:<16}{r['state']:<11}{r['rows_in']:>12}{r['rows_out']:>12}{seconds:>9}{'$' + format(r['cost_usd'], ',.4f'):>10}  {r['why']}")
    total = sum(r["cost_usd"] for r in rows)
    lines.append(f"{'':<61}{'$' + format(total, ',.4f'):>10}")
    if published:
        lines += ["published outputs:", *published]
    return "\n".join(lines)
