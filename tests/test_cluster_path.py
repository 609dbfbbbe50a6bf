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
    # one image, the project's own (deploy/Dockerfile), which KubeRay runs too: nothing is pip-installed when a node joins
    image = c["docker"]["image"]
    assert image.endswith(f":0.1.0-ray{RAY_PIN}-py311-gpu") and image == kuberay_images().pop()
    setup = "\n".join(c["setup_commands"])
    assert "pip install" not in setup and IMAGE_DIR not in c["file_mounts"]
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{RAY_PIN}-py311-gpu" in dockerfile
    assert re.search(r'torch==[0-9.]+" --index-url https://download.pytorch.org/whl/cu\d+', dockerfile)
    assert dockerfile.index('"bitsandbytes==') > dockerfile.index("torch==")  # qlora's 4-bit base, on the CUDA torch
    # token auth: one token, from the laptop, on every node; every ray start in token mode
    assert c["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [cmd for cmd in c["head_start_ray_commands"] + c["worker_start_ray_commands"] if "ray start" in cmd]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in cmd and "--metrics-export-port=8080" in cmd for cmd in starts)
    # the head takes no work, GPU types scale from zero and back after idle_timeout
    types = c["available_node_types"]
    assert types[c["head_node_type"]]["resources"] == {"CPU": 0} and c["idle_timeout_minutes"] > 0
    gpu_types = {k: v for k, v in types.items() if k.startswith("gpu_")}
    assert gpu_types and all(v["min_workers"] == 0 for v in gpu_types.values())
    assert any(v["resources"].get("train_node") == 8 for v in gpu_types.values())
    # pinned hosts: one GPU AMI (current driver) on every node, private subnets, internal IPs, own roles
    assert len({v["node_config"]["ImageId"] for v in types.values()}) == 1 and c["provider"]["use_internal_ips"] is True
    assert "base-oss-nvidia-driver-gpu" in (ROOT / "cluster.yaml").read_text()  # the AMI family the README pins
    assert all(v["node_config"].get("SubnetIds") for v in types.values())
    assert types[c["head_node_type"]]["node_config"]["IamInstanceProfile"] == {"Name": "asclepius-head"}
    assert all(v["node_config"]["IamInstanceProfile"] == {"Name": "asclepius-worker"} for k, v in types.items() if k != c["head_node_type"])
    # Serve's port is open to the VPC's own CIDR (whatever it is: not a guessed 10.0.0.0/8)
    rules = c["provider"]["security_group"]["IpPermissions"]
    serve_rules = [r for r in rules if r["FromPort"] <= 8000 <= r["ToPort"]]
    assert serve_rules and all(ip["CidrIp"] == "YOUR-VPC-CIDR" for r in serve_rules for ip in r["IpRanges"])
    # metrics: Prometheus and Grafana on the head, the dashboard embedding them, our dashboard provisioned
    head = "\n".join(c["head_start_ray_commands"])
    assert "RAY_PROMETHEUS_HOST=http://127.0.0.1:9090" in head and "RAY_GRAFANA_HOST=http://127.0.0.1:3000" in head
    assert "prometheus --config.file=/tmp/ray/session_latest/metrics/prometheus/prometheus.yml" in head and "grafana server" in head
    assert "/opt/asclepius/grafana/asclepius.json" in head and "deploy/grafana/asclepius.json /opt/asclepius/grafana/asclepius.json" in dockerfile
    # every preset writes to S3 and every key file it reads is on every node, where the preset looks for it
    from asclepius.keys import key_files
    from asclepius.stages import STAGE_ORDER

    for name in PRESETS:
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.run_dir.startswith("s3://")
        keys = key_files(cfg, STAGE_ORDER)
        assert {k.field for k in keys} >= {"teacher.api_key_file", "serve.api_key_file"}, name
        assert all(k.path in c["file_mounts"] and k.path in setup for k in keys), (name, keys)


def test_the_image_holds_no_run_data_and_no_local_state():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"runs/", ".venv/", ".git/"} <= set(ignored)
    copies = [line.split()[-2] if len(line.split()) > 3 else line.split()[1] for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY")]  # fmt: skip
    assert "." not in copies and not any(c.startswith(("runs", "tests", ".venv", ".git")) for c in copies), copies


def test_iam_policies_are_the_readmes():
    readme = (ROOT / "README.md").read_text()
    for name in ("run-policy.json", "head-policy.json"):
        text = (ROOT / "deploy" / "iam" / name).read_text().strip()
        json.loads(text)
        assert text in readme, f"README must state deploy/iam/{name} in full"
    head = json.loads((ROOT / "deploy" / "iam" / "head-policy.json").read_text())
    assert any(st["Action"] == "iam:PassRole" and st["Resource"].endswith(":role/asclepius-worker") for st in head["Statement"])


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


def kuberay_images() -> set[str]:
    return {c["image"] for spec in cluster_specs().values() for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
            for c in g["template"]["spec"]["containers"]}  # fmt: skip


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
    # the entrypoint runs the pipeline with a preset this repository has, at the path the image holds it; where the
    # run and the notes are is said here, as overrides, and every placeholder of the preset is given a value
    m = re.fullmatch(rf"python {IMAGE_DIR}/ray_jobs/pipeline\.py --config {IMAGE_DIR}/(configs/[\w.-]+\.yaml)((?: \S+=\S+)+)", job["entrypoint"])
    assert m and (ROOT / m.group(1)).is_file(), job["entrypoint"]
    overrides = m.group(2).split()
    from asclepius.config import placeholders

    assert placeholders(load_config(ROOT / m.group(1))) == ["run_dir", "notes.sources.0.path", "teacher.azure_endpoint"]
    assert [o.split("=")[0] for o in overrides] == ["run_dir", "notes.sources.0.path", "teacher.azure_endpoint"]
    preset = load_config(ROOT / m.group(1), overrides)
    assert preset.run_dir.startswith("s3://") and preset.serve.models[0].source == preset.run_dir + "/checkpoints/finetune/final"
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


RAY_IMAGE_USER = (1000, 100)  # rayproject/ray images run as `ray`, uid 1000, primary group users (100)


def readable_by(uid: int, gid: int, mode: int, pod_security: dict) -> bool:
    """Kubernetes' ownership of a secret / projected volume's files: root, group fsGroup when the pod sets one, mode
    defaultMode. Whether the container's user can read them."""
    user = pod_security.get("runAsUser", uid)
    groups = {pod_security.get("runAsGroup", gid), *(pod_security.get("supplementalGroups") or [])}
    if user == 0 or mode & 0o004:
        return True
    return bool(mode & 0o040) and pod_security.get("fsGroup") is not None and pod_security["fsGroup"] in groups | {gid}


def test_kuberay_pods_can_read_the_keys_the_presets_name_as_the_image_user():
    from asclepius.keys import key_files
    from asclepius.stages import STAGE_ORDER

    assert not readable_by(*RAY_IMAGE_USER, 0o400, {})  # what the manifests had: root-owned 0400, unreadable for uid 1000
    for name, spec in cluster_specs().items():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            keys = next(v for v in pod["volumes"] if v["name"] == "keys")["projected"]
            assert readable_by(*RAY_IMAGE_USER, keys["defaultMode"], pod.get("securityContext", {})), (name, group.get("groupName"))
            mount = next(m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] == "keys")
            files = {f"{mount}/{item['path']}" for src in keys["sources"] for item in src["secret"]["items"]}
            cfg = load_config(ROOT / "configs" / "asclepius-r-7b.yaml")
            needed = {k.path for k in key_files(cfg, ["serve"] if name == "rayservice" else STAGE_ORDER)}
            assert needed <= files, (name, needed - files)


def test_kuberay_groups_land_on_their_machines_and_the_dashboard_finds_prometheus():
    for name, spec in cluster_specs().items():
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in head.get("env", [])}
        assert env["RAY_PROMETHEUS_HOST"].startswith("http://") and env["RAY_GRAFANA_HOST"].startswith("http://"), name
        for group in spec["workerGroupSpecs"]:
            selector = group["template"]["spec"].get("nodeSelector") or {}
            assert selector.get("node.kubernetes.io/instance-type"), (name, group["groupName"])  # an 8-GPU group never lands on a small GPU
            ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
            assert ports["metrics"] == int(group["rayStartParams"]["metrics-export-port"])
    monitor = yaml.safe_load((ROOT / "deploy" / "kuberay" / "monitoring.yaml").read_text())
    assert monitor["kind"] == "PodMonitor" and monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    rbac = list(yaml.safe_load_all((ROOT / "deploy" / "kuberay" / "storage.yaml").read_text()))
    role = next(d for d in rbac if d["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayclusters"], "verbs": ["get"]}]  # the fits check reads it


def test_rayservice_serves_our_serve_config():
    from ray.serve.schema import ServeDeploySchema

    service = manifests()["rayservice"]["spec"]
    served = yaml.safe_load(service["serveConfigV2"])
    ServeDeploySchema.model_validate(served)  # what Serve itself accepts
    path = served["applications"][0]["args"]["config"]
    assert path.startswith(IMAGE_DIR + "/")
    local = ROOT / path[len(IMAGE_DIR) + 1 :]
    overrides = served["applications"][0]["args"]["overrides"]
    assert served == serve_deploy_config(path, load_config(local, overrides).serve, overrides)  # generated from the preset, not retyped
    assert [o.split("=")[0] for o in overrides] == ["run_dir"]  # the run is the manifest's to say, not the image's
    head_ports = {p["containerPort"] for p in service["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert served["http_options"]["port"] in head_ports


def test_print_serve_config_is_the_manifests_serve_config():
    proc = subprocess.run([sys.executable, "-m", "asclepius.cli", "serve", "--config", str(ROOT / "configs/asclepius-r-7b.yaml"),
                           "--print-serve-config", f"{IMAGE_DIR}/configs/asclepius-r-7b.yaml",
                           "run_dir=s3://YOUR-BUCKET/asclepius/runs/asclepius-r-7b"],
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert yaml.safe_load(proc.stdout) == yaml.safe_load(manifests()["rayservice"]["spec"]["serveConfigV2"])


def test_app_builder_builds_the_app_from_a_preset(tmp_path):
    from ray.serve import Application

    from asclepius.serve.app import ServeConfigError, app_builder

    key = tmp_path / "serve_key"
    key.write_text("k")
    with pytest.raises(ServeConfigError, match="run_dir is still the preset's placeholder"):
        app_builder({"config": str(ROOT / "configs/asclepius-r-7b.yaml"), "overrides": [f"serve.api_key_file={key}"]})
    app = app_builder({"config": str(ROOT / "configs/asclepius-r-7b.yaml"), "overrides": [f"serve.api_key_file={key}", f"run_dir={tmp_path / 'run'}"]})
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


def test_fits_knows_the_gpu_memory_a_method_needs():
    # one g5.2xlarge type: what the AWS node provider fills in (GPU and accelerator_type from the instance type)
    a10g = NodeShape("node type gpu_1xa10g", {"CPU": 8.0, "GPU": 1.0, "accelerator_type:A10G": 1.0}, 4)
    one_gpu = ["pretrain.num_workers=1", "finetune.num_workers=1", "pretrain.micro_batch=1", "finetune.micro_batch=1"]
    lora = load_config(ROOT / "configs/asclepius-lora-8b.yaml", one_gpu)
    check_fits(lora, ["pretrain", "finetune"], [CPU_NODE, a10g])  # the 8B base in bf16 (15.0 GiB) + a small adapter
    full = load_config(ROOT / "configs/asclepius-lora-8b.yaml", [*one_gpu, "finetune.method=full"])
    with pytest.raises(ClusterTooSmall) as err:
        check_fits(full, ["pretrain", "finetune"], [CPU_NODE, a10g])
    text = str(err.value)
    assert "pretrain" not in text.replace("pretrain.", "")  # the LoRA stage fits; the full fine-tune does not
    assert "finetune.num_workers training workers × {CPU: 8, GPU: 1}: room for 0" in text
    assert "need 119.7 GiB per GPU — meta-llama/Llama-3.1-8B, method full, zero_stage 2, 1 worker," in text
    assert "gpu_1xa10g's A10G has 22.5 GiB" in text and "method lora/qlora" in text
    # on 8-GPU A100 nodes the same full fine-tune fits (ZeRO-2 over 8 workers: 28.0 GiB), and where the type is not
    # one we know, nothing is refused for memory
    full.finetune.num_workers = full.finetune.micro_batch = 8
    check_fits(full, ["finetune"], [NodeShape("node type p4de", {"CPU": 96.0, "GPU": 8.0, "accelerator_type:A100": 1.0}, 1)])
    full.finetune.num_workers = full.finetune.micro_batch = 1
    check_fits(full, ["finetune"], [NodeShape("node type g7", {"CPU": 8.0, "GPU": 1.0, "accelerator_type:X1": 1.0}, 1)])


@pytest.mark.parametrize("source", ["tiny-llama3", "tiny-qwen2", "tiny-mistral"])
def test_a_local_models_shape_is_read_from_its_config(source):
    from asclepius.models import load_model, resolve_model_source
    from asclepius.train.settings import model_shape

    shape = model_shape(resolve_model_source(source))
    model = load_model(source)
    assert shape.params == sum(p.numel() for p in model.parameters())  # tied or not, biased or not, grouped kv heads
    assert (shape.layers, shape.hidden) == (model.config.num_hidden_layers, model.config.hidden_size)


def test_the_presets_model_shapes_are_their_configs(tmp_path):
    from asclepius.train.settings import MODEL_SHAPES, model_shape

    llama_7b = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                "vocab_size": 32000, "model_type": "llama"}  # huggyllama/llama-7b's config.json  # fmt: skip
    llama31_8b = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "vocab_size": 128256, "model_type": "llama", "tie_word_embeddings": False}  # fmt: skip
    for hub_id, config in [("huggyllama/llama-7b", llama_7b), ("meta-llama/Llama-3.1-8B", llama31_8b)]:
        (tmp_path / hub_id).mkdir(parents=True)
        (tmp_path / hub_id / "config.json").write_text(json.dumps(config))
        local = model_shape(str(tmp_path / hub_id))
        assert local.params == pytest.approx(MODEL_SHAPES[hub_id].params, rel=2e-3) and local.kv_dim == MODEL_SHAPES[hub_id].kv_dim
    assert model_shape(str(tmp_path / "nothing")) is None and model_shape("some-org/unknown-model") is None


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


# Python runs a sitecustomize module on its path at every start: this one holds Ray's dashboard agent back the first time
# it starts, as a busy machine does (22 s in a CI run with two test processes); Ray's raylet waits a fixed ~15 s for it.
SLOW_FIRST_AGENT = """
import os, sys, time
if sys.argv and sys.argv[0].endswith(os.path.join("dashboard", "agent.py")):
    try:
        os.close(os.open(os.environ["SLOW_AGENT_MARKER"], os.O_CREAT | os.O_EXCL))
        time.sleep(25)
    except FileExistsError:
        pass
"""
CHILDREN = """
import psutil
print("GCS servers", sum("gcs_server" in " ".join(p.cmdline()) for p in psutil.Process().children(recursive=True) if p.status() != "zombie"))
"""


def test_the_embedded_default_starts_ray_again_when_its_agent_is_too_slow_for_the_raylet():
    import shutil
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        (tmp_path / "site").mkdir()
        (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_FIRST_AGENT)
        env = {**os.environ, "TMPDIR": str(tmp_path), "SLOW_AGENT_MARKER": str(tmp_path / "slowed"),
               "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
        env.pop("RAY_ADDRESS", None)
        probe = subprocess.run([sys.executable, "-c", PROBE + CHILDREN], env=env, capture_output=True, text=True, timeout=300)
        assert (tmp_path / "slowed").exists()  # the first agent was held back
        assert probe.returncode == 0, probe.stderr[-3000:]
        assert "did not start in time (attempt 1 of 3" in probe.stderr and "attempt 2 of 3" not in probe.stderr, probe.stderr[-3000:]
        assert "GCS servers 1" in probe.stdout  # the failed attempt's GCS is stopped, not left running beside the new one
        assert probe.stdout.split("GCS ")[1].split()[1] == "1.0"
    finally:
        kill_ray_processes_under(tmp_path)
        shutil.rmtree(tmp_path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- what the cluster can add
def test_node_types_from_the_cluster_launchers_config_as_ray_up_leaves_it_on_the_head():
    from asclepius.fits import types_from_autoscaling_config

    # `ray up` fills each type's resources from its instance type before writing ~/ray_bootstrap_config.yaml
    config = cluster_yaml()
    filled = {"gpu_train_8xa100": {"CPU": 96, "GPU": 8, "train_node": 8}, "gpu_serve_1xa10g": {"CPU": 8, "GPU": 1},
              "gpu_serve_1xl40s": {"CPU": 8, "GPU": 1}, "cpu_worker": {"CPU": 32}}  # fmt: skip
    for name, res in filled.items():
        config["available_node_types"][name]["resources"] = res
    shapes = {s.name: s for s in types_from_autoscaling_config(config)}
    assert set(shapes) == {f"node type {n}" for n in filled}  # the head is not a type the autoscaler adds
    assert shapes["node type gpu_train_8xa100"].count == 2 and shapes["node type gpu_train_8xa100"].resources["GPU"] == 8
    preset = load_config(ROOT / "configs" / "asclepius-r-7b.yaml")
    head = NodeShape("head", {"CPU": 0.0, "memory": 6e10}, 1)
    check_fits(preset, ["pretrain", "finetune", "serve"], [head, *shapes.values()])  # from zero, every stage fits
    with pytest.raises(ClusterTooSmall, match="room for 0"):
        check_fits(preset, ["finetune"], [head])  # the head alone: what the old check saw, and refused


def test_node_types_from_the_rayclusters_worker_groups_by_rays_own_translation():
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    from asclepius.fits import types_from_autoscaling_config

    ray_cr = {"metadata": {"name": "asclepius-r-7b", "namespace": "default"}, "spec": cluster_specs()["rayjob"]}
    shapes = {s.name: s for s in types_from_autoscaling_config(_derive_autoscaling_config_from_ray_cr(ray_cr))}
    train = shapes["node type gpu-train-8x"]
    assert train.count == 2 and train.resources["GPU"] == 8 and train.resources["train_node"] == 8
    preset = load_config(ROOT / "configs" / "asclepius-r-7b.yaml")
    check_fits(preset, ["pretrain", "finetune", "serve"], list(shapes.values()))


def test_an_unknown_autoscaler_warns_and_goes_on_a_declared_one_refuses(ray_local, caplog, monkeypatch):
    import asclepius.fits as fits

    cfg = demo_like(finetune={"num_workers": 8, "use_gpu": True, "micro_batch": 4, "cpus_per_worker": 8}, ray={"address": "auto"})
    monkeypatch.setattr(fits, "started_here", lambda: False)  # as a job's driver on a cluster it joined
    monkeypatch.setattr(fits, "autoscaling_config_path", lambda gcs: None)  # no launcher config, not on KubeRay
    monkeypatch.delenv("RAY_CLUSTER_NAME", raising=False)
    with caplog.at_level("WARNING", logger="asclepius"):
        check_fits(cfg, ["finetune"])  # a cluster that may scale from zero is never refused for being empty now
    assert any("node types this cluster can add are unknown" in r.getMessage() and "room for 0" in r.getMessage() for r in caplog.records)
    declared = demo_like(finetune={"num_workers": 8, "use_gpu": True, "micro_batch": 4, "cpus_per_worker": 8},
                         ray={"address": "auto", "node_types": {"gpu8": {"resources": {"CPU": 96, "GPU": 8}, "max_workers": 1}}})  # fmt: skip
    check_fits(declared, ["finetune"])
    declared.ray.node_types = {}  # a cluster that adds no nodes: what it has is all
    with pytest.raises(ClusterTooSmall, match=r"(?s)room for 0.*node types from ray\.node_types"):
        check_fits(declared, ["finetune"])


PARAMS = {"asclepius-7b": 6.74e9, "asclepius-r-7b": 6.74e9, "asclepius-r-13b": 13.0e9}


def test_the_readmes_checkpoint_costs_are_the_presets():
    """Size, upload time and interval per preset and stage, as the presets set them and checkpoint_cost computes."""
    from asclepius.train.settings import checkpoint_cost

    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\s*\| (`asclepius[^|]+) \| (pretrain|finetune) \| (\d) \| (\d+) GB \| (\d+) s \| (\d+) steps \|", readme, re.M)
    seen = set()
    for names, stage, zero, size_gb, upload_s, every in rows:
        for name in re.findall(r"`([^`]+)`", names):
            hp = getattr(load_config(ROOT / "configs" / f"{name}.yaml"), stage)
            size, seconds = checkpoint_cost(PARAMS[name], hp.zero_stage, nodes=1, gbit_per_s_per_node=10)
            assert (int(zero), int(size_gb), int(upload_s), int(every)) == (hp.zero_stage, round(size), round(seconds), hp.checkpoint_every_steps)
            seen.add((name, stage))
    assert seen == {(name, stage) for name in PARAMS for stage in ("pretrain", "finetune")}


def test_the_image_pins_flash_attn_so_the_gpu_presets_finetune_on_varlen():
    from asclepius.train.settings import attention_for

    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r'pip install [^\n]*"flash-attn==\d+\.\d+\.\d+"', dockerfile)
    for name in PRESETS:
        hp = load_config(ROOT / "configs" / f"{name}.yaml").finetune
        assert attention_for(hp, "finetune", hp.use_gpu, has_flash_attn=True)[0] == "varlen"
        assert attention_for(hp, "finetune", hp.use_gpu, has_flash_attn=False)[0] == "flex"  # never the dense mask on GPUs
