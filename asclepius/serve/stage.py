"""The serve stage of the pipeline: deploy the configured models and prove they answer.

It deploys `serve.models`, lists them through the OpenAI API, and asks `/v1/answer` one recipe seed question about
one note of the run, recording latency and token counts (never the text) in the manifest. The app is removed
afterwards unless `serve.keep_running`; `asclepius serve` / `ray_jobs/serve.py` serve for good.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.request

from ray import serve

from asclepius.recipe import load_recipe
from asclepius.run import RunDir, Stage, StageRun
from asclepius.serve.app import read_serve_key, start

log = logging.getLogger("asclepius.serve")
STAGE = "serve"


def _first_note(run: RunDir) -> tuple[str, str]:
    table = run.read_table("notes", ["note_id", "text"])
    if table is not None and table.num_rows:
        return table.column("note_id")[0].as_py(), table.column("text")[0].as_py()
    return "builtin-example", "Pt admitted w/ CHF exacerbation, diuresed w/ IV lasix, d/c home on lasix 40 mg daily."


def serve_work(ctx: StageRun) -> dict:
    cfg, run = ctx.cfg, ctx.run
    started = time.time()
    serve_cfg = cfg.serve
    finetuned = run.path("checkpoints", "finetune", "final")
    names = [m.name for m in serve_cfg.models]
    if run.is_local and os.path.exists(os.path.join(finetuned, "config.json")) and "asclepius-finetuned" not in names:
        # serve what this run trained next to the configured models, with the first model's settings
        extra = serve_cfg.models[0].model_copy(update={"name": "asclepius-finetuned", "source": finetuned})
        serve_cfg = serve_cfg.model_copy(update={"models": [*serve_cfg.models, extra]})
    base_url = start(serve_cfg)
    deployed = time.time() - started
    key = read_serve_key(cfg.serve)
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    with urllib.request.urlopen(urllib.request.Request(f"{base_url}/models", headers=headers), timeout=60) as r:
        models = [m["id"] for m in json.loads(r.read())["data"]]
    note_id, note = _first_note(run)
    question = load_recipe().tasks[7].seed_questions[1]  # a Question Answering seed question
    checks = {}
    for name in models:
        body = json.dumps({"model": name, "note": note, "question": question, "max_tokens": 48}).encode()
        t = time.time()
        with urllib.request.urlopen(urllib.request.Request(f"{base_url}/answer", data=body, headers=headers), timeout=600) as r:
            answer = json.loads(r.read())
        checks[name] = {"note_id": note_id, "latency_s": round(time.time() - t, 2), **answer["usage"], "finish_reason": answer["finish_reason"]}
    if not cfg.serve.keep_running:
        serve.delete(cfg.serve.app_name)
    return {
        "base_url": base_url,
        "models": models,
        "deploy_seconds": round(deployed, 2),
        "answer_checks": checks,
        "kept_running": cfg.serve.keep_running,
        "seconds": round(time.time() - started, 2),
    }


def format_summary(entry: dict) -> str:
    if entry.get("skipped"):
        return "serve: nothing to deploy"
    lines = [f"serve: {entry['models']} deployed in {entry['deploy_seconds']} s at {entry['base_url']}"]
    for name, c in entry["answer_checks"].items():
        lines.append(
            f"  {name}: /v1/answer on {c['note_id']}: {c['prompt_tokens']} prompt + {c['completion_tokens']} answer tokens in {c['latency_s']} s"
        )
    if not entry["kept_running"]:
        lines.append("  (app removed; `asclepius serve --config ...` serves until stopped)")
    return "\n".join(lines)


STAGE_DEF = Stage(
    name=STAGE,
    work=serve_work,
    sections=("serve",),
    upstream=("finetune",),
    always_run=True,  # it deploys what the run trained and proves it answers, every time the pipeline reaches it
    summary=format_summary,
)
