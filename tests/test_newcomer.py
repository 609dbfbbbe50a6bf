"""A first run a newcomer can read: the quiet console, `status`, `estimate`, `ask`."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from asclepius.cli import main
from asclepius.testing.server_process import openai_test_server

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["notes", "synthesize", "split", "questions", "answers", "eval_questions", "evaluate"]


def demo_like(tmp_path, server):
    """The demo's data and stages up to evaluation, with the test server as teacher and judge (fast)."""
    teacher = {"provider": "openai_compatible", "base_url": server.base_url, "model": "test-teacher", "requests_per_minute": 100000,
               "tokens_per_minute": 10**9, "num_actors": 1, "max_attempts": 2, "timeout_s": 30, "progress_every_s": 0.2}  # fmt: skip
    return {
        "run_dir": str(tmp_path / "run"), "ray": {"num_cpus": 2},
        "notes": {"sources": [{"kind": "mimic3", "path": "sample:mimic3"}, {"kind": "mimic4", "path": "sample:mimic4"},
                              {"kind": "pmc", "path": "sample:pmc"}]},
        "teacher": teacher, "split": {"eval_fraction": 0.1}, "synthesize": {"limit": 4, "max_tokens_cap": 32},
        "questions": {"max_tokens": 24}, "answers": {"max_tokens": 24},
        "evaluate": {"candidates": [{"name": "teacher", "teacher": True, "max_tokens": 16}], "judge": {"max_tokens": 16}, "bootstrap_samples": 200},
    }  # fmt: skip


def run_cli(args, cwd, timeout=600, ray_address=""):
    """The CLI in its own process: with its own Ray instance, as a newcomer runs it, or on a running one."""
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "asclepius.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_the_console_is_quiet_and_every_stage_shows(tmp_path, ray_local):
    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.3, completion_tokens=12) as server:
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(demo_like(tmp_path, server)))
        quiet = run_cli(["run", "--config", str(tmp_path / "cfg.yaml")], tmp_path)
        assert quiet.returncode == 0, quiet.stderr[-3000:]
        lines = (quiet.stdout + quiet.stderr).strip().splitlines()
        # progress lines come every progress_every_s (0.2 s here), so their number follows the machine's speed
        progress = [line for line in lines if re.match(r"teacher \S+: \d+/\d+ rows done", line)]
        assert len(lines) - len(progress) <= 40, "\n".join(lines)
        text = "\n".join(lines)
        for stage in STAGES:
            assert any(line.startswith(f"{stage}:") for line in lines), stage  # every stage's summary
        for internal in ("streaming_executor", "core_worker", "Started a local Ray instance", "INFO", "(raylet)", "Deleting app"):
            assert internal not in text, internal
        assert "rows done" in text  # a teacher progress line (a non-terminal gets lines, not a bar)
        assert f"logs: {tmp_path / 'run' / 'logs' / 'asclepius.log'}" in text
        log = (tmp_path / "run" / "logs" / "asclepius.log").read_text()
        assert "Started a local Ray instance" in log or "streaming_executor" in log or "teacher synthesize" in log  # the full log
        # --verbose: Ray's own lines come back (on a running instance, the session's: the quiet run above started its own)
        verbose = run_cli(["run", "--config", str(tmp_path / "cfg.yaml"), "--force", "--stage", "notes", "--verbose"], tmp_path,
                          ray_address=ray_local.get_runtime_context().gcs_address)  # fmt: skip
        assert verbose.returncode == 0 and ("INFO" in verbose.stderr)


def test_status_on_a_finished_and_a_half_finished_run(tmp_path, capsys, ray_local):
    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.01, completion_tokens=12) as server:
        data = demo_like(tmp_path, server)
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(data))
        half = ["run", "--config", str(tmp_path / "cfg.yaml"), "--stage", "notes", "--stage", "synthesize"]
        assert run_cli(half, tmp_path, ray_address=ray_local.get_runtime_context().gcs_address).returncode == 0  # the run status reads
        assert main(["status", str(tmp_path / "run"), "--config", str(tmp_path / "cfg.yaml"), "--json"]) == 0
        rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
        assert rows["notes"]["state"] == "complete" and rows["notes"]["rows_in"] == "27" and rows["notes"]["rows_out"] == "20"
        assert rows["questions"]["state"] == "never run" and rows["evaluate"]["state"] == "never run"
        assert main(["status", str(tmp_path / "run"), "--config", str(tmp_path / "cfg.yaml"), "questions.temperature=0.1",
                     "synthesize.limit=3"]) == 0  # fmt: skip
        table = capsys.readouterr().out
        assert "synthesize      stale" in table and "config changed (synthesize)" in table
        # without a config: what the manifest recorded
        assert main(["status", str(tmp_path / "run")]) == 0
        assert "synthesize      complete" in capsys.readouterr().out
        # a stage cut off: recorded running, shown so
        manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
        manifest["stages"]["split"] = {"status": "running", "attempt": "x"}
        (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest))
        assert main(["status", str(tmp_path / "run"), "--config", str(tmp_path / "cfg.yaml")]) == 0
        assert "split           running" in capsys.readouterr().out
        assert main(["status", str(tmp_path / "nothing")]) == 2


def test_estimate_against_figures_worked_out_by_hand(tmp_path, capsys):
    notes = ["A" * 400, "B" * 800, "C" * 1200]  # 100, 200 and 300 tokens by the UTF-8 bytes / 4 count
    with open(tmp_path / "n.csv", "w", encoding="utf-8") as f:
        f.write("id,body\n" + "".join(f"n{i},{t}\n" for i, t in enumerate(notes)))
    cfg = {"run_dir": str(tmp_path / "run"), "notes": {"sources": [{"kind": "generic", "path": str(tmp_path / "n.csv"), "text_column": "body", "id_column": "id"}]},
           "teacher": {"provider": "openai_compatible", "base_url": "http://h/v1", "model": "priced", "token_counter": "bytes",
                       "prices": {"priced": {"prompt_per_1m": 1000.0, "completion_per_1m": 2000.0}}, "requests_per_minute": 60, "tokens_per_minute": 6000},
           "split": {"eval_fraction": 0.0}, "answers": {"max_tokens": 50}, "questions": {"max_tokens": 20}}  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["estimate", "--config", str(tmp_path / "cfg.yaml"), "--json"]) == 0
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    from asclepius.config import load_config

    c = load_config(tmp_path / "cfg.yaml")
    base = math.ceil(len(c.answers.prompt.format(note="", question="").encode()) / 4)
    expected_prompt = sum(base + n + 20 + 6 for n in (100, 200, 300))  # prompt + note + the question (max 20) + chat overhead
    answers = rows["answers"]
    assert (answers["requests"], answers["prompt_tokens"], answers["completion_tokens"]) == (3, expected_prompt, 150)
    assert answers["usd_online"] == pytest.approx((expected_prompt * 1000 + 150 * 2000) / 1e6, abs=1e-4)
    assert answers["usd_batch"] is None  # a self-hosted endpoint has no Batch API
    assert answers["minutes_at_quota"] == pytest.approx(round(max(3 / 60, (expected_prompt + 150) / 6000), 1))
    assert rows["synthesize"]["requests"] == 0  # no case reports among these notes
    # a preset's data elsewhere: assumed notes, OpenAI prices, batch at half
    assert main(["estimate", "--config", str(ROOT / "configs/demo.yaml"), "--assume-notes", "1000", "--json", "teacher.provider=openai",
                 "teacher.model=gpt-4o-mini", "teacher_from_serve=null", "serve=null", "evaluate=null"]) == 0  # fmt: skip
    priced = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    assert 850 < priced["questions"]["requests"] < 950 and priced["questions"]["usd_batch"] == pytest.approx(priced["questions"]["usd_online"] / 2, abs=1e-3)


def test_ask_a_served_model(tmp_path, capsys):
    (tmp_path / "note.txt").write_text("Pt w/ CHF, EF 35%. D/c on lasix 40 mg daily.")
    with openai_test_server(rpm=100000, tpm=10**9, latency_s=0.01) as server:
        assert main(["ask", "--url", server.base_url, "--note", str(tmp_path / "note.txt"), "--question", "What is the EF?"]) == 0
        out = capsys.readouterr()
        assert out.out.startswith("Answer ") and "prompt +" in out.err
        assert [r["path"] for r in server.stats()["requests"]] == ["/v1/answer"]
    assert main(["ask", "--url", "http://127.0.0.1:9", "--note", str(tmp_path / "note.txt"), "--question", "q"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("run", "status", "estimate", "ask", "config", "serve"):
        assert command in out
