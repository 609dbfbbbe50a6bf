"""The pipeline as a user runs it on a cluster: `ray job submit --working-dir .` to a real 2-node Ray cluster with
token auth, the training workers and the teacher's actors held to the second node by a custom resource — the way
a GPU node type is targeted on a real cluster."""

import json
import time
from pathlib import Path

import pandas as pd

from asclepius.testing.multinode import two_node_cluster
from asclepius.testing.server_process import openai_test_server

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["notes", "synthesize", "split", "questions", "answers", "pretrain", "finetune"]


def job(run_dir: Path, server_url: str, *extra: str) -> list[str]:
    overrides = [
        f"run_dir={run_dir}", "ray.address=auto", "teacher_from_serve=null", f"teacher.base_url={server_url}", "model.base=tiny",
        "teacher.actor_resources={worker_node: 1}", "pretrain.resources_per_worker={worker_node: 1}",
        "finetune.resources_per_worker={worker_node: 1}", *extra,
    ]  # fmt: skip
    stages = [a for s in STAGES for a in ("--stage", s)]
    return ["python", "ray_jobs/pipeline.py", "--config", "configs/demo.yaml", *stages, *overrides]


def test_pipeline_job_on_a_two_node_cluster(tmp_path):
    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.05, completion_tokens=30) as server, \
         two_node_cluster({"worker_node": 4}, head_cpus=1, worker_cpus=3) as cluster:  # fmt: skip
        started = time.time()
        proc = cluster.submit(job(tmp_path / "run", server.base_url), working_dir=str(ROOT))
        took = time.time() - started
        assert proc.returncode == 0 and "succeeded" in proc.stdout, (proc.stdout + proc.stderr)[-5000:]
        manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
        assert all(manifest["stages"][s]["status"] == "complete" for s in STAGES)
        assert manifest["stages"]["finetune"]["final_step"] == 2
        assert len(pd.read_parquet(tmp_path / "run" / "instructions")) > 0
        assert (tmp_path / "run" / "checkpoints" / "finetune" / "final" / "config.json").is_file()

        # every training worker and every request-sending actor ran on the node with the resource, none on the head
        nodes = cluster.node_ids()
        worker_node = next(n for n, r in nodes.items() if "worker_node" in r)
        placed = [a for a in cluster.actors() if "TeacherUDF" in a["class_name"] or "TrainWorker" in a["class_name"]]
        assert {a["class_name"].split("(")[-1] for a in placed if "TeacherUDF" in a["class_name"]}, placed
        assert any("TrainWorker" in a["class_name"] for a in placed), [a["class_name"] for a in cluster.actors()]
        assert all(a["node_id"] == worker_node for a in placed), (nodes, placed)

        # a config asking for more than the cluster has stops before any work, with the reason, not pending forever
        too_big = cluster.submit(job(tmp_path / "run2", server.base_url, "finetune.num_workers=5", "finetune.global_batch=5"),
                                 working_dir=str(ROOT), timeout_s=300)  # fmt: skip
        assert too_big.returncode != 0
        assert "finetune: 5 finetune.num_workers training workers × {CPU: 1, worker_node: 1}: room for 3" in too_big.stdout + too_big.stderr
        assert sorted(p.name for p in (tmp_path / "run2").iterdir()) == ["logs"]  # the console's log file, no stage began
        print(f"two-node pipeline job: {took:.0f} s")
