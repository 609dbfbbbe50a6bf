"""Ray Train wiring: datasets of blocks, TorchTrainer + DeepSpeed workers, checkpoints, resume, HF export.

    stage "pretrain":  notes (+ synthetic notes, minus held-out eval notes) → <run>/checkpoints/pretrain/final
    stage "finetune":  instructions → <run>/checkpoints/finetune/final (from the pretrained model if there is one)

Every rank saves its DeepSpeed shard and reports it; Ray Train merges them into one checkpoint in
`<run>/ray_train/<stage>`, keeps `num_to_keep`, restarts failed workers from the latest (`max_failures`), and a
rerun with the same run directory resumes from it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import pandas as pd
import ray

from asclepius.config import Config, TrainHyperparams
from asclepius.recipe import load_recipe
from asclepius.run import RunDir, Stage, StageRun
from asclepius.train.data import instruction_example, pack, pad_to_longest, padding_fraction, pretraining_blocks, shuffled, to_columns
from asclepius.train.settings import accumulation_steps

log = logging.getLogger("asclepius.train")


def torch_extensions_dir() -> str:
    from asclepius.models import cache_dir

    return str(cache_dir() / "torch_extensions")


# ----------------------------------------------------------------------------------------------- datasets
def packed_block_len(hp: TrainHyperparams) -> int:
    """With flash-attention varlen (`packed_attention: position_ids`) a micro-batch is ONE block of micro_batch ×
    max_len tokens of whole examples (each ≤ max_len, positions restarting): examples of 1,000–2,000 tokens pack
    into it with ~1 % padding (benchmarks/sft_packing.py). With the dense block-diagonal mask (CPU) attention cost
    grows with the square of the block, so blocks stay max_len long and a micro-batch holds micro_batch of them."""
    return hp.micro_batch * hp.max_len if hp.packed_attention == "position_ids" else hp.max_len


def rows_per_batch(hp: TrainHyperparams) -> int:
    return 1 if hp.packing == "packed" and hp.packed_attention == "position_ids" else hp.micro_batch



def pretraining_notes(cfg: Config, run: RunDir) -> pd.DataFrame:
    """Discharge notes for continued pretraining: real and synthetic, never case reports or held-out notes."""
    cols = ["note_id", "source", "text"]
    frames = [f for f in (run.read_frame("notes", cols), run.read_frame("synthetic_notes", cols)) if len(f)]
    notes = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
    notes = notes[~notes.source.isin(cfg.synthesize.case_report_sources)]
    held_out = run.read_frame("eval_notes", ["note_id"])
    notes = notes[~notes.note_id.isin(set(held_out.note_id))]
    return notes.sort_values("note_id").reset_index(drop=True)


def _tokenize_batch(batch: pd.DataFrame, source: str, use_fast: bool | None) -> pd.DataFrame:
    from asclepius.models import load_tokenizer

    tok = load_tokenizer(source, use_fast=use_fast)
    return pd.DataFrame({"ids": [list(tok(t, add_special_tokens=False)["input_ids"]) for t in batch["text"]]})


def pretraining_dataset(cfg: Config, run: RunDir, source: str, tokenizer) -> tuple[ray.data.Dataset, dict]:
    notes = pretraining_notes(cfg, run)
    tokenized = ray.data.from_pandas(notes[["text"]]).map_batches(
        _tokenize_batch, batch_format="pandas", fn_kwargs={"source": source, "use_fast": cfg.model.use_fast_tokenizer}
    )
    token_lists = [list(ids) for ids in tokenized.to_pandas()["ids"]]
    token_lists = shuffled(token_lists, cfg.pretrain.seed)
    blocks = pretraining_blocks(token_lists, tokenizer.bos_token_id, tokenizer.eos_token_id, cfg.pretrain.max_len)
    cols = {
        "input_ids": blocks,
        "labels": blocks,
        "position_ids": [list(range(len(b))) for b in blocks],
        "segment_ids": [[1] * len(b) for b in blocks],
    }
    stats = {"notes": len(notes), "tokens": sum(len(t) + 2 for t in token_lists), "blocks": len(blocks), "block_len": cfg.pretrain.max_len}
    return ray.data.from_pandas(pd.DataFrame(cols)), stats


def finetuning_dataset(cfg: Config, run: RunDir, tokenizer) -> tuple[ray.data.Dataset, dict]:
    hp = cfg.finetune
    rows = run.read_frame("instructions")
    prompt = load_recipe().model_prompt
    examples, dropped = [], 0
    for r in rows.itertuples():
        ex = instruction_example(tokenizer, prompt, r.note, r.question, r.answer, hp.max_len)
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    examples = shuffled(examples, hp.seed)
    # The pad id never reaches the loss (labels -100) nor another example (attention stays inside examples), so
    # any id will do: the tokenizer's pad token if it has one (LLaMA's has none; the recipe padded with bos), else eos.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if hp.packing == "pad_to_longest":
        blocks = pad_to_longest(examples, pad, hp.micro_batch)
    else:
        blocks = pack(examples, packed_block_len(hp), pad)
    stats = {
        "instructions": len(rows), "examples": len(examples), "dropped_answer_too_long": dropped,
        "truncated_notes": sum(e.truncated_note for e in examples), "blocks": len(blocks),
        "padding_fraction": round(padding_fraction(blocks), 4), "packing": hp.packing,
    }  # fmt: skip
    return ray.data.from_pandas(pd.DataFrame(to_columns(blocks))), stats


# ----------------------------------------------------------------------------------------------- workers
def _collate(batch: dict) -> dict:
    """Blocks as long tensors; pad-to-longest blocks differ in length, so pad each micro-batch to its longest."""
    import torch

    out = {}
    length = max(len(x) for x in batch["input_ids"])
    fill = {"input_ids": 0, "labels": -100, "position_ids": 0, "segment_ids": 0}
    for key, values in batch.items():
        out[key] = torch.tensor([list(v) + [fill[key]] * (length - len(v)) for v in values], dtype=torch.long)
    return out


def _worker(config: dict) -> None:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", config["torch_extensions_dir"])
    if not config["hp"].use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is imported in this worker
    import ray.train
    import torch

    from asclepius.models import load_model, load_tokenizer
    from asclepius.train.loop import TrainContext, train

    hp: TrainHyperparams = config["hp"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(hp.seed)

    class RayContext(TrainContext):
        def report(self, metrics, checkpoint_dir=None, step=0):
            from ray.train import Checkpoint

            self.history.append(metrics)
            if rank == 0:  # a JSON lines log for the loss curve (the dashboard shows the reported metrics)
                with open(config["metrics_file"], "a", encoding="utf-8") as f:
                    f.write(json.dumps(metrics) + "\n")
            ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"step-{step:06d}" if ckpt else None)

        def latest_checkpoint(self):
            ckpt = ray.train.get_checkpoint()
            return ckpt.as_directory() if ckpt else contextlib.nullcontext(None)

    tokenizer = load_tokenizer(config["source"], use_fast=config["use_fast"])
    model = load_model(config["source"], dtype="float32" if not hp.use_gpu else "bfloat16", device="cuda" if hp.use_gpu else "cpu")
    shard = ray.train.get_dataset_shard("train")

    def batches(epoch):
        return shard.iter_torch_batches(batch_size=config["rows_per_batch"], collate_fn=_collate)

    result = train(
        model, batches, config["steps_per_epoch"], hp, config["section"], RayContext(rank=rank, world_size=context.get_world_size()),
        export_dir=config["export_dir"], tokenizer=tokenizer, packed_attention=hp.packed_attention, max_steps=hp.max_steps,
        checkpoint_every=hp.checkpoint_every_steps,
    )  # fmt: skip
    if rank == 0:
        with open(config["summary_file"], "w", encoding="utf-8") as f:
            json.dump({"final_step": result.final_step, "resumed_from": result.resumed_from}, f)


def fit(ctx: StageRun, source: str, dataset: ray.data.Dataset, rows: int, rows_per_batch: int) -> dict:
    """Run one training stage on Ray Train; returns what the manifest records.

    The Ray Train run is named after the stage's attempt: a stage that was cut off resumes its own checkpoints,
    while a changed config (or --force) is a new attempt that starts from step 0 and never restores the old
    config's final checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    stage, cfg, run = ctx.stage.name, ctx.cfg, ctx.run
    hp: TrainHyperparams = getattr(cfg, stage)
    accum = accumulation_steps(hp, hp.num_workers, stage)  # fails before anything starts, naming the fields
    steps_per_epoch = rows // hp.num_workers // rows_per_batch // accum
    if steps_per_epoch < 1:
        raise ValueError(f"{stage}: {rows} blocks are not enough for one step of global batch {hp.global_batch}; lower {stage}.global_batch")
    stage_dir = ctx.local_output(f"checkpoints/{stage}")
    config = {
        "hp": hp, "section": stage, "source": source, "steps_per_epoch": steps_per_epoch, "rows_per_batch": rows_per_batch,
        "export_dir": os.path.join(stage_dir, "final"), "metrics_file": os.path.join(stage_dir, "metrics.jsonl"),
        "summary_file": os.path.join(stage_dir, "summary.json"), "torch_extensions_dir": torch_extensions_dir(),
        "use_fast": cfg.model.use_fast_tokenizer if cfg.model else None,
    }  # fmt: skip
    if not ctx.resumed and os.path.exists(config["metrics_file"]):
        os.remove(config["metrics_file"])  # a new attempt's curve never mixes with an older one's
    trainer = TorchTrainer(
        _worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=hp.num_workers, use_gpu=hp.use_gpu, resources_per_worker={"CPU": hp.cpus_per_worker}),
        run_config=RunConfig(
            storage_path=run.path("ray_train"), name=f"{stage}-{ctx.attempt}",
            checkpoint_config=CheckpointConfig(num_to_keep=hp.num_to_keep),
            failure_config=FailureConfig(max_failures=hp.max_failures),
        ),  # fmt: skip
        torch_config=TorchConfig(backend="nccl" if hp.use_gpu else "gloo"),
        datasets={"train": dataset},
    )
    started = time.time()
    trainer.fit()
    with open(config["summary_file"], encoding="utf-8") as f:
        summary = json.load(f)
    history = _history(config["metrics_file"])
    plot_loss(history, os.path.join(stage_dir, "loss.png"), stage)
    published = run.path("checkpoints", stage, "final")
    return {
        **summary, "steps_per_epoch": steps_per_epoch, "accumulation": accum, "workers": hp.num_workers, "zero_stage": hp.zero_stage,
        "first_loss": history[0]["loss"] if history else None, "final_loss": history[-1]["loss"] if history else None,
        "tokens_per_s": round(sum(h["tokens_per_s"] for h in history) / len(history), 1) if history else None,
        "mfu": history[-1]["mfu"] if history else None, "export_dir": published, "seconds": round(time.time() - started, 1),
        "ray_train_run": f"{stage}-{ctx.attempt}",
    }  # fmt: skip


def _history(path: str) -> list[dict]:
    by_step: dict[int, dict] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = json.loads(line)
                by_step[m["step"]] = m  # a resumed run repeats no step, but a restarted worker may: last wins
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(history: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker="o" if len(history) < 30 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"{title} loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- stages
def _base_source(cfg: Config) -> str | None:
    return cfg.model.base if cfg.model else None


def pretrain(ctx: StageRun) -> dict:
    from asclepius.models import load_tokenizer

    cfg = ctx.cfg
    source = _base_source(cfg)
    tokenizer = load_tokenizer(source, use_fast=cfg.model.use_fast_tokenizer)
    dataset, stats = pretraining_dataset(cfg, ctx.run, source, tokenizer)
    return {"data": stats, **fit(ctx, source, dataset, stats["blocks"], cfg.pretrain.micro_batch)}


def finetune(ctx: StageRun) -> dict:
    from asclepius.models import load_tokenizer

    cfg = ctx.cfg
    pretrained = ctx.run.path("checkpoints", "pretrain", "final")
    source = pretrained if os.path.exists(os.path.join(pretrained, "config.json")) else _base_source(cfg)
    tokenizer = load_tokenizer(source, use_fast=cfg.model.use_fast_tokenizer)
    dataset, stats = finetuning_dataset(cfg, ctx.run, tokenizer)
    return {"data": stats, "base": source, **fit(ctx, source, dataset, stats["blocks"], rows_per_batch(cfg.finetune))}


def format_summary(name: str):
    def fmt(entry: dict) -> str:
        if entry.get("skipped"):
            return f"{name}: skipped ({entry.get('reason', 'up to date')})"
        d = entry["data"]
        return (
            f"{name}: {entry['final_step']} steps (resumed from {entry['resumed_from']}) on {d['blocks']} blocks, "
            f"{entry['workers']} workers ZeRO-{entry['zero_stage']}, loss {entry['first_loss']:.3f} → {entry['final_loss']:.3f}, "
            f"{entry['tokens_per_s']} tokens/s, MFU {entry['mfu']}; model in {entry['export_dir']}"
        )

    return fmt


def _case_reports(cfg: Config):
    return {"case_report_sources": cfg.synthesize.case_report_sources}


PRETRAIN_STAGE = Stage(
    name="pretrain", work=pretrain, sections=("pretrain", "model"), upstream=("notes", "synthesize", "split"),
    requires=("split",), outputs=("checkpoints/pretrain",), identity=_case_reports, summary=format_summary("pretrain"),
)  # fmt: skip
FINETUNE_STAGE = Stage(
    name="finetune", work=finetune, sections=("finetune", "model"), upstream=("pretrain", "answers"),
    outputs=("checkpoints/finetune",), summary=format_summary("finetune"),
)  # fmt: skip
