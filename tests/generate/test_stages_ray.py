"""synthesize → questions → answers on Ray against the local OpenAI-compatible test server."""

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from asclepius.config import config_from_dict
from asclepius.pipeline import run_pipeline
from asclepius.run import RunDir
from asclepius.teacher.ledger import scan_ledger
from asclepius.testing.s3 import s3_env, s3_test_server
from asclepius.testing.server_process import openai_test_server
from asclepius.testing import job_env, published

pytestmark = pytest.mark.ray


def generic_notes(path):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "body"])
        w.writerow(["f1", "Pt seen in clinic. [[fault:context_length]]"])  # the teacher refuses: recorded, dropped
        w.writerow(["f2", "Pt seen in clinic. [[fault:content_filter]]"])  # filtered by the teacher: dropped
        w.writerow(["f3", "Pt w/ HTN on lisinopril, BP controlled, f/u 3 months."])
    return path


def config(tmp_path, server, **extra):
    data = {
        "run_dir": str(tmp_path / "run"),
        "notes": {"sources": [
            {"kind": "mimic3", "path": "sample:mimic3"}, {"kind": "pmc", "path": "sample:pmc"},
            {"kind": "generic", "name": "clinic", "path": str(generic_notes(tmp_path / "clinic.csv")), "text_column": "body", "id_column": "id"},
        ]},
        "teacher": {"provider": "openai_compatible", "base_url": server.base_url, "model": "test-teacher",
                    "requests_per_minute": 100000, "tokens_per_minute": 10**9, "num_actors": 2, "concurrency_per_actor": 4,
                    "max_attempts": 2, "backoff_base_s": 0.01, "timeout_s": 30, "limiter_name": f"lim-{tmp_path.name}"},
        "split": {"eval_fraction": 0.2},
        "synthesize": {"limit": 3, "max_tokens_cap": 64},
        "questions": {"max_tokens": 40},
        "answers": {"max_tokens": 60},
        **extra,
    }  # fmt: skip
    return data


def test_three_stages_end_to_end(ray_local, tmp_path):
    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.01, completion_tokens=30) as server:
        cfg = config_from_dict(config(tmp_path, server))
        results = run_pipeline(cfg, stages=["notes", "synthesize", "split", "questions", "answers"])
        run = tmp_path / "run"

        synth = pd.read_parquet(run / "synthetic_notes")
        assert list(synth.note_id) == ["synthetic-pmc-9000001-1", "synthetic-pmc-9000002-1", "synthetic-pmc-9000003-1"]
        assert synth.text.str.startswith("Answer ").all() and (synth.source == "synthetic").all()
        s = results["synthesize"]
        assert s["counts"]["read"] == 12 and s["counts"]["not_selected_over_limit"] == 9 and s["counts"]["kept"] == 3
        assert s["teacher"]["requests"] == 3 and s["teacher"]["from_ledger"] == 0
        # streamed: three summaries for one actor are three blocks, each written as a part when it came back
        assert len(list((run / "synthetic_notes").rglob("synthetic_notes-*.parquet"))) == 3

        q = pd.read_parquet(run / "questions")
        evals = pd.read_parquet(run / "eval_notes")
        asked = 6 + 3 + 3 - len(evals)  # mimic3 + clinic + synthetic notes, minus the held-out ones
        qc = results["questions"]["counts"]
        assert qc["read"] == 12 and qc["held_out_for_eval"] == len(evals)
        assert qc["kept"] + qc.get("dropped:teacher_error", 0) + qc.get("dropped:content_filter", 0) == asked
        assert not set(evals.note_id) & set(q.note_id)
        assert set(q.task) <= {t.task for t in cfg.questions.tasks}
        assert q.examples.map(lambda e: len(json.loads(e))).between(3, 5).all()
        assert results["questions"]["similarity"]["offered"] == qc["kept"]

        ins = pd.read_parquet(run / "instructions")
        assert list(ins.columns[:6]) == ["note", "question", "answer", "task", "note_id", "source"]
        assert len(ins) == results["answers"]["counts"]["kept"] == qc["kept"]
        assert results["answers"]["decontamination"]["clean"] and results["answers"]["decontamination"]["eval_notes"] == len(evals)
        recipe_json = json.loads(published(run, "export", "instructions.json").read_text())
        assert recipe_json == ins[["note", "question", "answer"]].to_dict(orient="records")

        for stage, n in (("synthesize", 3), ("questions", asked), ("answers", len(ins))):
            assert len(scan_ledger(str(run / "ledger" / stage)).records) == n
        manifest = json.loads((run / "manifest.json").read_text())
        assert {"notes", "synthesize", "questions", "answers"} <= set(manifest["stages"])

        # a finished pipeline is skipped, and pays nothing
        sent = len(server.stats()["requests"])
        again = run_pipeline(cfg, stages=["notes", "synthesize", "split", "questions", "answers"])
        assert all(e.get("skipped") for e in again.values()) and len(server.stats()["requests"]) == sent


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_kill_midway_and_resubmit_pays_nothing_twice(tmp_path, storage, request):
    """kill -9 of the job mid-stage, then the same command again: nothing finished is sent twice — with the run on a
    local disk as the embedded default runs it (the driver and the Ray instance it started die together), and in S3
    as a job on a cluster (the driver dies; the running instance ends its workers) with the ledger's group-committed
    objects."""
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(openai_test_server(rpm=100000, tpm=10**9, latency_s=0.5, completion_tokens=20))
        data = config(tmp_path, server, synthesize={"limit": 12, "max_tokens_cap": 32})
        env = {**os.environ, "RAY_ADDRESS": ""}
        if storage == "s3":
            s3 = stack.enter_context(s3_test_server())
            stack.enter_context(s3_env(s3))  # this process reads the ledger there too
            env = {**job_env(request.getfixturevalue("ray_local").get_runtime_context().gcs_address, s3.env), **s3.env}
            data["run_dir"] = s3.uri("killed-run")
        data["teacher"]["num_actors"] = 1
        data["teacher"]["concurrency_per_actor"] = 1  # one at a time: the kill lands midway
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(data))
        cmd = [sys.executable, "-m", "asclepius.cli", "run", "--config", str(tmp_path / "cfg.yaml"), "--stage", "notes", "--stage", "synthesize"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        run = RunDir.open(data["run_dir"])
        ledger = run.uri_of("ledger", "synthesize")
        deadline = time.time() + 240
        while len(scan_ledger(ledger).records) < 3:
            assert proc.poll() is None and time.time() < deadline, "the job ended before it could be killed"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver (and the Ray instance it started, if it started one)
        proc.wait()
        # Requests already on the wire may still land in the ledger while Ray tears the dead job's actors down:
        # wait until it stops changing, then take what is finished.
        done_before, stable_since = set(), time.time()
        while time.time() - stable_since < 3:
            now = set(scan_ledger(ledger).records)
            if now != done_before:
                done_before, stable_since = now, time.time()
            time.sleep(0.2)
        sent_before = len(server.stats()["requests"])
        assert 3 <= len(done_before) < 12

        rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        after = [r["key"] for r in server.stats()["requests"][sent_before:]]
        assert not set(after) & done_before
        synth = run.read_frame("synthetic_notes")
        assert len(synth) == 12 and synth.note_id.is_unique
        entry = run.stage_entry("synthesize")
        assert entry["teacher"]["from_ledger"] == len(done_before)


def test_changes_rerun_exactly_the_stages_they_affect(ray_local, tmp_path):
    import stat

    from asclepius.pipeline import pipeline_stages
    from asclepius.run import RunDir, StageInputError, stage_status
    from asclepius.train.ray_train import PRETRAIN_STAGE

    generating = ["notes", "synthesize", "split", "questions", "answers"]
    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.01, completion_tokens=30) as server:
        data = config(tmp_path, server, model={"base": "tiny"})
        cfg = config_from_dict(data)
        run_pipeline(cfg, stages=generating)
        run = RunDir.open(cfg.run_dir)
        # stand-in for a finished pretraining (GPU-hours): recorded complete against today's inputs
        run.record_stage("pretrain", {"status": "complete", "config_hash": PRETRAIN_STAGE.config_hash(cfg),
                                      "inputs": PRETRAIN_STAGE.inputs(cfg, run), "outputs": {}})  # fmt: skip
        assert stage_status(PRETRAIN_STAGE, cfg, run).up_to_date

        def reran(cfg):
            results = run_pipeline(cfg, stages=generating)
            return {name for name, e in results.items() if not e.get("skipped")}

        # a question temperature: questions and answers again; the split and pretraining stay as they are
        warmer = config_from_dict(data, ["questions.temperature=0.5"])
        assert reran(warmer) == {"questions", "answers"}
        assert stage_status(PRETRAIN_STAGE, warmer, run).up_to_date
        # a similarity threshold: the questions stage's pool journal is a new one (keyed by the stage hash)
        journals = lambda: {p.name for p in (tmp_path / "run" / "ledger" / "questions_pool").iterdir()}  # noqa: E731
        before = journals()
        stricter = config_from_dict(data, ["questions.temperature=0.5", "questions.similarity_threshold=0.5"])
        assert reran(stricter) == {"questions", "answers"} and len(journals() - before) == 1
        # the seed: the stages that draw from it; the split follows the new synthetic notes (it holds some of them out)
        reseeded = config_from_dict(data, ["questions.temperature=0.5", "questions.similarity_threshold=0.5", "seed=1"])
        stale = {st.name for st in (stage_status(s, reseeded, run) for s in pipeline_stages(reseeded)) if st.state == "stale"}
        assert stale == {"synthesize", "questions", "answers"}  # by their config; the rest follow the new outputs
        assert reran(reseeded) == {"synthesize", "split", "questions", "answers"}
        assert stage_status(PRETRAIN_STAGE, reseeded, run).reasons == ["upstream synthesize changed", "upstream split changed"]

        # a limit asks about the notes with the smallest ids, as when the stage sorted one whole table (it now reads
        # the notes a block at a time and writes its table in parts)
        limited = config_from_dict(data, ["questions.temperature=0.5", "questions.similarity_threshold=0.5", "seed=1", "questions.limit=4"])
        q = run_pipeline(limited, stages=generating)["questions"]
        notes = pd.concat([pd.read_parquet(published(tmp_path / "run", t)) for t in ("notes", "synthetic_notes")])
        held_out = set(pd.read_parquet(published(tmp_path / "run", "eval_notes")).note_id)
        candidates = sorted(set(notes[notes.source != "pmc"].note_id) - held_out)
        assert q["counts"]["not_selected_over_limit"] == len(candidates) - 4 and q["teacher"]["requests"] == 4
        table = pd.read_parquet(published(tmp_path / "run", "questions"))
        assert len(table) == q["counts"]["kept"] and set(table.note_id) <= set(candidates[:4])

        # files holding note text are owner-only
        for part in (tmp_path / "run" / "ledger" / "answers").glob("part-*.jsonl"):
            assert stat.S_IMODE(part.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "run" / "ledger").stat().st_mode) == 0o700
        for journal in (tmp_path / "run" / "ledger" / "questions_pool").rglob("journal.jsonl"):
            assert stat.S_IMODE(journal.stat().st_mode) == 0o600

        # a corrupt table stops the next stage, naming the file, instead of reading as "0 notes"
        notes_file = sorted(published(tmp_path / "run", "notes").glob("*.parquet"))[0]
        notes_file.write_bytes(notes_file.read_bytes()[:100])
        with pytest.raises(StageInputError, match=notes_file.name):
            run_pipeline(config_from_dict(data, ["split.eval_fraction=0.3"]), stages=["split"])


def test_credentialed_provenance_is_refused_for_public_openai(ray_local, tmp_path):
    from asclepius.teacher.client import PrivacyError

    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.01, completion_tokens=30) as server:
        # the hospital's own notes, named freely and flagged credentialed; case reports that are credentialed too
        data = config(tmp_path, server)
        data["notes"]["sources"] = [
            {"kind": "generic", "name": "icu_notes", "path": str(generic_notes(tmp_path / "icu.csv")), "text_column": "body",
             "id_column": "id", "credentialed": True},
            {"kind": "pmc", "path": "sample:pmc", "credentialed": True},
        ]  # fmt: skip
        public = {**data["teacher"], "provider": "openai", "api_key_env": "TEST_OPENAI_KEY"}
        os.environ["TEST_OPENAI_KEY"] = "sk-test"
        with pytest.raises(PrivacyError, match="credentialed provenance"):
            run_pipeline(config_from_dict({**data, "teacher": public}), stages=["notes", "synthesize"])
        # made by a self-hosted teacher, the synthetic notes keep their case reports' provenance ...
        run_pipeline(config_from_dict(data), stages=["notes", "synthesize", "split"])
        synth = pd.read_parquet(tmp_path / "run" / "synthetic_notes")
        assert len(synth) == 3 and synth.credentialed.all()
        # ... so neither they nor the icu notes may go to the public API in the next stage
        sent = len(server.stats()["requests"])
        with pytest.raises(PrivacyError, match="credentialed provenance"):
            run_pipeline(config_from_dict({**data, "teacher": public}), stages=["questions"])
        assert len(server.stats()["requests"]) == sent


def test_duplicate_generic_notes_are_sent_and_kept_once(ray_local, tmp_path):
    from asclepius.notes.stage import run_notes_stage
    from asclepius.run import RunDir

    for name in ("a.csv", "b.csv"):  # the same export twice, no id column: the text's hash is the id
        with open(tmp_path / name, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["body"], ["Pt w/ CHF, diuresed."], ["Pt w/ CHF, diuresed."], ["DKA resolved on insulin."]])
    cfg = config_from_dict({"run_dir": str(tmp_path / "run"), "notes": {"sources": [
        {"kind": "generic", "name": "clinic", "path": str(tmp_path / "*.csv"), "text_column": "body"}]}})  # fmt: skip
    entry = run_notes_stage(cfg, RunDir.open(cfg.run_dir))
    notes = pd.read_parquet(tmp_path / "run" / "notes")
    assert len(notes) == 2 and notes.note_id.is_unique
    assert entry["totals"]["read"] == 6 and entry["totals"]["dropped"]["duplicate"] == 4 and entry["totals"]["kept"] == 2
