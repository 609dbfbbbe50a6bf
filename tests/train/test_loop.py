"""The training loop alone (one process, DeepSpeed on CPU, no Ray): train mode, checkpointing, resume order, offload."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported in this process

import pytest  # noqa: E402
import torch  # noqa: E402

from asclepius.config import config_from_dict  # noqa: E402
from asclepius.models import load_model, load_tokenizer  # noqa: E402
from asclepius.recipe import load_recipe  # noqa: E402
from asclepius.train.data import collate, epoch_rows, instruction_example, packed_table  # noqa: E402
from asclepius.train.loop import TrainContext, train  # noqa: E402
from asclepius.train.settings import torch_extensions_dir  # noqa: E402

os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())


def hyperparams(**over):
    base = {"micro_batch": 1, "global_batch": 1, "lr": 1e-3, "warmup_ratio": 0.0, "max_len": 512, "epochs": 10, "zero_stage": 2,
            "gradient_checkpointing": False, "lr_scheduler": "constant", **over}  # fmt: skip
    return config_from_dict({"run_dir": "/tmp/x", "notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]}, "finetune": base}).finetune


@pytest.fixture(scope="module")
def rows():
    tok = load_tokenizer("tiny")
    qa = [("Pt w/ CHF, EF 35%.", "What is the EF?", "35%."), ("DKA, glucose 542.", "Glucose?", "542."),
          ("CABG x3 c/b AF.", "Arrhythmia?", "AF."), ("Lap chole.", "Surgery?", "Cholecystectomy.")]  # fmt: skip
    examples = [instruction_example(tok, load_recipe().model_prompt, n, q, a, 512) for n, q, a in qa]
    return packed_table(examples, 512, tok.eos_token_id).to_pylist() * 2  # 8 blocks


def recording_batches(rows, log, seed=0):
    def batches(epoch, first):
        order = epoch_rows(len(rows), seed, epoch, 0, 1, 4)  # 4 micro-batches per epoch
        for k in range(first, 4):
            log.append((epoch, k, int(order[k])))
            yield collate([rows[order[k]]])

    return batches


def test_training_runs_in_train_mode_and_checkpointing_recomputes(rows):
    model = load_model("tiny")
    calls, modes = [], []
    def hook(module, inputs, output):  # returns None: the output is left as it is
        calls.append(1)
        modes.append(module.training)

    model.model.layers[0].self_attn.register_forward_hook(hook)  # the recompute calls the layer's inner modules again
    log = []
    train(model, recording_batches(rows, log), 4, hyperparams(gradient_checkpointing=True), "finetune", TrainContext(), max_steps=2)
    assert all(modes) and len(modes) > 0  # dropout on; transformers checkpoints only in training mode
    assert len(calls) == 2 * len(log)  # every layer's forward runs again in the backward pass: checkpointing is real
    # DeepSpeed's CPU shared-memory all-reduce (inference-only) was neither built nor used by the training
    from deepspeed.comm import comm

    assert comm.cdb is not None and comm.cdb.shm_comm_op is None


def test_resume_in_a_later_epoch_trains_exactly_what_was_left(rows, tmp_path):
    uninterrupted = []
    train(load_model("tiny"), recording_batches(rows, uninterrupted), 4, hyperparams(), "finetune", TrainContext(), max_steps=10)
    assert [(e, k) for e, k, _ in uninterrupted] == [(0, k) for k in range(4)] + [(1, k) for k in range(4)] + [(2, 0), (2, 1)]
    assert [b for e, _, b in uninterrupted if e == 0] != [b for e, _, b in uninterrupted if e == 1]  # reshuffled each epoch

    before, after = [], []
    ctx = lambda: TrainContext(checkpoint_root=str(tmp_path / "ckpt"))  # noqa: E731
    train(load_model("tiny"), recording_batches(rows, before), 4, hyperparams(), "finetune", ctx(), max_steps=6, checkpoint_every=6)
    result = train(load_model("tiny"), recording_batches(rows, after), 4, hyperparams(), "finetune", ctx(), max_steps=10)
    assert result.resumed_from == 6 and result.final_step == 10
    assert before + after == uninterrupted  # killed at step 6 of 4-step epochs: nothing skipped, nothing repeated


def test_cpu_adam_is_built_at_install_into_this_environments_folder(monkeypatch):
    """`make install` compiles DeepSpeed's CPU Adam (asclepius.train.prebuild), so no training process spends ~100 s
    building it; the folder is this environment's, so another checkout's build never replaces it."""
    from pathlib import Path

    built = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "cpu_adam" / "cpu_adam.so"
    assert built.is_file(), f"{built} is missing: `make install` builds it (python -m asclepius.train.prebuild)"
    here = torch_extensions_dir()
    monkeypatch.setattr("sys.prefix", "/elsewhere/.venv")
    assert torch_extensions_dir() != here and torch_extensions_dir().startswith(os.path.dirname(here) + os.sep)


def test_offloaded_optimizer_is_deepspeeds_cpu_adam(rows):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    model = load_model("tiny")
    ctx = TrainContext()
    seen = []
    import deepspeed

    original = deepspeed.initialize

    def spy(**kwargs):
        seen.append(type(kwargs["optimizer"]))
        return original(**kwargs)

    deepspeed.initialize = spy
    try:
        result = train(model, recording_batches(rows, []), 4, hyperparams(offload_optimizer=True), "finetune", ctx, max_steps=3)
    finally:
        deepspeed.initialize = original
    assert seen == [DeepSpeedCPUAdam] and result.final_step == 3
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)


def test_a_resume_from_a_checkpoint_missing_a_shard_stops_naming_it(rows, tmp_path):
    """DeepSpeed only warns when a shard is gone and would train on with a fresh optimizer (or base weights): the
    loop refuses, naming the file, and a whole checkpoint still resumes."""
    from asclepius.train.loop import CheckpointIncomplete, missing_checkpoint_files

    root = tmp_path / "ckpt"
    ctx = lambda: TrainContext(checkpoint_root=str(root))  # noqa: E731
    train(load_model("tiny"), recording_batches(rows, []), 4, hyperparams(), "finetune", ctx(), max_steps=2, checkpoint_every=2)
    (saved,) = [root / d for d in os.listdir(root)]
    assert missing_checkpoint_files(str(saved), 1, 2) == []
    assert missing_checkpoint_files(str(saved), 2, 2) == ["state/zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # a second rank's
    assert missing_checkpoint_files(str(saved), 1, 3)[0] == "state/zero_pp_rank_0_mp_rank_00_model_states.pt"
    shard = saved / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    kept = shard.read_bytes()
    shard.unlink()
    with pytest.raises(CheckpointIncomplete, match="lacks state/zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        train(load_model("tiny"), recording_batches(rows, []), 4, hyperparams(), "finetune", ctx(), max_steps=4)
    shard.write_bytes(kept)
    (saved / "asclepius_state.json").write_text('{"step": 2, "epoch": 0, "world_size": 4}')
    with pytest.raises(CheckpointIncomplete, match="written by 4 workers and this run has 1"):
        train(load_model("tiny"), recording_batches(rows, []), 4, hyperparams(), "finetune", ctx(), max_steps=4)
    (saved / "asclepius_state.json").write_text('{"step": 2, "epoch": 0, "world_size": 1}')
    assert train(load_model("tiny"), recording_batches(rows, []), 4, hyperparams(), "finetune", ctx(), max_steps=4).resumed_from == 2


def test_nothing_is_saved_when_nothing_keeps_it(rows, monkeypatch):
    import deepspeed

    saves = []
    original = deepspeed.DeepSpeedEngine.save_checkpoint
    monkeypatch.setattr(deepspeed.DeepSpeedEngine, "save_checkpoint", lambda self, *a, **k: saves.append(a) or original(self, *a, **k))
    train(load_model("tiny"), recording_batches(rows, []), 4, hyperparams(), "finetune", TrainContext(), max_steps=3, checkpoint_every=1)
    assert saves == []  # a benchmark's context has no root: no ZeRO state written to /tmp at every step


def test_under_ray_train_only_checkpoints_are_reported_to_ray_train(rows, monkeypatch):
    """Ray Train's controller takes one report per worker per health check (2 s): a report every step queued in the
    upload thread whenever steps were shorter, delaying every checkpoint's commit and the run's end by 2 s a step.
    Every step still reaches rank 0's metrics log (the loss curve, the dashboard)."""
    import ray.train

    from asclepius.train.ray_context import RayTrainContext

    reported, logged = [], []

    class MetricsLog:
        def append(self, metrics, force_upload=False):
            logged.append((metrics["step"], force_upload))

    def report(metrics, checkpoint=None, checkpoint_dir_name=None, checkpoint_upload_mode=None):
        assert checkpoint is not None and os.path.isdir(checkpoint.path) and checkpoint_upload_mode.name == "ASYNC"
        reported.append((metrics["step"], checkpoint_dir_name))

    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    ctx = RayTrainContext(metrics_log=MetricsLog(), section="finetune")
    result = train(load_model("tiny"), recording_batches(rows, []), 4, hyperparams(), "finetune", ctx, max_steps=5, checkpoint_every=2)
    assert result.final_step == 5 and [h["step"] for h in result.history] == [1, 2, 3, 4, 5]
    assert reported == [(2, "step-000002"), (4, "step-000004"), (5, "step-000005")]  # the checkpoints, and the last step's
    assert logged == [(1, False), (2, True), (3, False), (4, True), (5, True)]


def test_checkpoint_folders_of_dead_workers_are_removed_and_no_others(tmp_path, monkeypatch):
    """A worker killed between saving a checkpoint and its upload leaves the local copy (a 7B ZeRO state: ~94 GB on a
    node); the next worker to start on the node deletes it, and never a live process's or a folder not ours."""
    import subprocess
    import sys
    import tempfile

    from asclepius.train.loop import checkpoint_scratch_dir, remove_orphaned_checkpoint_scratch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine = checkpoint_scratch_dir()
    assert os.path.basename(mine).startswith(f"asclepius-ckpt-{os.getpid()}-")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    dead = tmp_path / f"asclepius-ckpt-{gone}-abc123"
    (dead / "state").mkdir(parents=True)
    (dead / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x" * 1000)
    others = [tmp_path / "asclepius-ckpt-notapid", tmp_path / "someone-else-1"]
    for path in others:
        path.mkdir()
    assert remove_orphaned_checkpoint_scratch() == [str(dead)]
    assert not dead.exists() and os.path.isdir(mine) and all(p.exists() for p in others)
