"""Does the config fit the cluster? Checked before any stage does work.

A Ray job whose training workers ask for 8 GPUs on a cluster that has none and cannot add them does not fail: it
stays pending, for hours, with a line in the autoscaler's log. So before the first stage each stage's needs —
training workers × (CPU, GPU, custom resources), Serve replicas, the teacher's actors — are placed, first fit, on
the nodes the cluster has now plus the nodes its autoscaler may add, and a stage that cannot be placed stops the job
with what it needs and what there is.

What the autoscaler may add is read, first found first, from:
1. `ray.node_types` in the config (`{}`: a cluster that adds no nodes);
2. the cluster config the autoscaler reports to the GCS (when it does: Ray 2.60's cluster launcher does not);
3. the cluster launcher's config on the head — the file the running autoscaler (`monitor.py --autoscaling-config`) was
   started with, else `~/ray_bootstrap_config.yaml` — its `available_node_types` (with the resources `ray up` filled in);
4. on KubeRay, the RayCluster this pod belongs to (RAY_CLUSTER_NAME / RAY_CLUSTER_NAMESPACE, read from the Kubernetes
   API with the pod's service account), turned into node types by Ray's own KubeRay translation.
When none of them answers, only a local instance this job started itself is known to add nothing; on any other
cluster the check cannot know what may be added, so it warns with what does not fit the nodes there are now and
goes on — a cluster that scales from zero is never refused for being empty.

A GPU training worker also needs its model states (weights, gradients, optimizer; train.settings.
model_state_gib_per_gpu) to fit its GPU: where the base model's shape is known (a preset's hub id, or a local
directory's config.json) and a node type's accelerator_type is one whose memory we know, a GPU too small for them is
no place for the worker, and the refusal names the GiB and what lowers them (ZeRO-3, more workers, offload, LoRA).

The stages run one after another, so each is placed on an empty cluster; what runs at the same time within a
stage (a served teacher and the actors calling it, the served model and the judge's actors) is placed together.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import yaml

from asclepius.cluster import started_here
from asclepius.config import Config, RayConfig, ServedModelConfig
from asclepius.stages import TEACHER_STAGES, TRAINING
from asclepius.train.settings import gpu_memory_gib, model_shape, model_state_gib_per_gpu

log = logging.getLogger("asclepius")

AUTOSCALER_NODES_CONSIDERED = 64  # per node type without a maximum: enough for any stage of ours


class ClusterTooSmall(RuntimeError):
    pass


@dataclass(frozen=True)
class Need:
    what: str  # e.g. "finetune.num_workers training workers"
    count: int
    bundle: dict[str, float]
    gpu_gib: float | None = None  # a training worker's model states per GPU, where the model's shape is known
    gpu_gib_how: str = ""  # what they follow, for the message


@dataclass(frozen=True)
class NodeShape:
    name: str
    resources: dict[str, float]
    count: int  # nodes of this shape that exist or can be added


def _replicas(m: ServedModelConfig) -> int:
    return max(1, m.autoscaling.min_replicas) if m.autoscaling else m.num_replicas


def _serve_needs(models: list[ServedModelConfig]) -> list[Need]:
    return [Need(f"serve.models ({m.name}) replicas", _replicas(m), {"CPU": m.num_cpus, "GPU": m.num_gpus}) for m in models]


def stage_needs(cfg: Config, stages: list[str]) -> dict[str, list[Need]]:
    """What each stage needs at once."""
    served = {m.name: m for m in (cfg.serve.models if cfg.serve else [])}
    teacher_model = [served[cfg.teacher_from_serve]] if cfg.teacher_from_serve in served else []
    needs: dict[str, list[Need]] = {}
    for stage in stages:
        group: list[Need] = []
        if stage in TRAINING:
            hp = getattr(cfg, stage)
            bundle = {"CPU": hp.cpus_per_worker, **({"GPU": 1.0} if hp.use_gpu else {}), **hp.resources_per_worker}
            base = cfg.model.base if cfg.model else "tiny"
            shape = model_shape(base) if hp.use_gpu else None  # the fine-tune trains the pretrained model: same shape
            gib = model_state_gib_per_gpu(shape, hp) if shape else None
            how = (f"{base}, method {hp.method}, zero_stage {hp.zero_stage}, {hp.num_workers} worker{'s' if hp.num_workers != 1 else ''}"
                   + (", optimizer offloaded" if hp.offload_optimizer else ""))  # fmt: skip
            group.append(Need(f"{stage}.num_workers training workers", hp.num_workers, bundle, gib, how))
        if stage in TEACHER_STAGES and cfg.teacher is not None and cfg.teacher.mode == "online":
            group += _serve_needs(teacher_model)
            group.append(Need("teacher.num_actors request actors", cfg.teacher.num_actors, {"CPU": 0.1, **cfg.teacher.actor_resources}))
        if stage in ("serve", "evaluate") and cfg.serve is not None:
            group += _serve_needs([m for m in cfg.serve.models if m not in teacher_model] + teacher_model)
        needs[stage] = [n for n in group if n.count > 0]
    return {s: g for s, g in needs.items() if g}


def _type_shape(name: str, resources: dict, max_workers: int) -> NodeShape | None:
    limit = AUTOSCALER_NODES_CONSIDERED if max_workers < 0 else min(max_workers, AUTOSCALER_NODES_CONSIDERED)
    resources = {k: float(v) for k, v in (resources or {}).items()}
    return NodeShape(f"node type {name}", resources, limit) if limit > 0 and resources else None


def types_from_autoscaling_config(config: dict) -> list[NodeShape]:
    """Worker node types of an autoscaler config (the cluster launcher's YAML, or KubeRay's translation of a RayCluster)."""
    head = config.get("head_node_type")
    overall = config.get("max_workers", -1)
    shapes = []
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        most = spec.get("max_workers", overall)
        most = min(most, overall) if overall is not None and overall >= 0 else most
        shape = _type_shape(name, spec.get("resources") or {}, int(most))
        if shape:
            shapes.append(shape)
    return shapes


def _from_gcs() -> list[NodeShape] | None:
    import ray

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 — an older GCS: nothing reported
        return None
    groups = getattr(config, "node_group_configs", None) or []
    shapes = [_type_shape(g.name, dict(g.resources), g.max_count) for g in groups]
    return [s for s in shapes if s] if groups else None


def autoscaling_config_path(gcs_address: str) -> str | None:
    """The autoscaling config the autoscaler of this cluster runs with, when it runs on this machine (a job's driver
    runs on the head, where the cluster launcher starts it); else the launcher's `~/ray_bootstrap_config.yaml`."""
    import psutil

    port = gcs_address.rsplit(":", 1)[-1]
    for proc in psutil.process_iter(["cmdline"]):
        try:
            args = proc.info["cmdline"] or []
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if not any(a.endswith("monitor.py") for a in args):
            continue
        flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        if flags.get("gcs-address", "").rsplit(":", 1)[-1] == port and flags.get("autoscaling-config"):
            return os.path.expanduser(flags["autoscaling-config"])
    bootstrap = os.path.expanduser("~/ray_bootstrap_config.yaml")
    return bootstrap if os.path.isfile(bootstrap) else None


def _from_launcher_config() -> tuple[list[NodeShape], str] | None:
    import ray

    path = autoscaling_config_path(ray.get_runtime_context().gcs_address)
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as err:
        log.warning("fits: cannot read the autoscaling config %s (%s)", path, type(err).__name__)
        return None
    return types_from_autoscaling_config(config), path


def _from_kuberay() -> tuple[list[NodeShape], str] | None:
    name, namespace = os.environ.get("RAY_CLUSTER_NAME"), os.environ.get("RAY_CLUSTER_NAMESPACE")
    if not name:
        return None
    try:
        from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
        from ray.autoscaler._private.kuberay.node_provider import KubernetesHttpApiClient

        if not namespace:
            with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace", encoding="utf-8") as f:
                namespace = f.read().strip()
        ray_cr = KubernetesHttpApiClient(namespace).get(f"rayclusters/{name}")
        return types_from_autoscaling_config(_derive_autoscaling_config_from_ray_cr(ray_cr)), f"RayCluster {namespace}/{name}"
    except Exception as err:  # noqa: BLE001 — no API access (RBAC), not in a pod: say so, do not guess
        log.warning("fits: cannot read RayCluster %s from the Kubernetes API (%s: %s); the service account needs `get` on "
                    "rayclusters (deploy/kuberay/storage.yaml)", name, type(err).__name__, str(err)[:200])  # fmt: skip
        return None


def autoscaler_types(ray_cfg: RayConfig) -> tuple[list[NodeShape] | None, str]:
    """(the node types the cluster may add, where that was read) — (None, why) when nothing says."""
    if ray_cfg.node_types is not None:
        return [s for n, t in ray_cfg.node_types.items() if (s := _type_shape(n, t.resources, t.max_workers))], "ray.node_types"
    if started_here():
        return [], "a local instance started by this job"
    gcs = _from_gcs()
    if gcs is not None:
        return gcs, "the autoscaler's cluster config in the GCS"
    for read in (_from_launcher_config, _from_kuberay):
        found = read()
        if found is not None:
            return found
    return None, "no autoscaler config found (set ray.node_types to check against the node types the cluster can add)"


def cluster_shapes(ray_cfg: RayConfig | None = None) -> tuple[list[NodeShape], bool, str]:
    """The alive nodes (their total resources) and the autoscaler's node types (up to their max count); whether that
    is all the cluster can have, and where the node types were read."""
    import ray

    shapes = [NodeShape(n.get("NodeManagerAddress", "node"), dict(n["Resources"]), 1) for n in ray.nodes() if n.get("Alive")]
    types, where = autoscaler_types(ray_cfg or RayConfig())
    return shapes + (types or []), types is not None, where


def _fits(need: Need, free: dict[str, float]) -> bool:
    if not all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.bundle.items() if v > 0):
        return False
    memory = gpu_memory_gib(free) if need.gpu_gib and need.bundle.get("GPU", 0) > 0 else None
    return memory is None or memory[1] >= need.gpu_gib  # a GPU whose memory we do not know is not refused


def _too_small_gpus(need: Need, shapes: list[NodeShape]) -> str:
    small = {f"{s.name}'s {m[0]} has {m[1]:g} GiB" for s in shapes if s.resources.get("GPU", 0) > 0
             for m in [gpu_memory_gib(s.resources)] if m and need.gpu_gib and m[1] < need.gpu_gib}  # fmt: skip
    if not small:
        return ""
    return (f" (their model states alone need {need.gpu_gib:.1f} GiB per GPU — {need.gpu_gib_how}, activations apart — and "
            f"{'; '.join(sorted(small))}: zero_stage 3, more workers, offload_optimizer or method lora/qlora need less)")


def place(group: list[Need], shapes: list[NodeShape]) -> list[str]:
    """First fit of every bundle of `group` (largest first) on the nodes; returns what could not be placed."""
    nodes = [dict(s.resources) for s in shapes for _ in range(s.count)]
    problems = []
    for need in sorted(group, key=lambda n: -sum(n.bundle.values())):
        placed = 0
        for _ in range(need.count):
            node = next((n for n in nodes if _fits(need, n)), None)
            if node is None:
                break
            for k, v in need.bundle.items():
                node[k] = node.get(k, 0.0) - v
            placed += 1
        if placed < need.count:
            problems.append(f"{need.count} {need.what} × {_fmt(need.bundle)}: room for {placed}" + _too_small_gpus(need, shapes))
    return problems


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {int(v) if float(v).is_integer() else v}" for k, v in sorted(resources.items()) if v) + "}"


def check_fits(cfg: Config, stages: list[str], shapes: list[NodeShape] | None = None) -> None:
    known, where = True, "given"
    if shapes is None:
        shapes, known, where = cluster_shapes(cfg.ray)
    report = []
    for stage, group in stage_needs(cfg, stages).items():
        problems = place(group, shapes)
        if problems:
            report.append(f"  {stage}: " + "; ".join(problems))
    if report:
        there = "; ".join(f"{s.count if s.count < AUTOSCALER_NODES_CONSIDERED else 'any number'} × {s.name} {_fmt(s.resources)}"
                          for s in shapes if not math.isclose(sum(s.resources.values()), 0))  # fmt: skip
        if not known:  # it may add nodes we cannot see: never refuse a cluster that scales from zero
            log.warning("fits: the node types this cluster can add are unknown (%s); going on. What does not fit the nodes "
                        "it has now:\n%s\n  it has: %s", where, "\n".join(report), there or "nothing")  # fmt: skip
            return
        raise ClusterTooSmall(
            "the config does not fit this cluster, so its job would wait forever:\n" + "\n".join(report)
            + f"\n  the cluster has or can add: {there or 'nothing'} (node types from {where})\n  lower the counts above, or add a node type with "
            "these resources to the cluster (cluster.yaml / the RayCluster's worker groups); ray.check_fits: false skips this check"
        )
