"""The evaluate stage end to end on Ray, against the OpenAI-compatible test server acting as candidates and judge."""

import json
from collections import Counter

import pandas as pd
import pytest

from asclepius.config import config_from_dict
from asclepius.evaluate.stage import STAGE as EVALUATE
from asclepius.pipeline import run_pipeline
from asclepius.run import RunDir, run_stage
from asclepius.teacher.client import PrivacyError
from asclepius.testing.server_process import openai_test_server
from asclepius.testing import published

pytestmark = pytest.mark.ray


def endpoint(server, model, **extra):
    return {"provider": "openai_compatible", "base_url": server.base_url, "model": model, "requests_per_minute": 100000,
            "tokens_per_minute": 10**9, "num_actors": 1, "concurrency_per_actor": 8, "max_attempts": 2, "backoff_base_s": 0.01,
            "timeout_s": 30, "api_key_env": None, **extra}  # fmt: skip


def dataset(path):
    rows = [
        {"note": "Pt w/ CHF, EF 35%, on lasix.", "question": "What is the EF?", "task": "Question Answering"},
        {"note": "DKA, glucose 542, insulin gtt.", "question": "Summarize the course.", "task": "Summarization"},
        {"note": "CABG x3 c/b AF. [[fault:answer_500]]", "question": "Which arrhythmia?", "task": "Question Answering"},
        {"note": "Lap chole, uneventful. [[fault:judge_garbage_once]]", "question": "What surgery?", "task": "Summarization"},
        {"note": "Sepsis from UTI. [[fault:judge_garbage]]", "question": "What was the source?", "task": "Question Answering"},
        {"note": "Pneumonia on CTX/azithro.", "question": "", "task": "Question Answering"},  # no question: dropped
    ]
    for r in rows:  # answers produced elsewhere, in the recipe's <model>_answer columns
        r["goodbot_answer"], r["badbot_answer"] = "GOOD and complete.", "BAD, wrong drug."
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def config(tmp_path, server, **evaluate):
    return config_from_dict({
        "run_dir": str(tmp_path / "run"), "notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]},
        "evaluate": {
            "dataset": {"path": str(dataset(tmp_path / "eval.jsonl"))},
            "candidates": [
                {"name": "goodbot", "column": "goodbot"}, {"name": "badbot", "column": "badbot"},
                {"name": "chatbot", "endpoint": endpoint(server, "chat-model", limiter_name=f"c-{tmp_path.name}"), "max_tokens": 20},
                {"name": "answerbot", "endpoint": endpoint(server, "served-model", limiter_name=f"a-{tmp_path.name}"), "api": "answer",
                 "max_tokens": 20},
            ],
            "judge": {"endpoint": endpoint(server, "judge-model", limiter_name=f"j-{tmp_path.name}"), "max_tokens": 32},
            "bootstrap_samples": 200, **evaluate,
        },
    })  # fmt: skip


def test_evaluate_scores_reasks_and_reports(ray_local, tmp_path):
    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.01, completion_tokens=12) as server:
        cfg = config(tmp_path, server)
        run = RunDir.open(cfg.run_dir)
        entry = run_stage(EVALUATE, cfg, run)
        models = entry["models"]
        # answers with GOOD score 4 and BAD 1 in every order: the judge's scores went back to the right model
        assert models["goodbot"]["mean"] == 4.0 and models["badbot"]["mean"] == 1.0
        assert models["chatbot"]["mean"] == 2.0 and models["answerbot"]["mean"] == 2.0
        # an endpoint error: a missing answer for that model, never judged, never scored
        assert models["chatbot"]["missing_answers"] == 1 and models["answerbot"]["missing_answers"] == 1
        assert models["goodbot"]["missing_answers"] == 0
        # re-asked once per order and then scored; always-unreadable: unscored twice (both orders), out of the means
        assert entry["counts"]["reasked"] == 2 + 2 * cfg.evaluate.judge.max_reasks
        assert entry["counts"]["unscored"] == 2 and models["goodbot"]["scored_items"] == 4 and entry["items"] == 5
        assert entry["position_bias"]["share"] == 0.0

        scores = pd.read_parquet(published(tmp_path / "run", "eval", "scores.parquet"))
        assert set(scores.columns) >= {"item_id", "task", "model", "order", "score", "judge_request_key"}
        judged = scores[scores.order.isin(["forward", "reversed"])]
        assert (judged.groupby(["item_id", "order"]).agent.apply(lambda a: sorted(a) == list("ABCD"[: len(a)]))).all()
        assert (scores[scores.order == "no answer"].model.value_counts().to_dict()) == {"chatbot": 1, "answerbot": 1}
        report = published(tmp_path / "run", "eval", "report.md").read_text()
        assert "| goodbot | 4.00 | [4.00, 4.00] | 4 / 5 |" in report and "| badbot | 1.00 |" in report
        assert "judge-model" in report and "not a GPT-4-class model" in report
        for png in ("per_task.png", "scores.png"):
            assert published(tmp_path / "run", "eval", png).stat().st_size > 5000
        summary = json.loads(published(tmp_path / "run", "eval", "summary.json").read_text())
        assert summary["models"]["goodbot"]["mean"] == 4.0 and summary["decontamination"]["clean"]
        # the answers' API: chat for chatbot, /v1/answer for answerbot (the recipe's prompt applied by the server)
        paths = {r["model"]: r["path"] for r in server.stats()["requests"]}
        assert paths["chat-model"] == "/v1/chat/completions" and paths["served-model"] == "/v1/answer"

        # a rerun (here --force; after a kill -9 the same) pays for nothing twice: finished requests come from the
        # ledger; only the two answers that failed with a retryable 500 are tried again
        before = server.stats()["requests"]
        tries = Counter(r["key"] for r in before)  # a request that failed with a 500 was tried max_attempts (2) times
        again = run_stage(EVALUATE, cfg, run, force=True)
        resent = {r["key"] for r in server.stats()["requests"][len(before):]}
        assert len(resent) == 2 and all(tries[k] == 2 for k in resent)
        assert again["models"] == entry["models"]


def test_credentialed_items_never_reach_a_public_judge(ray_local, tmp_path):
    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.01) as server:
        cfg = config(tmp_path, server, judge={"endpoint": {**endpoint(server, "gpt-4o"), "provider": "openai", "api_key_env": "T_KEY"}},
                     candidates=[{"name": "goodbot", "column": "goodbot"}])  # fmt: skip
        import os

        os.environ["T_KEY"] = "sk-test"
        with pytest.raises(PrivacyError):  # a user's file is credentialed unless they say it is not
            run_pipeline(cfg, stages=["evaluate"])
        assert not [r for r in server.stats()["requests"] if r["model"] == "gpt-4o"]


def test_default_evaluation_set_is_the_held_out_notes(ray_local, tmp_path):
    """The pipeline on the demo's sizes: held-out notes get a question each through the teacher, then two candidates
    (the teacher, and a model reached through /v1/answer) are judged by the teacher."""
    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.01, completion_tokens=16) as server:
        teacher = endpoint(server, "teacher-model", limiter_name=f"t-{tmp_path.name}")
        cfg = config_from_dict({
            "run_dir": str(tmp_path / "run"),
            "notes": {"sources": [{"kind": "mimic3", "path": "sample:mimic3"}, {"kind": "mimic4", "path": "sample:mimic4"},
                                  {"kind": "pmc", "path": "sample:pmc"}]},
            "teacher": teacher, "split": {"eval_fraction": 0.1}, "synthesize": {"limit": 4, "max_tokens_cap": 32},
            "questions": {"max_tokens": 24}, "answers": {"max_tokens": 24},
            "evaluate": {"candidates": [{"name": "teacher", "teacher": True, "generation": "greedy", "max_tokens": 16},
                                       {"name": "served", "endpoint": endpoint(server, "ft", limiter_name=f"f-{tmp_path.name}"),
                                        "api": "answer", "max_tokens": 16}],
                         "judge": {"max_tokens": 16}, "bootstrap_samples": 200},
        })  # fmt: skip
        results = run_pipeline(cfg)
        assert list(results) == ["notes", "synthesize", "split", "questions", "answers", "eval_questions", "evaluate"]
        held_out = pd.read_parquet(tmp_path / "run" / "eval_notes")
        questions = pd.read_parquet(tmp_path / "run" / "eval_questions")
        assert set(questions.note_id) == set(held_out.note_id) and len(questions) >= 2
        assert set(questions.task) <= {t.task for t in cfg.questions.tasks}
        ev = results["evaluate"]
        assert ev["items"] == len(questions) and ev["models"]["teacher"]["scored_items"] == len(questions)
        assert ev["decontamination"]["clean"] and ev["judge"] == "teacher-model"
        instructions = pd.read_parquet(tmp_path / "run" / "instructions")
        assert not set(instructions.note_id) & set(questions.note_id)
        # the questions went through the teacher and its ledger, like every other request
        assert (tmp_path / "run" / "ledger" / "eval_questions").is_dir()
