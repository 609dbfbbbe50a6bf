"""A real Ray cluster on this machine, the way users run one: a head started with `ray start --head` and an autoscaler
that adds worker nodes offering a custom resource (like a GPU node type) when work waits for them, and removes them
when idle; token auth on, jobs through `ray job submit`. Stopped by the PIDs of its processes — `ray stop` would stop
every Ray on the machine."""

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
        """node id → the custom resources it offers ('head' when none), for the nodes alive now."""
        out = subprocess.run([sys.executable, "-c", _NODES, self.gcs_address], env=self.env, capture_output=True, text=True,
                             timeout=120, check=True)  # fmt: skip
        return _last_json(out.stdout)

    def status(self) -> str:
        """`ray status -v`: the autoscaler's view (nodes, pending demands, resource requests), for a failing test's message."""
        return subprocess.run([RAY, "status", "-v", "--address", self.gcs_address], env=self.env, capture_output=True, text=True,
                              timeout=120, check=False).stdout  # fmt: skip

    def nodes(self) -> list[dict]:
        """Every node the cluster has had (alive or gone): id, alive, the custom resources it offers."""
        out = subprocess.run([sys.executable, "-c", _ALL_NODES, self.gcs_address], env=self.env, capture_output=True, text=True,
                             timeout=120, check=True)  # fmt: skip
        return _last_json(out.stdout)

    def actors(self) -> list[dict]:
        """Every actor the cluster ran (alive or dead): class name and node id, from the state API."""
        out = subprocess.run([sys.executable, "-c", _ACTORS, self.dashboard_url], env=self.env, capture_output=True, text=True,
                             timeout=120, check=True)  # fmt: skip
        return _last_json(out.stdout)


_NODES = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
custom = lambda r: sorted(k for k in r if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith("node:"))
print(json.dumps({n["NodeID"]: ",".join(custom(n["Resources"])) or "head" for n in ray.nodes() if n["Alive"]}))
"""
_ALL_NODES = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
custom = lambda r: sorted(k for k in r if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith("node:"))
print(json.dumps([{"id": n["NodeID"], "alive": n["Alive"], "custom": custom(n["Resources"])} for n in ray.nodes()]))
"""
_ACTORS = """
import json, sys
from ray.util.state import list_actors
print(json.dumps([{"class_name": a.class_name, "node_id": a.node_id} for a in list_actors(address=sys.argv[1], limit=10000)]))
"""


def kill_ray_processes_under(root: Path) -> None:
    """Stop the Ray processes whose temp dir is `root` — never `ray stop`. A process is one of them when its command
    line names `root`, when its environment does (TMPDIR), or when it descends from one that does: Ray's agents and
    workers retitle themselves `ray::DashboardAgent`, `ray::IDLE`…, so their command lines no longer name it, and a
    dashboard agent left behind its killed raylet was seen spinning at ~90 % of a core for a minute."""
    import psutil

    root, found = str(root), {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid == os.getpid():
                continue
            if any(root in part for part in proc.info["cmdline"] or []) or any(root in value for value in proc.environ().values()):
                found[proc.pid] = proc
                found.update((child.pid, child) for child in proc.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # (ZombieProcess is a NoSuchProcess)
            pass
    for proc in found.values():
        try:
            proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(list(found.values()), timeout=10)  # gone before the caller removes their folder


@contextmanager
def autoscaling_cluster(worker_types: dict[str, dict[str, float]], max_workers: int = 2, idle_timeout_s: float = 15):
    """A Ray cluster that scales from zero, as the cluster launcher and KubeRay run one: a head that takes no work
    (CPU 0) and an autoscaler (Ray's `fake_multinode` provider, RAY_FAKE_CLUSTER=1) that starts worker nodes of
    `worker_types` ({name: resources}, each from min_workers 0 to `max_workers`) on this machine when work waits for
    them, and stops them after `idle_timeout_s` idle. Token auth on, jobs through `ray job submit`."""
    # A short root: Ray's unix socket paths under it must stay within 107 characters.
    root = Path(tempfile.mkdtemp(prefix="ras", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0",
           "TMPDIR": str(root), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    # every node runs this Python environment, as every node of a real cluster has the project installed: a job's
    # `python` is the one beside the `ray` that started the node
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    package_parent = str(Path(__file__).resolve().parents[2])  # the autoscaler imports the provider from this checkout
    env["PYTHONPATH"] = os.pathsep.join([package_parent, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    gcs_port, dashboard_port = free_port(), free_port()
    config = {
        "cluster_name": "asclepius-test", "max_workers": max_workers * len(worker_types), "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60,
        # Ray's fake_multinode provider, each node with its own working_dir folder (asclepius.testing.fake_provider);
        # as in Ray's own fake_multinode example, the nodes are started by the provider itself, not set up over ssh
        "provider": {"type": "external", "module": "asclepius.testing.fake_provider.SeparateDisksProvider",
                     "gcs_address": f"127.0.0.1:{gcs_port}", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"}, "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            **{name: {"resources": dict(res), "node_config": {}, "min_workers": 0, "max_workers": max_workers}
               for name, res in worker_types.items()},
        },
        **{k: [] for k in ("cluster_synced_files", "initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }  # fmt: skip
    (root / "autoscaling.yaml").write_text(json.dumps(config))
    try:
        # Ray's fixed default ports (agent 52365, client server 10001, ...) are taken by any other Ray on the machine —
        # the test session's own instance among them — and a head whose agent cannot bind never accepts a job
        names = ["dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port"]
        args = ["--head", f"--port={gcs_port}", "--num-cpus=0", f"--autoscaling-config={root / 'autoscaling.yaml'}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                f"--temp-dir={root / 'ray'}", "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
                *[f"--{name}={free_port()}" for name in names]]  # fmt: skip
        proc = subprocess.run([RAY, "start", *args], env=env, capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode:
            raise RuntimeError(f"ray start --head failed:\n{proc.stderr[-3000:]}")
        yield Cluster(root, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", env)
    finally:
        kill_ray_processes_under(root)
        shutil.rmtree(root, ignore_errors=True)


def _last_json(stdout: str):
    """The JSON line a helper printed last: a worker's log line forwarded to the driver may come after it."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith(("[", "{")):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError(f"no JSON line in the helper's output: {stdout[-500:]!r}")
