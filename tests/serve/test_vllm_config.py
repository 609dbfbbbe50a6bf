import yaml

from asclepius.cli import main
from asclepius.config import ServeConfig
from asclepius.serve.vllm import vllm_serve_config


def test_vllm_config_for_the_same_models(tmp_path):
    cfg = ServeConfig(
        port=8001,
        models=[
            {"name": "asclepius-7b", "source": "/ckpt/finetune/final", "num_gpus": 1, "context_length": 2048,
             "autoscaling": {"min_replicas": 1, "max_replicas": 4}},  # fmt: skip
            {"name": "teacher", "source": "/models/llama-70b", "num_gpus": 4, "num_replicas": 2, "dtype": "float16"},
        ],
    )
    out = vllm_serve_config(cfg, resolve_sources=False)
    app = out["applications"][0]
    assert app["import_path"] == "ray.serve.llm:build_openai_app" and out["http_options"]["port"] == 8001
    first, second = app["args"]["llm_configs"]
    assert first["model_loading_config"] == {"model_id": "asclepius-7b", "model_source": "/ckpt/finetune/final"}
    assert first["deployment_config"]["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    assert first["engine_kwargs"] == {"dtype": "bfloat16", "max_model_len": 2048}
    assert second["engine_kwargs"] == {"dtype": "float16", "tensor_parallel_size": 4}
    assert second["deployment_config"]["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 2}


def test_cli_writes_the_vllm_config(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]},
        "serve": {"models": [{"name": "tiny", "source": "tiny"}]},
    }))  # fmt: skip
    out = tmp_path / "vllm.yaml"
    assert main(["serve", "--config", str(config), "--vllm-config", str(out)]) == 0
    written = yaml.safe_load(out.read_text())
    source = written["applications"][0]["args"]["llm_configs"][0]["model_loading_config"]["model_source"]
    assert source.endswith("tiny-llama-v1")  # `tiny` resolved to the directory vLLM would load
