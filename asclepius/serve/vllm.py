"""For GPU clusters with vLLM: the same served models as a `ray.serve.llm` app config (optional, never required).

    asclepius serve --config configs/asclepius-r-7b.yaml --vllm-config serve_vllm.yaml
    serve run serve_vllm.yaml        # on a cluster whose image has vLLM (`pip install "ray[llm]"`)

`ray.serve.llm.build_openai_app` takes a list of `LLMConfig`; this writes them as the plain dicts of a Serve config
file, so generating it needs no vLLM here. vLLM serves an OpenAI-compatible API (continuous batching, paged KV
cache); our `/v1/answer` formatting is the recipe's model prompt sent to `/v1/completions`.
"""

from __future__ import annotations

from asclepius.config import ServeConfig
from asclepius.models import resolve_model_source


def llm_config(model, resolve_sources: bool = True) -> dict:
    deployment: dict = {"max_ongoing_requests": model.max_batch_size + model.max_queued_requests}
    if model.autoscaling:
        deployment["autoscaling_config"] = model.autoscaling.model_dump()
    else:
        deployment["autoscaling_config"] = {"min_replicas": model.num_replicas, "max_replicas": model.num_replicas}
    engine: dict = {"dtype": "bfloat16" if model.dtype == "auto" else model.dtype}
    if model.context_length:
        engine["max_model_len"] = model.context_length
    if model.num_gpus > 1:
        engine["tensor_parallel_size"] = int(model.num_gpus)
    return {
        "model_loading_config": {
            "model_id": model.name,
            "model_source": resolve_model_source(model.source) if resolve_sources else model.source,
        },
        "deployment_config": deployment,
        "engine_kwargs": engine,
    }


def vllm_serve_config(cfg: ServeConfig, resolve_sources: bool = True) -> dict:
    return {
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": [
            {
                "name": f"{cfg.app_name}-vllm",
                "route_prefix": cfg.route_prefix,
                "import_path": "ray.serve.llm:build_openai_app",
                "args": {"llm_configs": [llm_config(m, resolve_sources) for m in cfg.models]},
            }
        ],
    }
