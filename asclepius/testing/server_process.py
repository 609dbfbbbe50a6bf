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


def free_port() -> int:
    with socket.socket() as s:
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
    args = [sys.executable, "-m", "asclepius.testing.openai_server", "--port", str(port)]
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
