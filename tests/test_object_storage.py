"""A run directory in object storage, against a real S3-compatible server started here (moto's server mode): the
stage contract, the ledger's group commit, journals, checkpoints read back through the local cache. Object storage
has no folder rename and no append; these tests hold the code to that."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pyarrow.fs as pafs
import pytest

from asclepius.config import config_from_dict
from asclepius.generate.pool import QuestionPool, QuestionPoolService
from asclepius.recipe import load_recipe
from asclepius.run import RunDir, Stage, run_stage, stage_status
from asclepius.storage import AppendLog, compact, local_copy, log_files, read_bytes, upload_dir, write_bytes
from asclepius.teacher.ledger import Ledger, scan_ledger
from asclepius.testing.s3 import s3_env, s3_test_server
from asclepius.testing.server_process import openai_test_server


def _kill_script() -> str:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("kill_resume", Path(__file__).parent / "teacher" / "test_kill_resume.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SCRIPT


KILL_SCRIPT = _kill_script()  # the same client script as the local kill test, its ledger in S3


@pytest.fixture(scope="module")
def s3():
    with s3_test_server() as server, s3_env(server):
        yield server


def objects(server, prefix: str) -> list[str]:
    fs = pafs.S3FileSystem(endpoint_override=server.endpoint_url, access_key="testing", secret_key="testing", region="us-east-1")
    infos = fs.get_file_info(pafs.FileSelector(f"{server.bucket}/{prefix}", recursive=True, allow_not_found=True))
    return sorted(i.path.split(f"{server.bucket}/{prefix}/", 1)[1] for i in infos if i.type == pafs.FileType.File)


class Work:
    def __init__(self, output):
        self.output, self.calls = output, 0

    def __call__(self, ctx):
        self.calls += 1
        ctx.run.write_frame(ctx.output(self.output), pd.DataFrame({"x": [self.calls]}), "t.parquet")
        ctx.run.write_frame(ctx.output(self.output), pd.DataFrame({"x": [0]}), "sub/u.parquet")
        return {"counts": {"kept": 1}}


def test_the_stage_contract_on_s3(s3):
    uri = s3.uri("contract")
    cfg = config_from_dict({"run_dir": uri, "notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]}})
    run = RunDir.open(uri)
    assert not run.is_local and run.uri_of("a", "b") == f"{uri}/a/b"
    work = Work("out")
    stage = Stage("up", work, sections=("split",), outputs=("out",))
    assert run_stage(stage, cfg, run)["status"] == "complete"
    # published by pointer: the version written in place, the manifest pointing to it, nothing copied, no staging area
    version = run.versions()["out"]
    assert objects(s3, "contract/out") == [f"{version}/sub/u.parquet", f"{version}/t.parquet"]
    assert not [o for o in objects(s3, "contract") if o.startswith(".staging")]
    assert run_stage(stage, cfg, run)["skipped"] and work.calls == 1
    assert sorted(run.read_frame("out").x) == [0, 1]
    # a rerun replaces the output, never appends to it (the old version deleted); a missing object makes the stage stale
    run_stage(stage, cfg, run, force=True)
    new = run.versions()["out"]
    assert new != version and sorted(run.read_frame("out").x) == [0, 2]
    assert objects(s3, "contract/out") == [f"{new}/sub/u.parquet", f"{new}/t.parquet"]
    run.fs.delete_file(run.output_path("out", "sub", "u.parquet"))
    assert stage_status(stage, cfg, run).reasons == ["output out/ differs from what was recorded"]


def test_group_commit_stores_every_record_in_few_objects(s3):
    log = AppendLog(s3.uri("ledger-gc"), "part", writer_id="w1")

    async def one(i):
        await asyncio.sleep(i * 0.0005)  # answers arriving over 100 ms, as from many requests in flight
        await log.commit({"key": f"k{i}", "status": "ok"})

    async def main():
        await asyncio.gather(*(one(i) for i in range(200)))
        await log.commit({"key": "alone", "status": "ok"})  # nothing in flight: a write of its own, at once

    asyncio.run(main())
    files = log_files(s3.uri("ledger-gc"), "part")
    # those that finish while a write is in flight share the next one: far fewer writes than records
    assert 2 <= len(files) < 100, len(files)
    scan = scan_ledger(s3.uri("ledger-gc"))
    assert len(scan.records) == 201 and scan.torn_lines == 0 and scan.files == len(files)


def test_a_failed_write_fails_every_commit_waiting_on_it(s3, monkeypatch):
    log = AppendLog(s3.uri("ledger-fail"), "part")

    def refuse(lines):
        raise OSError("503 Slow Down")

    monkeypatch.setattr(log, "_put", refuse)

    async def main():
        return await asyncio.gather(*(log.commit({"key": f"k{i}"}) for i in range(5)), return_exceptions=True)

    assert all(isinstance(r, OSError) for r in asyncio.run(main()))  # never counted as stored


def test_ledger_merges_writers_and_compaction_keeps_every_record(s3):
    uri = s3.uri("ledger-many")
    for w in range(3):
        led = Ledger(uri, writer_id=f"w{w}")
        for i in range(30):
            led.append({"key": f"{w}-{i}", "status": "ok" if i % 3 else "error", "retryable": True, "texts": ["t"]})
        led.append_many([{"key": f"{w}-0", "status": "ok", "texts": ["retried"]}])
    before = scan_ledger(uri)
    assert before.files == 93 and len(before.records) == 3 * 21 and len(before.retryable) == 3 * 9
    assert compact(uri, "part", min_files=64) == 93
    after = scan_ledger(uri)
    assert after.files == 1 and after.records == before.records and after.retryable == before.retryable
    assert scan_ledger(uri, compact_parts=True).files == 1  # too few objects to fold again


def test_question_pool_journal_replays_from_s3(s3):
    tasks = {t.task: list(t.seed_questions) for t in load_recipe().tasks}
    uri = s3.uri("pool")
    pool = QuestionPool(tasks, 0.7, 3, 2, seed=0, journal_dir=uri)
    plan = pool.examples("n1", "Paraphrasing")
    pool.offer("n1", "Paraphrasing", "How would you explain 'myocardial infarction' to the patient's family?")
    time.sleep(0.01)  # a restarted writer is named later, and replays after the first
    second = QuestionPool(tasks, 0.7, 3, 2, seed=0, journal_dir=uri)
    second.offer("n2", "Paraphrasing", "Can you restate the sentence about dialysis in everyday language?")
    again = QuestionPool(tasks, 0.7, 3, 2, seed=0, journal_dir=uri)
    assert again.examples("n1", "Paraphrasing") == plan
    assert again.tasks["Paraphrasing"].pool == second.tasks["Paraphrasing"].pool and len(again.tasks["Paraphrasing"].pool) == 2
    # the pool's actor takes its calls in lists: a list's decisions are one object (one PUT, not one per decision)
    before = len(log_files(uri, "journal"))
    service = QuestionPoolService(tasks=tasks, threshold=0.7, seed_examples=3, pool_examples=2, seed=0, journal_dir=uri)
    service.examples([(f"m{i}", "Paraphrasing") for i in range(6)])
    service.offer([(f"m{i}", "Paraphrasing", f"Can you restate the line about drug {i} plainly?") for i in range(6)])
    assert len(log_files(uri, "journal")) == before + 2
    replayed = QuestionPool(tasks, 0.7, 3, 2, seed=0, journal_dir=uri)
    assert {f"m{i}" for i in range(6)} <= set(replayed.plans) & set(replayed.decisions)


def test_local_copy_downloads_once_and_again_when_replaced(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("ASCLEPIUS_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "model.safetensors").write_bytes(b"w" * 1000)
    (src / "sub" / "tok.json").write_text("{}")
    upload_dir(str(src), s3.uri("ckpt"))
    first = local_copy(s3.uri("ckpt"))
    assert sorted(os.listdir(first)) == ["config.json", "model.safetensors", "sub"] and oct(os.stat(first).st_mode & 0o777) == "0o700"
    assert local_copy(s3.uri("ckpt")) == first  # cached
    assert "model.safetensors" not in os.listdir(local_copy(s3.uri("ckpt"), weights=False))  # a tokenizer's share
    write_bytes(s3.uri("ckpt", "config.json"), b'{"a": 22}')  # a new checkpoint at the same place
    second = local_copy(s3.uri("ckpt"))
    assert second != first and open(os.path.join(second, "config.json")).read() == '{"a": 22}'
    assert read_bytes(s3.uri("ckpt", "missing.json")) is None
    with pytest.raises(FileNotFoundError):
        local_copy(s3.uri("nothing-here"))


def test_sigkill_midway_then_rerun_on_s3(s3):
    """The ledger's exactly-once across kill -9 (tests/teacher/test_kill_resume.py), with the ledger in S3."""
    ledger = s3.uri("ledger-kill")
    env = {**os.environ, **s3.env}
    with openai_test_server(rpm=100000, tpm=10**8, latency_s=0.25) as srv:
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, srv.base_url, ledger], stdout=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 60
        while len(scan_ledger(ledger).records) < 12:
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        finished_before = set(scan_ledger(ledger).records)
        sent_before = len(srv.stats()["requests"])
        assert 12 <= len(finished_before) < 40

        rerun = subprocess.run([sys.executable, "-c", KILL_SCRIPT, srv.base_url, ledger], capture_output=True, text=True, timeout=120, env=env)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert rerun.stdout.strip() == f"{len(finished_before)} cached"
        scan = scan_ledger(ledger)
        assert len(scan.records) == 40 and all(r["status"] == "ok" for r in scan.records.values())
        after = [r["key"] for r in srv.stats()["requests"][sent_before:]]
        assert not set(after) & finished_before and len(after) == len(set(after)) == 40 - len(finished_before)
        # in flight 4 at a time: the records shared writes rather than one object each
        assert scan.files < 40 + 1, scan.files


def test_metrics_log_survives_a_restarted_rank_zero(s3):
    from asclepius.train.ray_train import _history, _MetricsLog

    uri = s3.uri("train", "metrics.jsonl")
    first = _MetricsLog(uri)
    first.append({"step": 1, "loss": 2.0}, force_upload=True)
    first.append({"step": 2, "loss": 1.5})  # not uploaded yet: lost with the worker, as a step after a checkpoint is
    restarted = _MetricsLog(uri)
    restarted.append({"step": 2, "loss": 1.4})
    restarted.upload()
    assert [(h["step"], h["loss"]) for h in _history(uri)] == [(1, 2.0), (2, 1.4)]
    assert json.loads(read_bytes(uri).decode().splitlines()[0])["step"] == 1


STAGES = ["notes", "synthesize", "split", "questions", "answers", "pretrain", "finetune", "serve"]
COPY_LIMIT = 128 * 1024  # S3 refuses CopyObject above 5 GiB; the test server refuses it above this, so a tiny model is "large"
RUN_PREFIX, NOTES_PREFIX = "asclepius/runs/pipeline-run", "physionet/notes"


def documented_policy(bucket: str) -> dict:
    """The run's IAM policy exactly as the README states it (deploy/iam/run-policy.json), for this bucket and prefixes."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "deploy" / "iam" / "run-policy.json").read_text()
    return json.loads(text.replace("BUCKET", bucket).replace("NOTES_PREFIX", NOTES_PREFIX).replace("RUN_PREFIX", RUN_PREFIX))


@pytest.mark.ray
def test_pipeline_in_s3_as_aws_enforces_it(tmp_path):
    """The whole path with `run_dir: s3://...`, in its own Ray instance as a user runs it, under S3's limits: IAM enforced
    with exactly the documented least-privilege policy (run prefix read/write, notes prefix read, list of those two
    prefixes only), and no CopyObject of an object above the copy limit. notes (read from the notes prefix) → the
    generating stages → pretraining → finetuning on 2 workers (Ray Train checkpoints through storage_filesystem, the
    export uploaded) → Serve loads the finetuned checkpoint from S3 → /v1/answer. The endpoint comes from the config
    (`storage.endpoint_url`), only the credentials from the environment; nothing of the run is on a local disk."""
    from asclepius.notes.readers import sample_path
    from asclepius.testing.s3 import admin_client, enforce_iam
    from asclepius.testing.server_process import free_port

    with s3_test_server(bucket="hospital-data", copy_limit_bytes=COPY_LIMIT) as server:
        admin = admin_client(server)
        sources = []
        for i, kind in enumerate(("mimic3", "mimic4", "pmc")):  # the demo's notes, where a hospital keeps them
            key = f"{NOTES_PREFIX}/{kind}.csv"
            admin.upload_file(sample_path(kind), server.bucket, key)
            sources.append(f"notes.sources.{i}.path=s3://{server.bucket}/{key}")
        admin.put_object(Bucket=server.bucket, Key="other-team/secret.txt", Body=b"not for the pipeline")
        creds = enforce_iam(server, {"pipeline": documented_policy(server.bucket)})
        uri = f"s3://{server.bucket}/{RUN_PREFIX}"
        cache = tmp_path / "cache"
        env = {**os.environ, **creds["pipeline"], "RAY_ADDRESS": "", "ASCLEPIUS_CACHE": str(cache)}
        env.pop("AWS_ENDPOINT_URL")  # the job's workers get it from storage.endpoint_url, through the runtime_env
        overrides = [
            f"run_dir={uri}", f"storage.endpoint_url={server.endpoint_url}", "teacher_from_serve=null", "model.base=tiny",
            "serve.models=[{name: tiny-base, source: tiny, num_cpus: 0.5}]", f"serve.port={free_port()}",
            "pretrain.max_steps=1", "finetune.num_workers=2", "finetune.max_steps=2", "evaluate=null", *sources,
        ]  # fmt: skip
        stages = [a for s in STAGES for a in ("--stage", s)]
        with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.05, completion_tokens=30) as teacher:
            started = time.time()
            proc = subprocess.run([sys.executable, "ray_jobs/pipeline.py", "--config", "configs/demo.yaml", *stages, *overrides,
                                   f"teacher.base_url={teacher.base_url}"], cwd=os.path.dirname(os.path.dirname(__file__)), env=env,
                                  capture_output=True, text=True, timeout=1200)  # fmt: skip
            took = time.time() - started
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]

        import boto3

        s3 = boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
                          aws_access_key_id=creds["admin"]["AWS_ACCESS_KEY_ID"], aws_secret_access_key=creds["admin"]["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
        listed = {o["Key"]: o["Size"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=server.bucket) for o in page.get("Contents", [])}
        # nothing was written outside the run prefix: no marker objects for parent "folders", no stray files
        assert all(k.startswith(f"{RUN_PREFIX}/") or k.startswith(f"{NOTES_PREFIX}/") or k == "other-team/secret.txt" for k in listed), sorted(listed)
        assert not any(k.endswith("/") and not k.startswith(f"{RUN_PREFIX}/") for k in listed)

        with s3_env(server):
            os.environ.update({k: creds["admin"][k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
            run = RunDir.open(uri)
            manifest = run.read_manifest()
            stages_done = manifest["stages"]
            assert all(stages_done[s]["status"] == "complete" for s in STAGES)
            assert stages_done["finetune"]["workers"] == 2 and stages_done["finetune"]["final_step"] == 2
            # finetuning started from the published pretrained model, and the export is a version the manifest points to
            assert stages_done["finetune"]["base"] == f"{uri}/checkpoints/pretrain/{manifest['published']['checkpoints/pretrain']}/final"
            final = f"checkpoints/finetune/{manifest['published']['checkpoints/finetune']}"
            assert stages_done["finetune"]["export_dir"] == f"{uri}/{final}/final"
            exported = {k[len(RUN_PREFIX) + len(final) + 2 :]: v for k, v in listed.items() if k.startswith(f"{RUN_PREFIX}/{final}/")}
            assert {"final/config.json", "final/model.safetensors", "metrics.jsonl", "summary.json", "loss.png"} <= set(exported)
            assert exported["final/model.safetensors"] > COPY_LIMIT  # too large for one CopyObject here: it was never copied
            assert len([k for k in listed if k.startswith(f"{RUN_PREFIX}/checkpoints/finetune/")]) == len(exported)  # one version
            assert any(k.startswith(f"{RUN_PREFIX}/ray_train/finetune-") and "/checkpoint" in k for k in listed)  # Ray Train's
            assert len(run.read_frame("instructions")) > 0 and len(_history_of(run)) == 2
            assert scan_ledger(run.uri_of("ledger", "answers")).files < len(run.read_frame("instructions")) + 1  # group commits
            assert any(k.startswith(f"{RUN_PREFIX}/logs/asclepius-") for k in listed)  # the driver's log, in the run
            assert f"{RUN_PREFIX}/.lease.json" not in listed  # the lease was released
        # the served finetuned model answered /v1/answer, loaded from the local cache of its S3 checkpoint
        check = stages_done["serve"]["answer_checks"]["asclepius-finetuned"]
        assert check["completion_tokens"] > 0 and check["prompt_tokens"] > 0
        assert any((cache / "objects" / d / "config.json").is_file() for d in os.listdir(cache / "objects"))
        assert f"model: {uri}/{final}/final" in proc.stderr
        print(f"pipeline in S3 under the documented IAM policy, notes to a served answer: {took:.0f} s")


def _history_of(run):
    from asclepius.train.ray_train import _history

    return _history(run.output_uri("checkpoints", "finetune", "metrics.jsonl"))


def test_s3s_copy_limit_and_per_key_delete_rights_as_aws_has_them():
    """The test server enforces what moto does not (CopyObject above the limit refused, as S3 refuses it above 5 GiB;
    DeleteObjects authorized per key, as S3 does), and the project's object-store filesystem copies and moves objects
    above the limit by streaming them instead."""
    from asclepius.storage import object_store
    from asclepius.testing.s3 import enforce_iam

    with s3_test_server(bucket="limits", copy_limit_bytes=1024) as server:
        raw = pafs.S3FileSystem(endpoint_override=server.endpoint_url, access_key="testing", secret_key="testing", region="us-east-1")
        for name, size in (("small", 100), ("big", 4096)):
            with raw.open_output_stream(f"limits/a/{name}") as f:
                f.write(bytes(range(256)) * (size // 256) if size >= 256 else b"x" * size)
        raw.copy_file("limits/a/small", "limits/a/small2")  # below the limit: one CopyObject
        with pytest.raises(OSError, match="larger than the maximum allowable size for a copy source"):
            raw.copy_file("limits/a/big", "limits/a/big2")
        fs = object_store(raw, copy_limit_bytes=1024)
        fs.copy_file("limits/a/big", "limits/a/big3")  # streamed through a (multipart) upload
        fs.move("limits/a/big3", "limits/a/big4")
        with raw.open_input_stream("limits/a/big4") as f, raw.open_input_stream("limits/a/big") as g:
            assert f.read() == g.read()
        assert raw.get_file_info("limits/a/big3").type == pafs.FileType.NotFound
        fs.create_dir("limits/x/y/z")  # no folders on object storage: nothing written
        assert raw.get_file_info(pafs.FileSelector("limits/x", allow_not_found=True)) == []

        with raw.open_output_stream("limits/b/other") as f:
            f.write(b"someone else's")
        policy = {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["s3:DeleteObject", "s3:GetObject", "s3:PutObject"], "Resource": "arn:aws:s3:::limits/a/*"},
            {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::limits", "Condition": {"StringLike": {"s3:prefix": ["a/*"]}}},
        ]}  # fmt: skip
        creds = enforce_iam(server, {"scoped": policy})["scoped"]
        import boto3

        scoped = boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
                              aws_access_key_id=creds["AWS_ACCESS_KEY_ID"], aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
        result = scoped.delete_objects(Bucket="limits", Delete={"Objects": [{"Key": "a/small"}, {"Key": "b/other"}]})
        assert [d["Key"] for d in result.get("Deleted", [])] == ["a/small"]
        assert [(e["Key"], e["Code"]) for e in result.get("Errors", [])] == [("b/other", "AccessDenied")]
