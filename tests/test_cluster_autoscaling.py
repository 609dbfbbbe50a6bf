"""The pipeline as a platform team runs it: `ray job submit --working-dir .` to a cluster that scales from zero — a head
that takes no work and an autoscaler (Ray's fake_multinode provider) that starts worker nodes of one type, offering the
custom resource the presets hold training workers and teacher actors to, only when work waits for them — with token
auth and the teacher's key in a file. Every stage must run on nodes the autoscaler added, and the nodes must go away
when the work is done."""

import json
import time
from pathlib import Path

import pandas as pd

from asclepius.testing.multinode import autoscaling_cluster
from asclepius.testing.server_process import openai_test_server

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["notes", "synthesize", "split", "questions", "answers", "pretrain", "finetune"]
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"  # Ray's fake_multinode provider names its head so
IDLE_TIMEOUT_S = 15
RESOURCE_REQUEST_EXPIRY_S = 180


def job(run_dir: Path, server_url: str, key_file: Path, *extra: str) -> list[str]:
    overrides = [
        f"run_dir={run_dir}", "ray.address=auto", "teacher_from_serve=null", f"teacher.base_url={server_url}",
        f"teacher.api_key_file={key_file}", "model.base=tiny", "teacher.actor_resources={train_node: 1}",
        "pretrain.resources_per_worker={train_node: 1}", "finetune.resources_per_worker={train_node: 1}", "finetune.max_steps=2", *extra,
    ]  # fmt: skip
    stages = [a for s in STAGES for a in ("--stage", s)]
    return ["python", "ray_jobs/pipeline.py", "--config", "configs/demo.yaml", *stages, *overrides]


def test_pipeline_job_on_a_cluster_that_scales_from_zero(tmp_path):
    key = tmp_path / "teacher_key"
    key.write_text("sk-test\n")
    key.chmod(0o600)
    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.05, completion_tokens=30) as server, \
         autoscaling_cluster({"train": {"CPU": 2, "train_node": 2}}, max_workers=2, idle_timeout_s=IDLE_TIMEOUT_S) as cluster:  # fmt: skip
        assert [n["id"] for n in cluster.nodes()] == [FAKE_HEAD_NODE_ID]  # from zero: the head alone, and it takes no work

        # a config asking for more than the node type's maximum stops before any work (the node types were read from the
        # running autoscaler's config on the head), not pending forever — and no node was started for it
        too_big = cluster.submit(job(tmp_path / "run2", server.base_url, key, "finetune.num_workers=5", "finetune.global_batch=5"),
                                 working_dir=str(ROOT), timeout_s=300)  # fmt: skip
        out = too_big.stdout + too_big.stderr
        assert too_big.returncode != 0, out[-3000:]
        assert "finetune: 5 finetune.num_workers training workers × {CPU: 1, train_node: 1}: room for 4" in out, out[-3000:]
        assert "2 × node type train {CPU: 2, train_node: 2}" in out and "autoscaling.yaml" in out, out[-3000:]
        assert not (tmp_path / "run2" / "manifest.json").exists()

        started = time.time()
        proc = cluster.submit(job(tmp_path / "run", server.base_url, key), working_dir=str(ROOT))
        took = time.time() - started
        assert proc.returncode == 0 and "succeeded" in proc.stdout, (proc.stdout + proc.stderr)[-5000:]
        manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
        assert all(manifest["stages"][s]["status"] == "complete" for s in STAGES)
        assert manifest["stages"]["finetune"]["final_step"] == 2
        run_dir = tmp_path / "run"
        assert len(pd.read_parquet(run_dir / "instructions" / manifest["published"]["instructions"])) > 0
        assert (run_dir / "checkpoints" / "finetune" / manifest["published"]["checkpoints/finetune"] / "final" / "config.json").is_file()
        # what the job's log shows: the stage summaries and the key check, in `ray job logs` (the submit's output)
        assert "finetune: 2 steps" in proc.stdout + proc.stderr and "keys: teacher.api_key_file readable" in (run_dir / "logs" / "asclepius.log").read_text()

        # the autoscaler started worker nodes for the work, and every training worker and request-sending actor ran on one
        workers = {n["id"] for n in cluster.nodes() if n["id"] != FAKE_HEAD_NODE_ID}
        assert workers, cluster.nodes()
        placed = [a for a in cluster.actors() if "TeacherUDF" in a["class_name"] or "TrainWorker" in a["class_name"]]
        assert any("TeacherUDF" in a["class_name"] for a in placed) and any("TrainWorker" in a["class_name"] for a in placed), placed
        assert all(a["node_id"] in workers for a in placed), (workers, placed)
        # the detached rate limiter lives on the head, never on a worker node it would keep from scaling down
        limiters = [a for a in cluster.actors() if "RateLimiterActor" in a["class_name"]]
        assert limiters and all(a["node_id"] == FAKE_HEAD_NODE_ID for a in limiters), limiters

        # and once idle, the nodes went away again: back to the head alone — after the idle timeout, and at most after Ray
        # Train's and Ray Data's resource requests expire (180 s, ray.train.v2 AUTOSCALING_REQUESTS_EXPIRE_TIME_S) when
        # one was left uncancelled at the end of a stage
        deadline = time.time() + IDLE_TIMEOUT_S + RESOURCE_REQUEST_EXPIRY_S + 60
        while any(n["alive"] for n in cluster.nodes() if n["id"] != FAKE_HEAD_NODE_ID):
            assert time.time() < deadline, (cluster.nodes(), cluster.status()[-3000:])
            time.sleep(3)
        print(f"pipeline job on a cluster scaling from zero: {took:.0f} s, {len(workers)} worker node(s) started and stopped")

    # and once stopped, nothing of the cluster runs on: its agents retitle themselves (ray::DashboardAgent), and one left
    # behind its killed raylet spun at ~90 % of a core for a minute, under the next tests
    assert not processes_with_temp_dir(cluster.root)


def processes_with_temp_dir(root: Path) -> list[str]:
    import psutil

    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if proc.environ().get("TMPDIR") == str(root):
                found.append(f"{proc.pid} {proc.info['name']}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found
