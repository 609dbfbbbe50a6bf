"""The command line and the Ray job entrypoints, as a user runs them."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from asclepius.cli import main
from asclepius.testing import job_env

ROOT = Path(__file__).resolve().parents[1]


def test_config_command_prints_resolved_config(capsys):
    assert main(["config", "--config", str(ROOT / "configs/demo.yaml"), "notes.min_chars=20"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["notes"]["min_chars"] == 20 and cfg["pretrain"]["lr"] == 2e-5


def test_bad_override_exits_2_naming_the_field(capsys):
    assert main(["config", "--config", str(ROOT / "configs/demo.yaml"), "notes.sources.0.kind=nope"]) == 2
    assert "notes.sources.0.kind" in capsys.readouterr().err


def test_unknown_stage_is_refused(capsys):
    assert main(["run", "--config", str(ROOT / "configs/demo.yaml"), "--stage", "nosuch"]) == 2
    assert "unknown stage" in capsys.readouterr().err


def test_notes_job_entrypoint_runs_the_demo(tmp_path, ray_local):
    # what `ray job submit ... -- python ray_jobs/notes.py --config ...` runs: its own process, on a running Ray instance
    proc = subprocess.run(
        [sys.executable, str(ROOT / "ray_jobs/notes.py"), "--config", str(ROOT / "configs/demo.yaml"), f"run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=job_env(ray_local.get_runtime_context().gcs_address),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["notes"]["totals"]["kept"] == 20
    assert "notes: 27 read, 20 kept" in proc.stderr
    # the job's output never shows note text
    assert "Shortness of breath" not in proc.stdout + proc.stderr


def test_cluster_yaml_scales_gpu_workers_from_zero():
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    workers = {k: v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}
    assert any("gpu" in k for k in workers) and all(v["min_workers"] == 0 for v in workers.values())
    assert "ray-ml" not in cluster["docker"]["image"] and "--dashboard-port=8265" in " ".join(cluster["head_start_ray_commands"])


def test_every_stage_has_a_ray_job_entrypoint():
    import re

    from asclepius.pipeline import STAGE_ORDER

    jobs = {p.stem: p.read_text() for p in (ROOT / "ray_jobs").glob("*.py")}
    for stage in [s for s in STAGE_ORDER if s != "serve"]:
        assert re.search(rf'stage_job\("{stage}"\)', jobs[stage]), stage
    assert 'main(["run", *sys.argv[1:]])' in jobs["pipeline"] and 'main(["serve", *sys.argv[1:]])' in jobs["serve"]
    assert all(len(text.splitlines()) < 60 for text in jobs.values())  # thin entrypoints


def test_serve_stops_on_ctrl_c_within_seconds_and_leaves_no_process(tmp_path):
    """As a user meets it: started in the background (it inherits SIGINT ignored, as `asclepius serve &` does), then
    SIGINT. It must stop within ~10 s, and nothing it started (Ray's GCS, raylet, workers, agents) may be left."""
    import os
    import signal
    import time

    from asclepius.testing.server_process import free_port

    cfg = {"run_dir": str(tmp_path / "run"), "ray": {"num_cpus": 2}, "notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]},
           "serve": {"host": "127.0.0.1", "port": free_port(), "models": [{"name": "tiny", "source": "tiny", "num_cpus": 0.5}]}}  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "asclepius.cli", "serve", "--config", str(tmp_path / "cfg.yaml")], cwd=ROOT,
                            env={**os.environ, "RAY_ADDRESS": ""}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("serving ["):
                break
        assert proc.poll() is None, "".join(seen)[-3000:]
        sent = time.time()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        took = time.time() - sent
        assert proc.returncode == 0 and took < 12, (proc.returncode, took)
        deadline = time.time() + 10
        while time.time() < deadline:  # what the command started runs in its session: all of it must be gone
            left = subprocess.run(["ps", "-s", str(proc.pid), "-o", "pid=,stat=,comm="], capture_output=True, text=True).stdout.split("\n")
            left = [p for p in left if p.strip() and " Z" not in p]  # zombies are already dead
            if not left:
                break
            time.sleep(0.5)
        assert not left, left
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
