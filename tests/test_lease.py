"""One driver per run directory (asclepius/lease.py): a second driver is refused with the holder's name, a stale lease
is taken over and says so, a driver that lost its lease writes nothing more — on a filesystem and on S3 (moto's
server, which implements S3's conditional writes: If-None-Match on PutObject, If-Match on PutObject and DeleteObject)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asclepius.lease import LEASE_FILE, LeaseLost, RunDirLeased, RunLease
from asclepius.run import RunDir
from asclepius.testing import job_env
from asclepius.testing.s3 import s3_env, s3_test_server
from asclepius.testing.server_process import openai_test_server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3():
    with s3_test_server() as server, s3_env(server):
        yield server


@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path):
    if request.param == "local":
        RunDir.open(str(tmp_path / "run"))
        return str(tmp_path / "run")
    server = request.getfixturevalue("s3")
    return server.uri(f"lease-{tmp_path.name}")


def test_a_second_driver_is_refused_naming_the_holder(run_uri):
    first = RunLease.acquire(run_uri, heartbeat_s=0.2, stale_after_s=60)
    try:
        with pytest.raises(RunDirLeased, match=rf"in use by another driver: \S+ pid {os.getpid()} .*renewed \d+ s ago"):
            RunLease.acquire(run_uri, heartbeat_s=0.2, stale_after_s=60)
        with pytest.raises(RunDirLeased, match=rf"in use by another driver: \S+ pid {os.getpid()} "):
            RunLease.refuse_if_held(run_uri, stale_after_s=60)  # the look before Ray says the same, writing nothing
        time.sleep(0.6)  # heartbeats renew it; the holder still holds it
        first.check()
    finally:
        first.release()
    RunLease.refuse_if_held(run_uri, stale_after_s=60)  # released: free again
    second = RunLease.acquire(run_uri, heartbeat_s=0.2, stale_after_s=60)
    second.release()


def test_the_look_before_ray_writes_nothing(tmp_path):
    RunLease.refuse_if_held(str(tmp_path / "new-run"), stale_after_s=60)  # a run directory not made yet stays unmade
    assert not (tmp_path / "new-run").exists()


def test_a_stale_lease_is_taken_over_and_its_holder_stops_writing(run_uri, caplog):
    gone = RunLease.acquire(run_uri, heartbeat_s=3600, stale_after_s=1)  # a driver that stopped renewing (kill -9)
    time.sleep(2.2)
    with caplog.at_level("WARNING", logger="asclepius"):
        taker = RunLease.acquire(run_uri, heartbeat_s=0.2, stale_after_s=1)
    try:
        assert any("took over a stale lease" in r.getMessage() and f"pid {os.getpid()}" in r.getMessage() for r in caplog.records)
        with pytest.raises(LeaseLost):  # the old holder's next renewal finds the lease taken
            gone.store.renew(gone.holder)
        # a RunDir whose lease is lost refuses to write the manifest
        gone.lost = "taken over"
        run = RunDir.open(run_uri)
        import dataclasses

        with pytest.raises(LeaseLost):
            dataclasses.replace(run, lease=gone).record_stage("notes", {"status": "running"})
        dataclasses.replace(run, lease=taker).record_stage("notes", {"status": "running"})
    finally:
        taker.release()


def _lease_exists(uri: str) -> bool:
    from asclepius.storage import read_bytes, uri_join

    return read_bytes(uri_join(uri, LEASE_FILE)) is not None


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_asclepius_runs_on_one_run_directory(where, tmp_path, request, ray_local):
    """The way it happens: Ctrl-C on `ray job submit` leaves the job running, and the user submits again: every driver
    here joins one running Ray instance (this session's), as jobs on a cluster do."""
    gcs = ray_local.get_runtime_context().gcs_address
    if where == "s3":
        server = request.getfixturevalue("s3")
        uri = server.uri("two-drivers")
        env = {**job_env(gcs, server.env), **server.env}  # the workers' credentials, and the driver's own
    else:
        uri = str(tmp_path / "run")
        env = job_env(gcs)

    def asclepius(*args: str, **kw) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "asclepius.cli", "run", "--config", "configs/demo.yaml", f"run_dir={uri}",
               "teacher_from_serve=null", f"teacher.base_url={teacher.base_url}", *args]  # fmt: skip
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, **kw)  # fmt: skip

    with openai_test_server(rpm=100000, tpm=10**9, latency_s=60, completion_tokens=30) as teacher:
        first = asclepius("--stage", "notes", "--stage", "synthesize")  # slow teacher: it holds the run for a while
        try:
            deadline = time.time() + 180
            while not _lease_exists(uri):
                assert first.poll() is None and time.time() < deadline, first.stdout.read() if first.poll() is not None else "no lease"
                time.sleep(1)
            second = asclepius("--stage", "notes")
            out, _ = second.communicate(timeout=300)
            assert second.returncode == 2, out[-3000:]
            assert "in use by another driver: " in out and f"pid {first.pid} " in out and "renewed" in out, out[-3000:]
            assert "notes:" not in out.split("error:")[0]  # it ran no stage
        finally:
            os.killpg(first.pid, signal.SIGKILL)  # kill -9: the lease stays behind, renewed no more
            first.wait()
        assert _lease_exists(uri)
        third = asclepius("--stage", "notes")  # at once, on the same host: the holder's process is gone
        out, _ = third.communicate(timeout=300)
    assert third.returncode == 0, out[-3000:]
    assert "took over a stale lease of " in out and f"pid {first.pid} " in out and "its process is gone" in out, out[-3000:]
    assert not _lease_exists(uri)  # released at the end
    run = RunDir.open(uri)
    assert run.read_manifest()["stages"]["notes"]["status"] == "complete"
    assert json.dumps(run.read_manifest())  # one writer: a whole manifest
