"""Recipe-style training tests on the tiny model: 2 CPU workers, DeepSpeed ZeRO-2 and ZeRO-3, export, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import ray
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from asclepius.config import config_from_dict
from asclepius.run import RunDir, run_stage
from asclepius.train.ray_train import FINETUNE_STAGE, PRETRAIN_STAGE
from asclepius.testing import job_env, published

pytestmark = pytest.mark.ray

QA = [
    ("Pt w/ CHF, EF 35%, d/c on lasix 40 mg daily.", "What is the EF?", "The ejection fraction is 35%."),
    ("Pt s/p CABG x3 c/b AF, on amiodarone.", "Which arrhythmia occurred?", "Atrial fibrillation after surgery."),
    ("DKA w/ glucose 542, AG closed on insulin gtt.", "What was the glucose?", "The glucose was 542."),
    ("Lap chole for acute cholecystitis, no complications.", "What surgery was done?", "A laparoscopic cholecystectomy."),
]


def make_run(tmp_path, base="tiny", **train):
    hp = {"num_workers": 2, "micro_batch": 1, "global_batch": 2, "lr": 3e-3, "warmup_ratio": 0.0, "max_len": 256,
          "epochs": 50, "gradient_checkpointing": False, "lr_scheduler": "constant", "num_to_keep": 2}  # fmt: skip
    data = {"run_dir": str(tmp_path / "run"), "notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]},
            "model": {"base": base}, "pretrain": {**hp, **train}, "finetune": {**hp, **train}}  # fmt: skip
    cfg = config_from_dict(data)
    run = RunDir.open(cfg.run_dir)
    (tmp_path / "run" / "instructions").mkdir(parents=True)
    rows = [{"note": n, "question": q, "answer": a, "task": "Question Answering", "note_id": f"n{i}", "source": "test"} for i, (n, q, a) in enumerate(QA)]
    pd.DataFrame(rows * 4).to_parquet(tmp_path / "run" / "instructions" / "instructions.parquet")
    notes = pd.DataFrame({"note_id": [f"m{i}" for i in range(40)], "source": "mimic3", "text": [QA[i % 4][0] * 6 for i in range(40)]})
    (tmp_path / "run" / "notes").mkdir()
    notes.to_parquet(tmp_path / "run" / "notes" / "n.parquet")
    run.record_stage("split", {"status": "complete"})  # nothing held out in these tests
    return data, cfg, run


def loads_and_generates(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    out = model.generate(torch.tensor([[tok.bos_token_id] + tok("Pt w/", add_special_tokens=False)["input_ids"]]), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 3
    return model


def test_finetune_zero2_two_workers_loss_goes_down_and_exports_then_a_changed_config_or_force_trains_again(ray_local, tmp_path):
    """One finished run serves both halves (each Ray Train fit costs ~20 s of starting processes here): the first
    fit's loss, metrics and export; then what a changed config and --force do to that finished run."""
    data, cfg, run = make_run(tmp_path, zero_stage=2, max_steps=12)
    entry = run_stage(FINETUNE_STAGE, cfg, run)
    assert entry["final_step"] == 12 and entry["workers"] == 2 and entry["accumulation"] == 1
    assert entry["final_loss"] < 0.7 * entry["first_loss"]
    assert entry["data"]["padding_fraction"] < 0.5 and entry["mfu"] == "n/a"
    history = [json.loads(line) for line in open(published(tmp_path / "run", "checkpoints/finetune", "metrics.jsonl"))]
    assert [h["step"] for h in history] == list(range(1, 13)) and all(h["tokens_per_s"] > 0 for h in history)
    assert os.path.getsize(published(tmp_path / "run", "checkpoints/finetune", "loss.png")) > 1000
    model = loads_and_generates(published(tmp_path / "run", "checkpoints/finetune", "final"))
    assert os.path.exists(published(tmp_path / "run", "checkpoints/finetune", "final", "model.safetensors"))
    assert sum(p.numel() for p in model.parameters()) > 0

    # a new lr must not restore the old final checkpoint (step 12 of 12) and train nothing
    changed = config_from_dict(data, ["finetune.lr=1e-3"])
    second = run_stage(FINETUNE_STAGE, changed, run)
    assert (second["final_step"], second["resumed_from"]) == (12, 0) and second["ray_train_run"] != entry["ray_train_run"]
    history = [json.loads(line) for line in open(published(tmp_path / "run", "checkpoints/finetune", "metrics.jsonl"))]
    assert [h["step"] for h in history] == list(range(1, 13)) and all(h["lr"] == 1e-3 for h in history)  # no mix of the two runs
    assert run_stage(FINETUNE_STAGE, changed, run)["skipped"]
    forced = run_stage(FINETUNE_STAGE, changed, run, force=True)
    assert (forced["final_step"], forced["resumed_from"]) == (12, 0)


def test_pretrain_zero3_two_workers(ray_local, tmp_path):
    _, cfg, run = make_run(tmp_path, zero_stage=3, max_steps=6, max_len=64)
    entry = run_stage(PRETRAIN_STAGE, cfg, run)
    assert entry["final_step"] == 6 and entry["zero_stage"] == 3 and entry["data"]["blocks"] >= 12
    assert entry["final_loss"] < entry["first_loss"]
    loads_and_generates(published(tmp_path / "run", "checkpoints/pretrain", "final"))  # ZeRO-3 shards gathered for export


LORA_RUN = {"base": "tiny-qwen2", "zero_stage": 3, "max_steps": 8, "lr": 1e-2, "method": "lora",
            "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}}  # fmt: skip


def losses_of(run_dir):
    return {h["step"]: h["loss"] for h in map(json.loads, open(published(run_dir, "checkpoints/finetune", "metrics.jsonl")))}


def test_lora_finetune_of_a_current_family_on_two_zero3_workers(ray_local, tmp_path):
    """Qwen2-shaped, its fast tokenizer (no bos), a LoRA adapter over ZeRO-3 shards: the adapter alone is checkpointed
    and trains; the export is the merged model, served like any other. Then the same run with a training worker
    killed after its first checkpoint: Ray Train restarts the workers from it, and the adapter's training goes on
    exactly as it would have (the same loss at every step)."""
    from asclepius.models import load_model, load_tokenizer

    _, cfg, run = make_run(tmp_path, checkpoint_every_steps=8, **LORA_RUN)
    entry = run_stage(FINETUNE_STAGE, cfg, run)
    assert entry["final_step"] == 8 and entry["zero_stage"] == 3 and entry["final_loss"] < entry["first_loss"] - 0.2
    checkpoint = [p for p in (tmp_path / "run" / "ray_train").rglob("*.pt") if "step-000008" in str(p)]
    assert checkpoint, "no checkpoint written"
    for path in checkpoint:  # the module state names the adapter (and the head tied to the frozen embeddings) alone
        module = torch.load(path, map_location="cpu", weights_only=False).get("module") or {}
        assert all("lora_" in k or k.endswith("lm_head.weight") for k in module), sorted(module)[:4]
    full_model_states = sum(p.numel() for p in load_model("tiny-qwen2").parameters()) * 12  # fp32 master + Adam, every parameter
    assert sum(p.stat().st_size for p in checkpoint) < 0.25 * full_model_states  # the optimizer's states cover the adapter
    final = str(published(tmp_path / "run", "checkpoints/finetune", "final"))
    assert os.path.exists(os.path.join(final, "config.json")) and not os.path.exists(os.path.join(final, "adapter_config.json"))
    model, tok = load_model(final), load_tokenizer(final)
    assert tok.is_fast and tok.bos_token_id is None and type(model).__name__ == "Qwen2ForCausalLM"
    assert not any("lora" in k for k in model.state_dict())
    uninterrupted = losses_of(tmp_path / "run")

    import threading

    import psutil

    killed_dir = tmp_path / "killed"
    killed_dir.mkdir()
    _, cfg, run = make_run(killed_dir, checkpoint_every_steps=2, **LORA_RUN)
    result = {}
    thread = threading.Thread(target=lambda: result.update(run_stage(FINETUNE_STAGE, cfg, run)), daemon=True)
    thread.start()
    storage, deadline = killed_dir / "run" / "ray_train", time.time() + 300
    while not (storage.exists() and list(storage.rglob("checkpoint_manager_snapshot.json"))):  # a checkpoint is committed
        assert thread.is_alive() and time.time() < deadline, "training ended before a worker could be killed"
        time.sleep(0.1)
    # Ray names an actor's process after its class (ray::RayTrainWorker...); only this session's Ray instance's (its
    # raylet starts them), not another test run's or a cluster's on the same machine
    from ray._private import ray_constants

    raylet = ray._private.worker._global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid

    def cmdline(process):
        try:
            return " ".join(process.cmdline())[:200]
        except psutil.NoSuchProcess:  # an idle worker that exited meanwhile
            return ""

    workers = [p for p in psutil.Process(raylet).children() if "TrainWorker" in cmdline(p)]
    assert len(workers) == 2, [cmdline(p)[:80] for p in workers]
    os.kill(workers[1].pid, signal.SIGKILL)  # one worker dies; the driver, the controller and the other worker live on
    thread.join(timeout=400)
    assert not thread.is_alive() and result["final_step"] == 8 and result["resumed_from"] >= 2, result
    resumed = losses_of(killed_dir / "run")
    assert sorted(resumed) == list(range(1, 9))
    assert [resumed[s] for s in range(1, 9)] == pytest.approx([uninterrupted[s] for s in range(1, 9)], rel=1e-4)


def test_kill_after_a_checkpoint_then_resume_to_the_same_final_step(ray_local, tmp_path):
    """kill -9 of a finetuning job on a running cluster (this session's instance) after its first checkpoint; the
    same job again resumes from it."""
    data, _, _ = make_run(tmp_path, zero_stage=2, max_steps=10, checkpoint_every_steps=2)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "asclepius.cli", "run", "--config", str(tmp_path / "cfg.yaml"), "--stage", "finetune"]
    env = job_env(ray_local.get_runtime_context().gcs_address)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    storage = tmp_path / "run" / "ray_train"  # one Ray Train run per attempt: finetune-<attempt>
    deadline = time.time() + 400
    # Ray Train commits a checkpoint by writing its checkpoint-manager snapshot: kill right after the first one
    while not (storage.exists() and list(storage.rglob("checkpoint_manager_snapshot.json"))):
        assert proc.poll() is None and time.time() < deadline, "training ended before a checkpoint could be cut short"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    entry = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["finetune"]
    assert entry["final_step"] == 10 and entry["resumed_from"] >= 2
