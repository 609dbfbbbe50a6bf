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
from asclepius.generate.pool import QuestionPool
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
    # published by copying (S3 has no folder rename), the staging area gone, the listing recorded
    assert objects(s3, "contract/out") == ["sub/u.parquet", "t.parquet"]
    assert not [o for o in objects(s3, "contract") if o.startswith(".staging")]
    assert run_stage(stage, cfg, run)["skipped"] and work.calls == 1
    assert sorted(run.read_frame("out").x) == [0, 1]
    # a rerun replaces the folder, never appends to it; a missing object makes the stage stale
    run_stage(stage, cfg, run, force=True)
    assert sorted(run.read_frame("out").x) == [0, 2] and objects(s3, "contract/out") == ["sub/u.parquet", "t.parquet"]
    run.fs.delete_file(run.path("out", "sub", "u.parquet"))
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


@pytest.mark.ray
def test_pipeline_in_s3_from_notes_to_a_served_answer(s3, tmp_path):
    """The whole path with `run_dir: s3://...`, in its own Ray instance as a user runs it: notes → the generating
    stages → pretraining → finetuning on 2 workers (Ray Train checkpoints through storage_filesystem, the export
    uploaded) → Serve loads the finetuned checkpoint from S3 → /v1/answer. The endpoint comes from the config
    (`storage.endpoint_url`), only the credentials from the environment; nothing of the run is on a local disk."""
    from asclepius.testing.server_process import free_port

    uri = s3.uri("pipeline-run")
    cache = tmp_path / "cache"
    env = {**os.environ, "RAY_ADDRESS": "", "ASCLEPIUS_CACHE": str(cache)}
    env.pop("AWS_ENDPOINT_URL")  # the job's workers get it from storage.endpoint_url, through the runtime_env
    overrides = [
        f"run_dir={uri}", f"storage.endpoint_url={s3.endpoint_url}", "teacher_from_serve=null", "model.base=tiny",
        "serve.models=[{name: tiny-base, source: tiny, num_cpus: 0.5}]", f"serve.port={free_port()}",
        "pretrain.max_steps=1", "finetune.num_workers=2", "evaluate=null",
    ]  # fmt: skip
    stages = [a for s in STAGES for a in ("--stage", s)]
    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.05, completion_tokens=30) as server:
        started = time.time()
        proc = subprocess.run([sys.executable, "ray_jobs/pipeline.py", "--config", "configs/demo.yaml", *stages, *overrides,
                               f"teacher.base_url={server.base_url}"], cwd=os.path.dirname(os.path.dirname(__file__)), env=env,
                              capture_output=True, text=True, timeout=1200)  # fmt: skip
        took = time.time() - started
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    run = RunDir.open(uri)
    manifest = run.read_manifest()["stages"]
    assert all(manifest[s]["status"] == "complete" for s in STAGES)
    assert manifest["finetune"]["workers"] == 2 and manifest["finetune"]["final_step"] == 2
    assert manifest["finetune"]["base"] == f"{uri}/checkpoints/pretrain/final"  # finetuning started from S3
    assert manifest["finetune"]["export_dir"] == f"{uri}/checkpoints/finetune/final"
    exported = objects(s3, "pipeline-run/checkpoints/finetune")
    assert {"final/config.json", "final/model.safetensors", "metrics.jsonl", "summary.json", "loss.png"} <= set(exported)
    assert [o for o in objects(s3, "pipeline-run/ray_train") if o.startswith("finetune-") and "/checkpoint" in o]  # Ray Train's
    assert len(run.read_frame("instructions")) > 0 and len(_history_of(run)) == 2
    assert scan_ledger(run.uri_of("ledger", "answers")).files < len(run.read_frame("instructions")) + 1  # group commits
    # the served finetuned model answered /v1/answer, loaded from the local cache of its S3 checkpoint
    check = manifest["serve"]["answer_checks"]["asclepius-finetuned"]
    assert check["completion_tokens"] > 0 and check["prompt_tokens"] > 0
    assert any((cache / "objects" / d / "config.json").is_file() for d in os.listdir(cache / "objects"))
    assert "model: " + f"{uri}/checkpoints/finetune/final" in proc.stderr
    print(f"pipeline in S3, notes to a served answer: {took:.0f} s")


def _history_of(run):
    from asclepius.train.ray_train import _history

    return _history(run.uri_of("checkpoints", "finetune", "metrics.jsonl"))
