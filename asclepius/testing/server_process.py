"""Start the OpenAI-compatible test server in its own process (for tests and benchmarks)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A port free now, for a server that binds it later. Picked below the kernel's ephemeral range, where every bind
    to port 0 draws (Ray's own components among them: one took a Serve port chosen that way between the pick and the
    bind), and above Ray's worker ports (10002-19999), so nothing else is handed it in between."""
    import random

    low, high = 20000, _ephemeral_low() - 1
    for _ in range(200 if high > low else 0):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the ephemeral range: the kernel's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, port: int, proc: subprocess.Popen):
        self.port, self.proc = port, proc
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.root = f"http://127.0.0.1:{port}"

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.root}/_stats", timeout=10) as r:
            return json.loads(r.read())

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.root}/_reset", method="POST"), timeout=10).read()


@contextlib.contextmanager
def openai_test_server(**options):
    port = free_port()
    # the server exits with this process: a test or benchmark killed with -9 never reaches the `finally` below
    args = [sys.executable, "-m", "asclepius.testing.openai_server", "--port", str(port), "--exit-with-parent", str(os.getpid())]
    for k, v in options.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    server = ServerProcess(port, proc)
    try:
        deadline = time.time() + 30
        while True:
            try:
                server.stats()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"test server did not start: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # uvicorn waits for requests in flight (a slow test teacher's): stop it
            proc.kill()
            proc.wait(timeout=10)
