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

from asclepius.config import Config, ServeConfig
from asclepius.recipe import load_recipe
from asclepius.run import RunDir, Stage, StageRun
from asclepius.serve.app import read_serve_key, start
from asclepius.storage import is_remote

log = logging.getLogger("asclepius.serve")
STAGE = "serve"


def _first_note(run: RunDir) -> tuple[str, str]:
    table = run.read_table("notes", ["note_id", "text"])
    if table is not None and table.num_rows:
        return table.column("note_id")[0].as_py(), table.column("text")[0].as_py()
    return "builtin-example", "Pt admitted w/ CHF exacerbation, diuresed w/ IV lasix, d/c home on lasix 40 mg daily."


FINETUNED = "asclepius-finetuned"


def resolve_run_sources(serve_cfg: ServeConfig, run: RunDir) -> ServeConfig:
    """A served model whose source lies in this run's outputs is loaded from the version the manifest points to, never
    from a folder that is being replaced."""
    models = [m.model_copy(update={"source": run.published_source(m.source)}) for m in serve_cfg.models]
    return serve_cfg.model_copy(update={"models": models})


def serve_config_for(cfg: Config, run: RunDir, with_run_models: bool) -> ServeConfig:
    """`serve.models`, plus — with_run_models — the model this run fine-tuned, as `asclepius-finetuned` with the
    first model's settings (unless the config serves that checkpoint already: never two copies of one model)."""
    serve_cfg = resolve_run_sources(cfg.serve, run)
    finetuned = run.output_uri("checkpoints", "finetune", "final")  # a path, or a URI every replica's node can read
    if not (with_run_models and run.exists(run.output_path("checkpoints", "finetune", "final", "config.json"))):
        return serve_cfg

    def same(source: str) -> str:
        return source.rstrip("/") if is_remote(source) else os.path.realpath(source)

    if FINETUNED in {m.name for m in serve_cfg.models} or same(finetuned) in {same(m.source) for m in serve_cfg.models}:
        return serve_cfg
    extra = serve_cfg.models[0].model_copy(update={"name": FINETUNED, "source": finetuned})
    return serve_cfg.model_copy(update={"models": [*serve_cfg.models, extra]})


class ServedApp:
    """This run's Serve app, deployed once and shared: the teacher of the generating stages (`teacher_from_serve`),
    the serve stage's smoke check, the evaluation's candidates and judge. `url(with_run_models=True)` makes sure the
    fine-tuned model is in it; `release()` gives its CPUs/GPUs back (before training)."""

    def __init__(self, cfg: Config, run: RunDir):
        self.cfg, self.run = cfg, run
        self._deployed: ServeConfig | None = None
        self._url: str | None = None

    def url(self, with_run_models: bool = False) -> str:
        want = serve_config_for(self.cfg, self.run, with_run_models)
        if self._deployed is None or (with_run_models and self._deployed != want):
            started = time.time()
            self._url = start(want)
            self._deployed = want
            log.info("serve: %s deployed at %s in %.1f s", [m.name for m in want.models], self._url, time.time() - started)
        return self._url

    @property
    def models(self) -> list[str]:
        return [m.name for m in self._deployed.models] if self._deployed else []

    def release(self) -> None:
        if self._deployed is not None:
            serve.delete(self.cfg.serve.app_name)
            log.info("serve: app %s removed", self.cfg.serve.app_name)
            self._deployed = self._url = None


def serve_work(ctx: StageRun) -> dict:
    cfg, run = ctx.cfg, ctx.run
    started = time.time()
    app = ctx.extra.get("served") or ServedApp(cfg, run)
    base_url = app.url(with_run_models=True)
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
    if not (cfg.serve.keep_running or ctx.extra.get("keep_app")):
        app.release()  # the pipeline keeps it for a stage that follows (evaluation), or the user asked to keep it
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
