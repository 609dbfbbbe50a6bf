"""A real two-node Ray cluster on this machine, the way users run one: `ray start --head` and `ray start --address`,
each node with its own temp dir, the second offering a custom resource (like a GPU node type), token auth on, jobs
through `ray job submit`. Stopped by the PIDs of its processes — `ray stop` would stop every Ray on the machine."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from asclepius.testing.server_process import free_port

RAY = str(Path(sys.executable).parent / "ray")


@dataclass
class Cluster:
    root: Path  # both nodes' temp dirs live under it
    gcs_address: str
    dashboard_url: str
    env: dict  # what a client of this cluster needs: RAY_AUTH_MODE, RAY_AUTH_TOKEN

    def submit(self, entrypoint: list[str], working_dir: str, timeout_s: float = 900) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir ...`, waiting for the job; its output is the job's logs."""
        cmd = [RAY, "job", "submit", "--address", self.dashboard_url, "--working-dir", working_dir, "--", *entrypoint]
        deadline = time.time() + 120
        while True:
            proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout_s, check=False)
            # a head that just started may not have its job agent yet; Ray says so and asks to try again
            if "No available agent to submit job" not in proc.stderr or time.time() > deadline:
                return proc
            time.sleep(3)

    def node_ids(self) -> dict[str, str]:
        """node id → the custom resources it offers ('head' when none)."""
        out = subprocess.run([sys.executable, "-c", _NODES, self.gcs_address], env=self.env, capture_output=True, text=True,
                             timeout=120, check=True)  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    def actors(self) -> list[dict]:
        """Every actor the cluster ran (alive or dead): class name and node id, from the state API."""
        out = subprocess.run([sys.executable, "-c", _ACTORS, self.dashboard_url], env=self.env, capture_output=True, text=True,
                             timeout=120, check=True)  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])


_NODES = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
custom = lambda r: sorted(k for k in r if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith("node:"))
print(json.dumps({n["NodeID"]: ",".join(custom(n["Resources"])) or "head" for n in ray.nodes() if n["Alive"]}))
"""
_ACTORS = """
import json, sys
from ray.util.state import list_actors
print(json.dumps([{"class_name": a.class_name, "node_id": a.node_id} for a in list_actors(address=sys.argv[1], limit=10000)]))
"""


def kill_ray_processes_under(root: Path) -> None:
    """Stop the Ray processes whose command lines name `root` (their temp dir) — never `ray stop`."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(root) in part for part in proc.info["cmdline"] or []):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@contextmanager
def two_node_cluster(worker_resources: dict[str, float], head_cpus: int = 1, worker_cpus: int = 2):
    # A short root: Ray's unix socket paths under it must stay within 107 characters.
    root = Path(tempfile.mkdtemp(prefix="r2n", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0",
           "TMPDIR": str(root)}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    # every node runs this Python environment, as every node of a real cluster has the project installed: a job's
    # `python` is the one beside the `ray` that started the node
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    gcs_port, dashboard_port = free_port(), free_port()

    def own_ports() -> list[str]:
        # Ray's fixed defaults (agent 52365, client server 10001, ...) are taken by any other Ray on the machine — the
        # test session's own instance among them — and a head whose agent cannot bind never accepts a job
        # ("No available agent to submit job"). Every node gets ports of its own.
        names = ["dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port"]
        return [f"--{name}={free_port()}" for name in names]

    def start(args: list[str]) -> None:
        proc = subprocess.run([RAY, "start", *args], env=env, capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{proc.stderr[-3000:]}")

    try:
        start(["--head", f"--port={gcs_port}", f"--num-cpus={head_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dashboard_port}", f"--temp-dir={root / 'head'}", "--disable-usage-stats",
               f"--ray-client-server-port={free_port()}", *own_ports()])  # fmt: skip
        start([f"--address=127.0.0.1:{gcs_port}", f"--num-cpus={worker_cpus}", f"--resources={json.dumps(worker_resources)}",
               f"--temp-dir={root / 'worker'}", "--disable-usage-stats", *own_ports()])  # fmt: skip
        cluster = Cluster(root, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", env)
        deadline = time.time() + 120
        while len(cluster.node_ids()) < 2:
            if time.time() > deadline:
                raise RuntimeError("the second node never joined")
            time.sleep(2)
        yield cluster
    finally:
        kill_ray_processes_under(root)
        shutil.rmtree(root, ignore_errors=True)
