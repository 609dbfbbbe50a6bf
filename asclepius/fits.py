"""Does the config fit the cluster? Checked before any stage does work.

A Ray job whose training workers ask for 8 GPUs on a cluster that has none and cannot add them does not fail: it
stays pending, for hours, with a line in the autoscaler's log. So before the first stage each stage's needs —
training workers × (CPU, GPU, custom resources), Serve replicas, the teacher's actors — are placed, first fit, on
the nodes the cluster has now plus the nodes its autoscaler may add (the node types it reports to Ray), and a
stage that cannot be placed stops the job with what it needs and what there is.

The stages run one after another, so each is placed on an empty cluster; what runs at the same time within a
stage (a served teacher and the actors calling it, the served model and the judge's actors) is placed together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from asclepius.config import Config, ServedModelConfig

AUTOSCALER_NODES_CONSIDERED = 64  # per node type without a maximum: enough for any stage of ours


class ClusterTooSmall(RuntimeError):
    pass


@dataclass(frozen=True)
class Need:
    what: str  # e.g. "finetune.num_workers training workers"
    count: int
    bundle: dict[str, float]


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
    from asclepius.pipeline import TEACHER_STAGES, TRAINING

    served = {m.name: m for m in (cfg.serve.models if cfg.serve else [])}
    teacher_model = [served[cfg.teacher_from_serve]] if cfg.teacher_from_serve in served else []
    needs: dict[str, list[Need]] = {}
    for stage in stages:
        group: list[Need] = []
        if stage in TRAINING:
            hp = getattr(cfg, stage)
            bundle = {"CPU": hp.cpus_per_worker, **({"GPU": 1.0} if hp.use_gpu else {}), **hp.resources_per_worker}
            group.append(Need(f"{stage}.num_workers training workers", hp.num_workers, bundle))
        if stage in TEACHER_STAGES and cfg.teacher is not None and cfg.teacher.mode == "online":
            group += _serve_needs(teacher_model)
            group.append(Need("teacher.num_actors request actors", cfg.teacher.num_actors, {"CPU": 0.1, **cfg.teacher.actor_resources}))
        if stage in ("serve", "evaluate") and cfg.serve is not None:
            group += _serve_needs([m for m in cfg.serve.models if m not in teacher_model] + teacher_model)
        needs[stage] = [n for n in group if n.count > 0]
    return {s: g for s, g in needs.items() if g}


def cluster_shapes() -> list[NodeShape]:
    """The alive nodes (their total resources) and the autoscaler's node types (up to their max count)."""
    import ray

    shapes = [NodeShape(n.get("NodeManagerAddress", "node"), dict(n["Resources"]), 1) for n in ray.nodes() if n.get("Alive")]
    try:
        config = ray._private.state.state.get_cluster_config()  # what an autoscaler (cluster launcher, KubeRay) reports
    except Exception:  # an older GCS, a local instance: no autoscaler to ask
        config = None
    for group in getattr(config, "node_group_configs", None) or []:
        limit = AUTOSCALER_NODES_CONSIDERED if group.max_count < 0 else min(group.max_count, AUTOSCALER_NODES_CONSIDERED)
        if limit > 0 and group.resources:
            shapes.append(NodeShape(f"node type {group.name}", dict(group.resources), limit))
    return shapes


def _fits(bundle: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items() if v > 0)


def place(group: list[Need], shapes: list[NodeShape]) -> list[str]:
    """First fit of every bundle of `group` (largest first) on the nodes; returns what could not be placed."""
    nodes = [dict(s.resources) for s in shapes for _ in range(s.count)]
    problems = []
    for need in sorted(group, key=lambda n: -sum(n.bundle.values())):
        placed = 0
        for _ in range(need.count):
            node = next((n for n in nodes if _fits(need.bundle, n)), None)
            if node is None:
                break
            for k, v in need.bundle.items():
                node[k] = node.get(k, 0.0) - v
            placed += 1
        if placed < need.count:
            problems.append(f"{need.count} {need.what} × {_fmt(need.bundle)}: room for {placed}")
    return problems


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {int(v) if float(v).is_integer() else v}" for k, v in sorted(resources.items()) if v) + "}"


def check_fits(cfg: Config, stages: list[str], shapes: list[NodeShape] | None = None) -> None:
    shapes = cluster_shapes() if shapes is None else shapes
    report = []
    for stage, group in stage_needs(cfg, stages).items():
        problems = place(group, shapes)
        if problems:
            report.append(f"  {stage}: " + "; ".join(problems))
    if report:
        there = "; ".join(f"{s.count if s.count < AUTOSCALER_NODES_CONSIDERED else 'any number'} × {s.name} {_fmt(s.resources)}"
                          for s in shapes if not math.isclose(sum(s.resources.values()), 0))  # fmt: skip
        raise ClusterTooSmall(
            "the config does not fit this cluster, so its job would wait forever:\n" + "\n".join(report)
            + f"\n  the cluster has or can add: {there or 'nothing'}\n  lower the counts above, or add a node type with "
            "these resources to the cluster (cluster.yaml / the RayCluster's worker groups); ray.check_fits: false skips this check"
        )
