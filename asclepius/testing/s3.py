"""An S3-compatible server on this machine for tests: moto's server mode (`moto[server]`) in its own process.

`env` is what a client needs — fake credentials and AWS_ENDPOINT_URL, which pyarrow and boto read — and a bucket
is created up front, as an administrator would before a run."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

from asclepius.testing.server_process import free_port


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str
    env: dict[str, str]

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])


@contextlib.contextmanager
def s3_test_server(bucket: str = "asclepius-runs"):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url, "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the S3 test server did not start") from None
                time.sleep(0.2)
        import pyarrow.fs as pafs

        pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", endpoint_override=url,
                          allow_bucket_creation=True).create_dir(bucket)  # fmt: skip
        yield S3Server(url, bucket, env)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def s3_env(server: S3Server):
    """The server's variables in this process's environment, restored after."""
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
