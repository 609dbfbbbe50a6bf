"""The teacher at production scale, on Ray against the test server: every actor busy, honest progress and plans,
retryable failures retried (only), the limiter that survives, a pipeline-wide budget, and the Batch API."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import ray
import yaml

from asclepius.config import TeacherConfig, config_from_dict
from asclepius.pipeline import run_pipeline
from asclepius.run import RunDir, stage_status
from asclepius.teacher.client import ChatRequest, PrivacyError
from asclepius.teacher.cost import BudgetExceeded
from asclepius.teacher.ledger import scan_ledger
from asclepius.teacher.ray_data import ask_rows, teacher_totals, user_messages
from asclepius.testing import job_env
from asclepius.testing.server_process import openai_test_server

pytestmark = pytest.mark.ray


def teacher(server, name, **kw):
    return {"provider": "openai_compatible", "base_url": server.base_url, "model": "test-teacher", "requests_per_minute": 100000,
            "tokens_per_minute": 10**9, "num_actors": 2, "max_attempts": 2, "backoff_base_s": 0.01, "timeout_s": 30,
            "limiter_name": f"lim-{name}", "batch_poll_s": 0.2, **kw}  # fmt: skip


def rows(n, marker=""):
    return pd.DataFrame({"messages": [user_messages(f"note {i} {marker if i == 0 else ''}") for i in range(n)], "max_tokens": 16,
                         "sample_index": [f"n{i}" for i in range(n)], "temperature": 0.0})  # fmt: skip


def test_every_actor_works_and_progress_counts_rows_not_attempts(ray_local, tmp_path, caplog):
    import logging

    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.3) as server:
        cfg = TeacherConfig(**teacher(server, tmp_path.name, num_actors=3, concurrency_per_actor=4, progress_every_s=0.5))
        with caplog.at_level(logging.INFO, logger="asclepius.teacher"):
            out = ask_rows(cfg, "t", rows(36, "[[fault:500-once]]"), str(tmp_path / "ledger"))
        assert (out.status == "ok").all() and len(out) == 36
        writers = {r["key"] for r in server.stats()["requests"]}
        assert len(writers) == 36
        parts = list((tmp_path / "ledger").glob("part-*.jsonl"))
        assert len(parts) == 3  # three actors, each wrote answers: the work was split, every actor busy
        last = [r.message for r in caplog.records if "rows done" in r.message][-1]
        assert "36/36 rows done (0 failed), 37 attempts, 1 retries" in last  # a retry is not a row
        assert out.attrs["plan"]["to_send"] == 36 and out.attrs["plan"]["actors"] == 3


def test_concurrency_follows_the_quota_by_littles_law():
    from asclepius.teacher.ray_data import concurrency_for

    cfg = TeacherConfig(provider="openai", requests_per_minute=3000, tokens_per_minute=300_000, num_actors=4, expected_latency_s=5)
    # 300k TPM / 2,400-token requests = 125 requests/min ≈ 2.1/s; × 5 s latency × 1.25 ≈ 13 in flight, over 4 actors
    assert concurrency_for(cfg, 2400, 10_000) == 4
    big = cfg.model_copy(update={"tokens_per_minute": 2_000_000})  # 833/min: ~87 in flight
    assert concurrency_for(big, 2400, 10_000) == 22
    assert concurrency_for(cfg.model_copy(update={"concurrency_per_actor": 7}), 2400, 10) == 7


def generic_config(tmp_path, server, texts, **extra):
    with open(tmp_path / "clinic.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "body"]] + [[f"c{i}", t] for i, t in enumerate(texts)])
    return {"run_dir": str(tmp_path / "run"), "notes": {"sources": [
            {"kind": "generic", "name": "clinic", "path": str(tmp_path / "clinic.csv"), "text_column": "body", "id_column": "id"}]},
            "teacher": teacher(server, tmp_path.name), "split": {"eval_fraction": 0.0}, "questions": {"max_tokens": 24},
            "answers": {"max_tokens": 24}, **extra}  # fmt: skip


def test_a_row_out_of_retries_is_retried_on_rerun_and_only_it(ray_local, tmp_path):
    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.01) as server:
        texts = ["Pt w/ CHF on lasix.", "DKA resolved. [[fault:500]]", "COPD on home O2."]
        data = generic_config(tmp_path, server, texts)
        cfg = config_from_dict(data)
        first = run_pipeline(cfg, stages=["notes", "split", "questions"])["questions"]
        assert first["counts"]["kept"] == 2 and first["incomplete_rows"] == 1
        from asclepius.generate.questions import STAGE as QUESTIONS

        status = stage_status(QUESTIONS, cfg, RunDir.open(cfg.run_dir))
        assert status.state == "stale" and status.reasons == ["1 rows failed with retryable errors"]
        before = len(server.stats()["requests"])
        again = run_pipeline(cfg, stages=["notes", "split", "questions"])["questions"]
        sent = server.stats()["requests"][before:]
        assert len({r["key"] for r in sent}) == 1 and len(sent) == 2  # the failed row, its 2 attempts; the others from the ledger
        assert again["teacher"]["from_ledger"] == 2 and again["teacher"]["plan"]["in_ledger"] == 2


def test_a_resumed_questions_stage_prices_only_what_the_ledger_lacks(ray_local, tmp_path):
    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.01) as server:
        data = generic_config(tmp_path, server, [f"Pt {i} seen in clinic for follow-up of hypertension." for i in range(8)])
        cfg = config_from_dict(data)
        first = run_pipeline(cfg, stages=["notes", "split", "questions"])["questions"]
        assert first["teacher"]["plan"]["to_send"] == 8
        # the same config again (as after a kill): the journal's prompts are the exact ones, all in the ledger
        again = run_pipeline(cfg, stages=["questions"], force=True)["questions"]
        assert again["teacher"]["plan"] == {**again["teacher"]["plan"], "to_send": 0, "in_ledger": 8, "usd_max": 0.0}


def test_the_limiter_lives_on_the_head_and_comes_back(ray_local):
    from asclepius.teacher.limiter import limiter_actor

    actor = limiter_actor("lim-restart-test", 100, 10000, 0.99)
    ray.get(actor.reserve.remote(10))
    head = next(n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"])
    assert ray.get(actor.snapshot.remote())["granted"] == 1 and ray.get(actor.node_id.remote()) == head
    ray.kill(actor, no_restart=False)  # the node it ran on failed, say
    deadline = time.time() + 30
    while time.time() < deadline:
        try:  # ray.kill returns before the actor is gone: the old one may still answer for a moment
            if ray.get(actor.snapshot.remote(), timeout=5)["granted"] == 0:  # restarted (an empty log)
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.5)
    else:
        raise AssertionError("the limiter did not come back")


def test_the_budget_caps_the_whole_pipeline(ray_local, tmp_path):
    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.01, completion_tokens=20) as server:
        priced = {"prices": {"test-teacher": {"prompt_per_1m": 100.0, "completion_per_1m": 100.0}}}
        data = generic_config(tmp_path, server, [f"Pt {i} with a long history of heart failure and diabetes." for i in range(6)])
        data["teacher"].update(priced)
        questions = run_pipeline(config_from_dict(data), stages=["notes", "split", "questions"])["questions"]
        spent = questions["teacher"]["cost_usd"]
        assert spent > 0
        # the answers stage alone would fit this budget; with what questions spent, it does not
        data["teacher"]["budget_usd"] = spent + 0.5 * questions["teacher"]["plan"]["usd_max"]
        with pytest.raises(BudgetExceeded, match="already spent"):
            run_pipeline(config_from_dict(data), stages=["answers"])


# ----------------------------------------------------------------------------------------------- the Batch API
def synth_config(tmp_path, server, **teacher_extra):
    return {"run_dir": str(tmp_path / "run"), "notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]},
            "teacher": teacher(server, tmp_path.name, mode="batch", **teacher_extra), "split": {"eval_fraction": 0.0},
            "synthesize": {"limit": 5, "max_tokens_cap": 32}}  # fmt: skip


def test_batch_mode_half_the_price_and_nothing_twice(ray_local, tmp_path):
    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.01, batch_latency_s=0.5, completion_tokens=20) as server:
        priced = {"prices": {"test-teacher": {"prompt_per_1m": 10.0, "completion_per_1m": 30.0}}}
        batch = run_pipeline(config_from_dict(synth_config(tmp_path, server, **priced)), stages=["notes", "synthesize"])["synthesize"]
        stats = server.stats()
        assert batch["counts"]["kept"] == 5 and stats["batches_created"] == 1
        assert not [r for r in stats["requests"] if r["path"].endswith("/chat/completions")]  # no online request
        assert pd.read_parquet(tmp_path / "run" / "synthetic_notes").text.str.startswith("Answer ").all()
        # the same stage online (another run directory): the same answers at twice the price, estimated and paid
        (tmp_path / "online").mkdir()
        online_cfg = synth_config(tmp_path / "online", server, **priced)
        online_cfg["teacher"]["mode"] = "online"
        online = run_pipeline(config_from_dict(online_cfg), stages=["notes", "synthesize"])["synthesize"]["teacher"]
        assert batch["teacher"]["cost_usd"] == pytest.approx(0.5 * online["cost_usd"], rel=1e-6)
        assert batch["teacher"]["plan"]["usd_max"] == pytest.approx(0.5 * online["plan"]["usd_max"], rel=1e-6)
        # a rerun creates no batch and sends nothing
        created = server.stats()["batches_created"]
        again = run_pipeline(config_from_dict(synth_config(tmp_path, server, **priced)), stages=["synthesize"], force=True)["synthesize"]
        assert server.stats()["batches_created"] == created and again["teacher"]["from_ledger"] == 5


def test_batch_failed_lines_go_in_a_new_batch_and_azure_paths(ray_local, tmp_path):
    from asclepius.teacher.batch import BatchRunner

    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.01, batch_latency_s=0.2) as server:
        os.environ["AZ_BATCH_KEY"] = "az"
        cfg = TeacherConfig(provider="azure", azure_endpoint=server.root, azure_deployment="gpt4o-batch", model="gpt-4o", api_key_env="AZ_BATCH_KEY",
                            mode="batch", batch_poll_s=0.1, max_attempts=3)  # fmt: skip
        reqs = [ChatRequest([{"role": "user", "content": f"q{i} {'[[fault:500-once]]' if i == 1 else ''}"}], 8, stage="b", sample_index=i)
                for i in range(4)]  # fmt: skip
        out = BatchRunner(cfg, "b", str(tmp_path / "ledger"), (2.5, 10.0)).run(reqs)
        assert [o.status for o in out] == ["ok"] * 4 and out[1].attempts == 2
        stats = server.stats()
        assert stats["batches_created"] == 2  # the failed line in a second batch
        uploads = [r for r in stats["requests"] if r["path"].startswith("/openai/files")]
        assert uploads and all(r["query"] == {"api-version": cfg.api_version} and r["api_key"] == "az" for r in uploads)


def test_a_batch_line_that_is_no_completion_is_retried_as_malformed_and_the_others_land(tmp_path):
    from asclepius.teacher.batch import BatchRunner

    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.01, batch_latency_s=0.1) as server:
        cfg = TeacherConfig(**teacher(server, "lines", mode="batch", batch_poll_s=0.05, max_attempts=2))
        markers = ["", "[[fault:not_completion]]", "[[fault:malformed]]", "[[fault:content_filter]]", "[[fault:500]]"]
        reqs = [ChatRequest([{"role": "user", "content": f"q{i} {m}"}], 8, stage="b", sample_index=i) for i, m in enumerate(markers)]
        out = BatchRunner(cfg, "b", str(tmp_path / "ledger"), (0.0, 0.0)).run(reqs)
        assert [o.status for o in out] == ["ok", "error", "error", "ok", "error"]
        assert out[0].texts[0].startswith("Answer ") and out[0].prompt_tokens > 0
        assert (out[1].error, out[1].http_status, out[1].attempts) == ("malformed response (ValueError)", 200, 2)
        assert (out[2].error, out[2].attempts) == ("batch completed, no result", 2)  # a line cut short names no request
        assert out[3].texts == [""] and out[3].finish_reasons == ["content_filter"]  # content: null is an empty answer
        assert (out[4].error, out[4].attempts) == ("batch http 500 server_error", 2)
        assert server.stats()["batches_created"] == 2  # the three failed lines went in a second batch, once
        journaled = scan_ledger(str(tmp_path / "ledger"))  # the answers are final; the failures are retried by a rerun
        assert set(journaled.records) == {o.key for o in out if o.status == "ok"}
        assert set(journaled.retryable) == {o.key for o in out if o.status == "error"}


def test_batch_result_lines_are_read_adversarially(tmp_path):
    from types import SimpleNamespace

    from asclepius.teacher.batch import BatchRunner

    def completion(text, **usage):
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}], "usage": usage}

    keys = [f"k{i}" for i in range(7)]
    lines = ["[", "[]", "\"text\"", "[" * 100_000 + "]" * 100_000, json.dumps({"custom_id": 5}), "\ud800",
             json.dumps({"custom_id": "k0", "response": {"status_code": 200, "body": completion("hi", prompt_tokens=3, completion_tokens=1)}}),
             json.dumps({"custom_id": "k1", "response": None, "error": {"code": "invalid_request", "message": "quotes the note"}}),
             json.dumps({"custom_id": "k2", "response": {"status_code": "200", "body": completion("hi")}}),
             json.dumps({"custom_id": "k3", "response": {"status_code": 200, "body": completion("hi", prompt_tokens=1e308, completion_tokens=-1)}}),
             json.dumps({"custom_id": "k4", "response": {"status_code": 200, "body": {"choices": [{"index": 0, "message": "x"}]}}}),
             json.dumps({"custom_id": "k5", "response": {"status_code": 400, "body": {"error": {"code": ["not", "a", "string"]}}}}),
             json.dumps({"custom_id": "unknown", "response": {"status_code": 200, "body": completion("hi")}})]  # fmt: skip
    contents = {"out": "\n".join(lines), "err": ""}
    client = SimpleNamespace(files=SimpleNamespace(content=lambda fid: SimpleNamespace(text=contents[fid])))
    cfg = TeacherConfig(provider="openai_compatible", base_url="http://127.0.0.1:9/v1", model="m", mode="batch")
    runner = BatchRunner(cfg, "b", str(tmp_path / "ledger"), (1.0, 1.0), client=client)
    batch = SimpleNamespace(id="batch_1", status="completed", output_file_id="out", error_file_id="err")
    out = runner._collect(batch, set(keys), {k: 1 for k in keys})
    assert set(out) == set(keys)
    assert out["k0"].status == "ok" and out["k0"].texts == ["hi"] and (out["k0"].prompt_tokens, out["k0"].completion_tokens) == (3, 1)
    assert (out["k1"].error, out["k1"].retryable) == ("batch http None invalid_request", True)  # no status: may be transient
    assert "note" not in out["k1"].error  # the provider's message may quote the input: never kept
    assert (out["k2"].status, out["k2"].http_status, out["k2"].retryable) == ("error", None, True)
    assert out["k3"].status == "ok" and (out["k3"].prompt_tokens, out["k3"].completion_tokens) == (None, None)  # unknown usage
    assert (out["k4"].error, out["k4"].retryable) == ("malformed response (ValueError)", True)
    assert (out["k5"].error, out["k5"].retryable) == ("batch http 400", False)
    assert (out["k6"].error, out["k6"].retryable) == ("batch completed, no result", True)
    runner.ledger.close()
    journaled = scan_ledger(str(tmp_path / "ledger"))
    assert set(journaled.records) == {"k0", "k3", "k5"} and set(journaled.retryable) == {"k1", "k2", "k4", "k6"}


def test_a_batch_created_before_a_crash_is_adopted_not_created_again(ray_local, tmp_path):
    from asclepius.teacher.batch import BatchRunner, chunk_id, make_sync_client

    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.01, batch_latency_s=0.2) as server:
        cfg = TeacherConfig(**teacher(server, "adopt", mode="batch", batch_poll_s=0.1))
        reqs = [ChatRequest([{"role": "user", "content": f"q{i}"}], 8, stage="b", sample_index=i) for i in range(3)]
        runner = BatchRunner(cfg, "b", str(tmp_path / "ledger"), (0.0, 0.0))
        keys = sorted(r.key(runner.identity, cfg.model) for r in reqs)
        import io

        # the killed job uploaded and created its batch, then died before journaling it
        client = make_sync_client(cfg)
        data = "".join(json.dumps(runner._line(k, r)) + "\n" for k, r in zip([r.key(runner.identity, cfg.model) for r in reqs], reqs)).encode()
        upload = client.files.create(file=("x.jsonl", io.BytesIO(data)), purpose="batch")
        client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"asclepius_chunk": chunk_id(keys)})  # fmt: skip
        out = runner.run(reqs)
        assert [o.status for o in out] == ["ok"] * 3 and server.stats()["batches_created"] == 1


def test_kill_during_a_batch_then_resubmit_pays_nothing_twice(tmp_path, ray_local):
    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.01, batch_latency_s=8) as server:
        data = synth_config(tmp_path, server)
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(data))
        cmd = [sys.executable, "-m", "asclepius.cli", "run", "--config", str(tmp_path / "cfg.yaml"), "--stage", "notes", "--stage", "synthesize"]
        env = job_env(ray_local.get_runtime_context().gcs_address)  # jobs on one running cluster
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.time() + 240
        while not list((tmp_path / "run" / "ledger" / "synthesize").glob("batches-*.jsonl")):
            assert proc.poll() is None and time.time() < deadline, "the job ended before its batch was journaled"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # mid-batch: the provider keeps working on it
        proc.wait()
        rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert server.stats()["batches_created"] == 1  # polled and downloaded, never created twice
        assert len(pd.read_parquet(tmp_path / "run" / "synthetic_notes")) == 5


def test_batch_refuses_credentialed_notes_without_a_zero_retention_agreement(ray_local, tmp_path):
    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.01) as server:
        data = synth_config(tmp_path, server)
        data["notes"]["sources"][0]["credentialed"] = True
        with pytest.raises(PrivacyError, match="zero-data-retention"):
            run_pipeline(config_from_dict(data), stages=["notes", "synthesize"])
        data["teacher"]["batch_zero_retention_agreement"] = True
        assert run_pipeline(config_from_dict(data), stages=["synthesize"])["synthesize"]["counts"]["kept"] == 5


def test_questions_in_batch_mode_go_in_waves(ray_local, tmp_path):
    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.01, batch_latency_s=0.2) as server:
        data = generic_config(tmp_path, server, [f"Pt {i} admitted with chest pain, troponin negative." for i in range(7)])
        data["teacher"].update(mode="batch", batch_wave_size=3)
        q = run_pipeline(config_from_dict(data), stages=["notes", "split", "questions"])["questions"]
        assert server.stats()["batches_created"] == 3  # 7 notes in waves of 3: the pool updated between them
        assert q["counts"]["kept"] == 7 and q["similarity"]["offered"] == 7
        table = pd.read_parquet(tmp_path / "run" / "questions")
        assert table.pool_size_at_prompt.max() > 0  # later waves saw questions from earlier ones
        assert teacher_totals(pd.DataFrame()) == {"requests": 0}
