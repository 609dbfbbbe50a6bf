"""An S3-compatible server on this machine for tests: moto's server mode (`moto[server]`) in its own process, with the
limits of real S3 that moto does not enforce added back (asclepius.testing.s3_server: CopyObject's 5 GiB, or a
smaller limit a test sets).

`env` is what a client needs — fake credentials and AWS_ENDPOINT_URL, which pyarrow and boto read — and a bucket
is created up front, as an administrator would before a run. `enforce_iam` turns on moto's IAM enforcement and gives
credentials that hold exactly a given policy, so a test runs under the least privilege a README documents."""

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
def s3_test_server(bucket: str = "asclepius-runs", copy_limit_bytes: int | None = None):
    port = free_port()
    limit = ["--copy-limit-bytes", str(copy_limit_bytes)] if copy_limit_bytes is not None else []
    proc = subprocess.Popen([sys.executable, "-m", "asclepius.testing.s3_server", "--port", str(port), *limit],
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


def admin_client(server: S3Server, service: str = "s3"):
    """A boto3 client with the server's root credentials (before IAM is enforced: anything goes)."""
    import boto3

    return boto3.client(service, endpoint_url=server.endpoint_url, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")  # fmt: skip


def enforce_iam(server: S3Server, policies: dict[str, dict]) -> dict[str, dict[str, str]]:
    """Create one IAM user per policy (plus `admin`, with every right, for the test's own checks), then make moto
    enforce IAM on every later request (`/moto-api/reset-auth`, moto's INITIAL_NO_AUTH_ACTION_COUNT). Returns each
    user's client environment (its access key in place of the server's)."""
    import json as _json

    iam = admin_client(server, "iam")
    users = {**policies, "admin": {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}}
    out = {}
    for name, document in users.items():
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=_json.dumps(document))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        out[name] = {**server.env, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    request = urllib.request.Request(f"{server.endpoint_url}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})  # flask reads a form body as empty
    urllib.request.urlopen(request, timeout=10).read()
    return out
