"""The cluster path: presets, cluster.yaml, KubeRay manifests, the fits-before-start check, a hermetic embedded default."""

import gzip
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from asclepius.config import config_from_dict, load_config
from asclepius.fits import ClusterTooSmall, NodeShape, check_fits, stage_needs
from asclepius.serve.app import serve_deploy_config
from asclepius.serve.sizing import GIB, ReplicaDoesNotFit, check_kv_budget, kv_bytes_per_token, largest_budget
from asclepius.testing.multinode import kill_ray_processes_under
from asclepius.testing.server_process import free_port
from asclepius.train.settings import accumulation_steps

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["asclepius-7b", "asclepius-r-7b", "asclepius-r-13b"]
RAY_PIN = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
IMAGE_DIR = "/home/ray/asclepius"  # where cluster.yaml and deploy/Dockerfile put this checkout on every node


def llama_config(size: str):
    from transformers import LlamaConfig

    dims = {"7b": (4096, 32, 32, 11008), "13b": (5120, 40, 40, 13824)}[size]  # hidden, layers, heads, ffn (LLaMA paper)
    return LlamaConfig(hidden_size=dims[0], num_hidden_layers=dims[1], num_attention_heads=dims[2], intermediate_size=dims[3])


# ----------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_keeps_the_recipes_batch_on_8_gpus(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    for section in ("pretrain", "finetune"):
        hp = getattr(cfg, section)
        assert hp.use_gpu and hp.num_workers == 8 and hp.global_batch == 128 and hp.lr == 2e-5 and hp.max_len == 2048
        accum = accumulation_steps(hp, hp.num_workers, section)
        assert hp.micro_batch * accum * hp.num_workers == 128
        # a failure restarts from the last checkpoint, not from step 0 hours earlier
        assert 0 < hp.checkpoint_every_steps <= 250 and hp.max_failures > 0
        assert hp.resources_per_worker == {"train_node": 1}
    # the served model is the one this run exports, in the run directory every node sees
    assert cfg.serve.models[0].source == f"{cfg.run_dir}/checkpoints/finetune/final"
    assert cfg.run_dir.startswith("s3://") and cfg.ray.address == "auto"  # object storage every node reaches
    # keys come from files mounted on every node, never from the job's environment
    assert cfg.teacher.api_key_file and cfg.serve.api_key_file
    if name.startswith("asclepius-r"):  # MIMIC notes never go to the public OpenAI API
        assert cfg.notes.sources[0].kind == "mimic3" and cfg.teacher.provider == "azure"
    else:
        assert cfg.notes.sources[0].kind == "pmc" and cfg.questions.note_sources == ["synthetic"]


# GPU memory as torch.cuda.mem_get_info reports it after the bf16 weights are loaded: total minus weights minus the
# CUDA context (~0.5 GiB). A10G: 22.0 GiB usable; L40S: 44.4 GiB. Weights: 6.74e9 / 13.0e9 parameters × 2 bytes.
FREE_AFTER_WEIGHTS = {("7b", "A10G"): (22.0 - 12.55 - 0.5) * GIB, ("13b", "L40S"): (44.4 - 24.2 - 0.5) * GIB}


@pytest.mark.parametrize("name,size,gpu", [("asclepius-7b", "7b", "A10G"), ("asclepius-r-7b", "7b", "A10G"), ("asclepius-r-13b", "13b", "L40S")])
def test_preset_serving_replica_fits_its_gpu(name, size, gpu):
    model = load_config(ROOT / "configs" / f"{name}.yaml").serve.models[0]
    free = FREE_AFTER_WEIGHTS[(size, gpu)]
    check_kv_budget(model.name, llama_config(size), model.max_batch_tokens, int(free))
    # the engine's default budget would not: 32,768 tokens of a 7B model's KV cache are 16 GiB
    with pytest.raises(ReplicaDoesNotFit, match=r"max_batch_tokens 32768 needs (16|25)\.0 GiB.*at most \d+"):
        check_kv_budget(model.name, llama_config(size), 32768, int(free))


def test_kv_bytes_per_token_follows_the_architecture():
    assert kv_bytes_per_token(llama_config("7b")) == 512 * 1024
    assert kv_bytes_per_token(llama_config("13b")) == 800 * 1024
    from transformers import LlamaConfig

    gqa = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    assert kv_bytes_per_token(gqa) == 128 * 1024  # grouped-query attention: a quarter of the KV heads
    assert largest_budget(llama_config("7b"), 0) == 0


# ----------------------------------------------------------------------------------------------- cluster.yaml
def cluster_yaml():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    validate_config(fillout_defaults(cluster_yaml()))


def test_cluster_yaml_is_coherent():
    c = cluster_yaml()
    assert c["docker"]["image"].startswith(f"rayproject/ray:{RAY_PIN}-py311-gpu")
    setup = "\n".join(c["setup_commands"])
    # the CUDA build of torch, pinned, then this checkout with its own pins, from where file_mounts put it
    assert re.search(r'torch==[0-9.]+" --index-url https://download.pytorch.org/whl/cu\d+', setup)
    assert c["file_mounts"][IMAGE_DIR] == "." and f"pip install --quiet -e {IMAGE_DIR}" in setup
    # token auth: one token, from the laptop, on every node; every ray start in token mode
    assert c["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    for cmd in c["head_start_ray_commands"][1:] + c["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in cmd and "--metrics-export-port=8080" in cmd
    # the head takes no work, GPU types scale from zero and back after idle_timeout
    types = c["available_node_types"]
    assert types[c["head_node_type"]]["resources"] == {"CPU": 0} and c["idle_timeout_minutes"] > 0
    gpu_types = {k: v for k, v in types.items() if k.startswith("gpu_")}
    assert gpu_types and all(v["min_workers"] == 0 for v in gpu_types.values())
    assert any(v["resources"].get("train_node") == 8 for v in gpu_types.values())
    # Serve's port is open (inside the VPC)
    rules = c["provider"]["security_group"]["IpPermissions"]
    assert any(r["FromPort"] <= 8000 <= r["ToPort"] for r in rules)
    # every preset writes to S3, which every worker type may reach through its instance profile (the head through
    # Ray's default one), and reads its keys where file_mounts put them
    assert all(v["node_config"].get("IamInstanceProfile") for k, v in types.items() if k != c["head_node_type"])
    for name in PRESETS:
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.run_dir.startswith("s3://")
        assert cfg.teacher.api_key_file in c["file_mounts"]


def test_dependencies_cover_every_import_a_job_makes():
    deps = (ROOT / "pyproject.toml").read_text()
    for package in ("rouge-score", "matplotlib", "accelerate", "gguf", "tiktoken", "deepspeed", "transformers"):
        assert f'"{package}' in deps, package


# ----------------------------------------------------------------------------------------------- KubeRay
def crd_schema(kind: str) -> dict:
    with gzip.open(ROOT / "tests" / "data" / "kuberay" / f"{kind}.v1.openAPIV3Schema.json.gz", "rt") as f:
        return json.load(f)


def validate_spec(doc: dict, kind: str) -> None:
    import jsonschema

    schema = crd_schema(kind)["properties"]["spec"]
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc["spec"]), key=lambda e: list(e.path))
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5]]


def manifests():
    return {p.stem: yaml.safe_load(p.read_text()) for p in (ROOT / "deploy" / "kuberay").glob("ray*.yaml")}


def test_the_crd_schema_copy_catches_a_wrong_manifest():
    import jsonschema

    schema = crd_schema("rayjobs")["properties"]["spec"]
    bad = manifests()["rayjob"]["spec"] | {"shutdownAfterJobFinishes": "yes"}
    assert any("is not of type 'boolean'" in e.message for e in jsonschema.Draft7Validator(schema).iter_errors(bad))
    bad = json.loads(json.dumps(manifests()["rayjob"]["spec"]))
    bad["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = "zero"
    assert list(jsonschema.Draft7Validator(schema).iter_errors(bad))


def cluster_specs():
    docs = manifests()
    return {"rayjob": docs["rayjob"]["spec"]["rayClusterSpec"], "rayservice": docs["rayservice"]["spec"]["rayClusterConfig"]}


def test_kuberay_manifests_match_the_crds():
    docs = manifests()
    assert docs["rayjob"]["kind"] == "RayJob" and docs["rayservice"]["kind"] == "RayService"
    validate_spec(docs["rayjob"], "rayjobs")
    validate_spec(docs["rayservice"], "rayservices")


def test_kuberay_rules_beyond_the_schema():
    job = manifests()["rayjob"]["spec"]
    # the entrypoint runs the pipeline with a preset this repository has, at the path the image holds it
    m = re.fullmatch(rf"python {IMAGE_DIR}/ray_jobs/pipeline\.py --config {IMAGE_DIR}/(configs/[\w.-]+\.yaml)", job["entrypoint"])
    assert m and (ROOT / m.group(1)).is_file()
    preset = load_config(ROOT / m.group(1))
    assert preset.run_dir.startswith("s3://")
    storage = list(yaml.safe_load_all((ROOT / "deploy" / "kuberay" / "storage.yaml").read_text()))
    account = next(d["metadata"]["name"] for d in storage if d["kind"] == "ServiceAccount")
    for name, spec in cluster_specs().items():
        assert spec["rayVersion"] == RAY_PIN, name  # KubeRay: rayVersion must match the image's Ray
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            pod = group["template"]["spec"]
            for container in pod["containers"]:
                assert f"ray{RAY_PIN}" in container["image"].split(":")[1] or container["image"].startswith(f"rayproject/ray:{RAY_PIN}")
                mounts = {v["name"] for v in pod["volumes"]}
                assert {m["name"] for m in container.get("volumeMounts", [])} <= mounts, name
            # every pod reaches the run bucket through the service account storage.yaml defines
            assert pod["serviceAccountName"] == account, name
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head takes no work
        assert spec["authOptions"]["mode"] == "token"
        for group in spec["workerGroupSpecs"]:
            res = group["template"]["spec"]["containers"][0]["resources"]
            gpus = res["limits"].get("nvidia.com/gpu")
            if group["groupName"].startswith("gpu"):
                assert gpus and res["requests"]["nvidia.com/gpu"] == gpus and group["minReplicas"] == 0, group["groupName"]
            else:
                assert gpus is None
    # the training group offers the custom resource the preset's workers ask for, one per GPU
    train = next(g for g in cluster_specs()["rayjob"]["workerGroupSpecs"] if "train_node" in g["rayStartParams"].get("resources", ""))
    offered = json.loads(json.loads(train["rayStartParams"]["resources"]))
    gpus = int(train["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert offered == {"train_node": gpus} and preset.finetune.resources_per_worker == {"train_node": 1}
    assert preset.finetune.num_workers <= gpus * train["maxReplicas"]


def test_rayservice_serves_our_serve_config():
    from ray.serve.schema import ServeDeploySchema

    service = manifests()["rayservice"]["spec"]
    served = yaml.safe_load(service["serveConfigV2"])
    ServeDeploySchema.model_validate(served)  # what Serve itself accepts
    path = served["applications"][0]["args"]["config"]
    assert path.startswith(IMAGE_DIR + "/")
    local = ROOT / path[len(IMAGE_DIR) + 1 :]
    assert served == serve_deploy_config(path, load_config(local).serve)  # generated from the preset, not retyped
    head_ports = {p["containerPort"] for p in service["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert served["http_options"]["port"] in head_ports


def test_print_serve_config_is_the_manifests_serve_config():
    proc = subprocess.run([sys.executable, "-m", "asclepius.cli", "serve", "--config", str(ROOT / "configs/asclepius-r-7b.yaml"),
                           "--print-serve-config", f"{IMAGE_DIR}/configs/asclepius-r-7b.yaml"],
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert yaml.safe_load(proc.stdout) == yaml.safe_load(manifests()["rayservice"]["spec"]["serveConfigV2"])


def test_app_builder_builds_the_app_from_a_preset(tmp_path):
    from ray.serve import Application

    from asclepius.serve.app import app_builder

    key = tmp_path / "serve_key"
    key.write_text("k")
    app = app_builder({"config": str(ROOT / "configs/asclepius-r-7b.yaml"), "overrides": [f"serve.api_key_file={key}"]})
    assert isinstance(app, Application)


# ----------------------------------------------------------------------------------------------- fits
def demo_like(**sections):
    base = {"run_dir": "/tmp/x", "notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]}}
    return config_from_dict({**base, **sections})


CPU_NODE = NodeShape("10.0.0.1", {"CPU": 16.0, "memory": 6e10}, 1)
TRAIN_TYPE = NodeShape("node type gpu_train_8xa100", {"CPU": 96.0, "GPU": 8.0, "train_node": 8.0}, 2)


def test_fits_refuses_gpu_training_on_a_cpu_cluster_and_says_what_is_missing():
    cfg = demo_like(finetune={"num_workers": 8, "use_gpu": True, "micro_batch": 4, "cpus_per_worker": 8})
    with pytest.raises(ClusterTooSmall) as err:
        check_fits(cfg, ["finetune"], [CPU_NODE])
    text = str(err.value)
    assert "finetune: 8 finetune.num_workers training workers × {CPU: 8, GPU: 1}: room for 0" in text
    assert "1 × 10.0.0.1 {CPU: 16" in text and "ray.check_fits: false" in text


def test_fits_counts_what_the_autoscaler_can_add():
    cfg = demo_like(finetune={"num_workers": 16, "use_gpu": True, "micro_batch": 1, "cpus_per_worker": 8,
                              "resources_per_worker": {"train_node": 1}})  # fmt: skip
    check_fits(cfg, ["finetune"], [CPU_NODE, TRAIN_TYPE])  # two 8-GPU nodes may be added: 16 workers fit
    cfg.finetune.num_workers = 17
    with pytest.raises(ClusterTooSmall, match="room for 16"):
        check_fits(cfg, ["finetune"], [CPU_NODE, TRAIN_TYPE])
    # a custom resource no node offers is never satisfied, however many GPUs there are
    cfg.finetune.num_workers, cfg.finetune.resources_per_worker = 8, {"accelerator_type:H100": 0.001}
    with pytest.raises(ClusterTooSmall, match="accelerator_type:H100"):
        check_fits(cfg, ["finetune"], [CPU_NODE, TRAIN_TYPE])


def test_fits_places_a_served_teacher_and_its_actors_together():
    cfg = demo_like(serve={"models": [{"name": "t", "source": "tiny", "num_cpus": 2}]}, teacher_from_serve="t",
                    teacher={"provider": "openai_compatible", "base_url": "http://x/v1", "num_actors": 4})  # fmt: skip
    needs = stage_needs(cfg, ["synthesize", "pretrain"])
    assert [n.what for n in needs["synthesize"]] == ["serve.models (t) replicas", "teacher.num_actors request actors"]
    check_fits(cfg, ["synthesize"], [NodeShape("n", {"CPU": 2.4}, 1)])  # 2 + 4 × 0.1
    with pytest.raises(ClusterTooSmall, match="room for 3"):
        check_fits(cfg, ["synthesize"], [NodeShape("n", {"CPU": 2.3}, 1)])


@pytest.mark.ray
def test_pipeline_stops_before_any_work_when_the_config_does_not_fit(ray_local, tmp_path):
    from asclepius.pipeline import run_pipeline

    cfg = load_config(ROOT / "configs/demo.yaml", [f"run_dir={tmp_path / 'run'}", "finetune.use_gpu=true"])
    with pytest.raises(ClusterTooSmall, match="finetune: 2 finetune.num_workers training workers × {CPU: 1, GPU: 1}: room for 0"):
        run_pipeline(cfg)
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


# ----------------------------------------------------------------------------------------------- hermetic
PROBE = """
import ray
from asclepius.cluster import init_ray
from asclepius.config import RayConfig
init_ray(RayConfig(num_cpus=1))
print("GCS", ray.get_runtime_context().gcs_address, ray.cluster_resources().get("CPU"))
"""


def test_embedded_default_starts_its_own_ray_next_to_a_running_cluster():
    # TMPDIR is where Ray keeps the "current cluster" file that a bare ray.init() attaches to; a private one makes
    # this machine's everyday state (`ray start --head` already ran) without touching the real /tmp/ray. Short,
    # because Ray's unix socket paths under it must stay within 107 characters.
    import shutil
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    try:
        _own_instance_next_to(tmp_path)
    finally:
        kill_ray_processes_under(tmp_path)
        shutil.rmtree(tmp_path, ignore_errors=True)


def _own_instance_next_to(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path), "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS")
    port = free_port()
    start = subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                            f"--temp-dir={tmp_path / 'ray'}"], env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        assert (tmp_path / "ray" / "ray_current_cluster").read_text().strip().endswith(str(port))
        probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180)
        assert probe.returncode == 0, probe.stderr[-3000:]
        gcs = probe.stdout.split("GCS ")[1].split()[0]
        assert not gcs.endswith(f":{port}")  # its own instance, not the running cluster
    finally:
        kill_ray_processes_under(tmp_path)
    # the cluster died without `ray stop`: its address file stays behind, and still nothing attaches to it
    time.sleep(1)
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180)
    assert probe.returncode == 0, probe.stderr[-3000:]
    kill_ray_processes_under(tmp_path)
