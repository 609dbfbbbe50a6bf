"""Ray Train wiring: the data in Ray Data, TorchTrainer + DeepSpeed workers, checkpoints, resume, HF export.

    stage "pretrain":  notes (+ synthetic notes, minus held-out eval notes) → <run>/checkpoints/pretrain/final
    stage "finetune":  instructions → <run>/checkpoints/finetune/final (from the pretrained model if there is one)

**Data.** Ray Data reads the run's tables, shuffles the examples (seeded), and in `map_batches` tasks tokenizes
them, groups notes into blocks (pretraining, the recipe's group_texts per batch of 1,000 notes) or packs
instruction examples (best-fit decreasing, O(n log n)), and writes each batch's blocks as an Arrow IPC file under
`<run>/ray_train/<stage>-<attempt>/data/` — token lists never come to the driver. Every worker memory-maps the
files (one copy per node in the page cache; read once from object storage when the run lives there) and reads the blocks of an epoch in a permutation seeded by
(seed, epoch), dealt round-robin to the workers: a new order every epoch, and the same one when a run resumes.

**Training.** Every rank saves its DeepSpeed shard and reports it; Ray Train keeps `num_to_keep` checkpoints in
`<run>/ray_train/<stage>-<attempt>`, restarts failed workers from the latest (`max_failures`), and a stage that
was cut off resumes its attempt (asclepius.run). The export goes to the stage's staging output and is published
when the stage completes.

**Object storage.** With `run_dir: s3://...` (or gs://) Ray Train checkpoints through `storage_filesystem`, a
pretrained model that finetuning starts from is downloaded once per node (asclepius.storage.local_copy; the
tokenizing tasks fetch only its tokenizer files), the HF export is written to a local temporary folder and
uploaded, and rank 0's metrics log is uploaded every `METRICS_UPLOAD_S` seconds and at each checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import ray

from asclepius.config import Config, TrainHyperparams
from asclepius.recipe import load_recipe
from asclepius.run import RunDir, Stage, StageRun
from asclepius.storage import ensure_dir, is_remote, local_copy, read_bytes, upload_dir, uri_join, write_bytes
from asclepius.train.data import (
    BlockSource,
    blocks_table,
    instruction_example,
    packed_table,
    pad_to_longest,
    pretraining_blocks,
    pretraining_table,
    write_blocks,
)
from asclepius.train.settings import attention_for, global_batch_accumulation, packed_block_len, rows_per_batch, torch_extensions_dir

log = logging.getLogger("asclepius.train")
NOTES_PER_GROUP = 1000  # HF run_clm's group_texts concatenates per map batch of 1,000 texts (the recipe's pretraining)
EXAMPLES_PER_PACK = 20000  # instruction examples packed together: more gives no measurable gain in padding
METRICS_UPLOAD_S = 30.0  # object storage: how often rank 0's metrics log is rewritten (one small PUT)


# ----------------------------------------------------------------------------------------------- data (Ray Data)
def _tokenizer(source: str, use_fast: bool | None):
    from asclepius.models import load_tokenizer

    key = (source, use_fast)
    if key not in _TOKENIZERS:  # once per Ray worker process, not once per batch
        local = local_copy(source, weights=False) if is_remote(source) else source  # a tokenizer needs no weights
        _TOKENIZERS[key] = load_tokenizer(local, use_fast=use_fast)
    return _TOKENIZERS[key]


_TOKENIZERS: dict = {}


def _pretrain_task(batch: pd.DataFrame, *, source, use_fast, block_len, out_dir) -> pd.DataFrame:
    tok = _tokenizer(source, use_fast)
    ids = [list(tok(t, add_special_tokens=False)["input_ids"]) for t in batch["text"]]
    blocks = pretraining_blocks(ids, tok.bos_token_id, tok.eos_token_id, block_len)
    path = write_blocks(pretraining_table(blocks), out_dir) if blocks else None
    tokens = sum(len(i) + 1 + (tok.bos_token_id is not None) for i in ids)  # note, eos, and bos where the family has one
    return pd.DataFrame({"file": [path], "examples": [len(ids)], "blocks": [len(blocks)], "tokens": [tokens], "dropped": [0],
                         "truncated": [0], "real_tokens": [len(blocks) * block_len], "block_tokens": [len(blocks) * block_len]})  # fmt: skip


def _finetune_task(batch: pd.DataFrame, *, source, use_fast, template, hp: TrainHyperparams, out_dir) -> pd.DataFrame:
    tok = _tokenizer(source, use_fast)
    examples, dropped = [], 0
    for note, question, answer in zip(batch["note"], batch["question"], batch["answer"]):
        ex = instruction_example(tok, template, note, question, answer, hp.max_len)
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    # The pad id never reaches the loss (labels -100) nor another example (attention stays inside examples), so any
    # id will do: the tokenizer's pad token if it has one (LLaMA's has none; the recipe padded with bos), else eos.
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if not examples:
        table = None
    elif hp.packing == "pad_to_longest":
        table = blocks_table(pad_to_longest(examples, pad, hp.micro_batch))
    else:
        table = packed_table(examples, packed_block_len(hp), pad)
    path = write_blocks(table, out_dir) if table is not None else None
    real = sum(len(e) for e in examples)
    width = sum(len(x) for x in table.column("input_ids").to_pylist()) if table is not None and hp.packing == "pad_to_longest" else (
        table.num_rows * packed_block_len(hp) if table is not None else 0)  # fmt: skip
    return pd.DataFrame({"file": [path], "examples": [len(examples)], "blocks": [table.num_rows if table is not None else 0],
                         "tokens": [real], "dropped": [dropped], "truncated": [sum(e.truncated_note for e in examples)],
                         "real_tokens": [real], "block_tokens": [width]})  # fmt: skip


def _table_files(run: RunDir, *folders: str) -> list[str]:
    return [p for folder in folders for p in run.files(folder) if p.endswith(".parquet")]


def _select_pretraining(batch: pd.DataFrame, *, held_out: frozenset, case_reports: frozenset) -> pd.DataFrame:
    keep = ~batch["note_id"].isin(held_out) & ~batch["source"].isin(case_reports)
    return batch.loc[keep, ["text"]]


def build_blocks(ctx: StageRun, source: str) -> dict:
    """Tokenize and pack the stage's data in Ray Data tasks into Arrow files; the counts. Reused by a resumed attempt."""
    cfg, run, stage = ctx.cfg, ctx.run, ctx.stage.name
    hp: TrainHyperparams = getattr(cfg, stage)
    folder = ("ray_train", f"{stage}-{ctx.attempt}", "data")
    out_dir = run.uri_of(*folder)  # the tasks may run on any node
    done_file = uri_join(out_dir, "_blocks.json")
    done = read_bytes(done_file)
    if done is not None:
        return json.loads(done)
    run.delete_dir(run.path(*folder))  # a crash while building: build again
    ensure_dir(run.fs, run.path(*folder))
    use_fast = cfg.model.use_fast_tokenizer
    if stage == "pretrain":
        files = _table_files(run, "notes", "synthetic_notes")
        held_out = frozenset(run.read_frame("eval_notes", ["note_id"]).note_id)
        ds = ray.data.read_parquet(files, columns=["note_id", "source", "text"], filesystem=run.fs) if files else ray.data.from_items([])
        ds = ds.map_batches(_select_pretraining, batch_format="pandas", fn_kwargs={"held_out": held_out, "case_reports": frozenset(cfg.synthesize.case_report_sources)})
        task, batch_size = _pretrain_task, NOTES_PER_GROUP
        kwargs = {"source": source, "use_fast": use_fast, "block_len": hp.max_len, "out_dir": out_dir}
    else:
        files = _table_files(run, "instructions")
        ds = ray.data.read_parquet(files, columns=["note", "question", "answer"], filesystem=run.fs) if files else ray.data.from_items([])
        task, batch_size = _finetune_task, EXAMPLES_PER_PACK
        kwargs = {"source": source, "use_fast": use_fast, "template": load_recipe().model_prompt, "hp": hp, "out_dir": out_dir}
    if files:
        ds = ds.random_shuffle(seed=hp.seed)  # examples (notes) mixed before they are grouped or packed
        parts = ds.map_batches(task, batch_format="pandas", batch_size=batch_size, fn_kwargs=kwargs).to_pandas()
    else:
        parts = pd.DataFrame(columns=["file", "examples", "blocks", "tokens", "dropped", "truncated", "real_tokens", "block_tokens"])
    stats = {
        "files": sorted(f for f in parts["file"] if isinstance(f, str)),
        "examples": int(parts["examples"].sum()), "blocks": int(parts["blocks"].sum()), "tokens": int(parts["tokens"].sum()),
        "dropped_answer_too_long": int(parts["dropped"].sum()), "truncated_notes": int(parts["truncated"].sum()),
        "padding_fraction": round(1 - parts["real_tokens"].sum() / max(1, parts["block_tokens"].sum()), 4),
        "packing": hp.packing if stage == "finetune" else "blocks", "block_len": packed_block_len(hp) if stage == "finetune" else hp.max_len,
    }  # fmt: skip
    write_bytes(done_file, json.dumps(stats).encode())
    return stats


# ----------------------------------------------------------------------------------------------- workers
def _worker(config: dict) -> None:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", config["torch_extensions_dir"])
    if not config["hp"].use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is imported in this worker
    import ray.train
    import torch

    from asclepius.models import load_model, load_tokenizer
    from asclepius.train.adapters import quantization_config
    from asclepius.train.loop import train
    from asclepius.train.ray_context import RayTrainContext

    hp: TrainHyperparams = config["hp"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(hp.seed)

    metrics_log = _MetricsLog(config["metrics_file"]) if rank == 0 else None

    packed_attention, implementation = attention_for(hp, config["section"], hp.use_gpu)
    source = local_copy(config["source"]) if is_remote(config["source"]) else config["source"]  # once per node
    tokenizer = load_tokenizer(source, use_fast=config["use_fast"])
    model = load_model(source, dtype="float32" if not hp.use_gpu else "bfloat16", device="cuda" if hp.use_gpu else "cpu",
                       attn_implementation=implementation, quantization_config=quantization_config(hp))  # fmt: skip
    model.config._name_or_path = config["source"]  # what a LoRA adapter's export names as its base (not this node's copy)
    blocks = BlockSource(config["block_files"])

    def batches(epoch, first):
        return blocks.batches(epoch, first, seed=hp.seed, rank=rank, world=world, per_epoch=config["steps_per_epoch"] * config["accumulation"],
                              rows=config["rows_per_batch"])  # fmt: skip

    # save_pretrained needs a local folder: on object storage the export is written here, then uploaded
    remote_export = is_remote(config["export_dir"])
    export_dir = tempfile.mkdtemp(prefix="asclepius-export-") if remote_export else config["export_dir"]
    result = train(
        model, batches, config["steps_per_epoch"], hp, config["section"], RayTrainContext(rank=rank, world_size=world, metrics_log=metrics_log, section=config["section"]),
        export_dir=export_dir, tokenizer=tokenizer, packed_attention=packed_attention, max_steps=hp.max_steps,
        checkpoint_every=hp.checkpoint_every_steps, accumulation=config["accumulation"],
    )  # fmt: skip
    if rank == 0:
        if remote_export:
            upload_dir(export_dir, config["export_dir"])
        metrics_log.upload()
        write_bytes(config["summary_file"], json.dumps({"final_step": result.final_step, "resumed_from": result.resumed_from}).encode())
    if remote_export:
        shutil.rmtree(export_dir, ignore_errors=True)


class _MetricsLog:
    """Rank 0's JSON lines of step metrics: appended to a local or shared file, or — object storage has no append —
    kept in memory (after what an earlier worker of this attempt stored) and rewritten every METRICS_UPLOAD_S."""

    def __init__(self, uri: str):
        self.uri, self.remote = uri, is_remote(uri)
        self.lines = (read_bytes(uri) or b"").decode().splitlines(keepends=True) if self.remote else []
        self.uploaded = time.time()

    def append(self, metrics: dict, force_upload: bool = False) -> None:
        line = json.dumps(metrics) + "\n"
        if not self.remote:
            with open(self.uri, "a", encoding="utf-8") as f:
                f.write(line)
            return
        self.lines.append(line)
        if force_upload or time.time() - self.uploaded > METRICS_UPLOAD_S:
            self.upload()

    def upload(self) -> None:
        if self.remote:
            write_bytes(self.uri, "".join(self.lines).encode())
            self.uploaded = time.time()


def fit(ctx: StageRun, source: str, stats: dict, rows_per_batch: int) -> dict:
    """Run one training stage on Ray Train; returns what the manifest records.

    The Ray Train run is named after the stage's attempt: a stage that was cut off resumes its own checkpoints,
    while a changed config (or --force) is a new attempt that starts from step 0 and never restores the old
    config's final checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    stage, cfg, run = ctx.stage.name, ctx.cfg, ctx.run
    hp: TrainHyperparams = getattr(cfg, stage)
    accum, examples_per_step = global_batch_accumulation(hp, stats, hp.num_workers, rows_per_batch, stage)
    steps_per_epoch = stats["blocks"] // hp.num_workers // rows_per_batch // accum
    if steps_per_epoch < 1:
        raise ValueError(f"{stage}: {stats['blocks']} blocks are not enough for one step of global batch {hp.global_batch}; lower {stage}.global_batch")
    stage_dir = ctx.output_uri(f"checkpoints/{stage}")  # rank 0 writes there, on whichever node it runs
    config = {
        "hp": hp, "section": stage, "source": source, "steps_per_epoch": steps_per_epoch, "rows_per_batch": rows_per_batch,
        "accumulation": accum, "block_files": stats["files"],
        "export_dir": uri_join(stage_dir, "final"), "metrics_file": uri_join(stage_dir, "metrics.jsonl"),
        "summary_file": uri_join(stage_dir, "summary.json"), "torch_extensions_dir": torch_extensions_dir(),
        "use_fast": cfg.model.use_fast_tokenizer if cfg.model else None,
    }  # fmt: skip
    metrics_path = posixpath.join(ctx.output(f"checkpoints/{stage}"), "metrics.jsonl")
    if not ctx.resumed and run.exists(metrics_path):
        run.fs.delete_file(metrics_path)  # a new attempt's curve never mixes with an older one's
    log.info("%s: %d blocks, %d steps/epoch, accumulation %d, ~%.0f examples per step", stage, stats["blocks"], steps_per_epoch, accum, examples_per_step)
    trainer = TorchTrainer(
        _worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=hp.num_workers, use_gpu=hp.use_gpu, resources_per_worker={"CPU": hp.cpus_per_worker, **hp.resources_per_worker}),
        run_config=RunConfig(
            storage_path=run.path("ray_train"), storage_filesystem=None if run.is_local else run.fs, name=f"{stage}-{ctx.attempt}",
            checkpoint_config=CheckpointConfig(num_to_keep=hp.num_to_keep),
            failure_config=FailureConfig(max_failures=hp.max_failures),
        ),  # fmt: skip
        torch_config=TorchConfig(backend="nccl" if hp.use_gpu else "gloo"),
    )
    started = time.time()
    with _TrainingProgress(stage, config["metrics_file"], steps_per_epoch, hp):
        trainer.fit()
    summary = json.loads(read_bytes(config["summary_file"]))
    history = _history(config["metrics_file"])
    with tempfile.TemporaryDirectory() as tmp:  # matplotlib writes a local file
        plot_loss(history, os.path.join(tmp, "loss.png"), stage)
        write_bytes(uri_join(stage_dir, "loss.png"), Path(tmp, "loss.png").read_bytes())
    published = config["export_dir"]  # this attempt's version of checkpoints/<stage>; the manifest points to it
    return {
        **summary, "steps_per_epoch": steps_per_epoch, "accumulation": accum, "examples_per_step": round(examples_per_step, 1),
        "workers": hp.num_workers, "zero_stage": hp.zero_stage,
        "first_loss": history[0]["loss"] if history else None, "final_loss": history[-1]["loss"] if history else None,
        "tokens_per_s": round(sum(h["tokens_per_s"] for h in history) / len(history), 1) if history else None,
        "mfu": history[-1]["mfu"] if history else None, "export_dir": published, "seconds": round(time.time() - started, 1),
        "ray_train_run": f"{stage}-{ctx.attempt}",
    }  # fmt: skip


class _TrainingProgress:
    """A console line every ~30 s from rank 0's metrics file (the workers' own logs stay in Ray's files)."""

    def __init__(self, stage: str, metrics_file: str, steps_per_epoch: int, hp: TrainHyperparams, every_s: float = 30.0):
        import math
        import threading

        self.stage, self.metrics_file, self.every_s = stage, metrics_file, every_s
        total = max(1, math.ceil(hp.epochs * steps_per_epoch))
        self.total = min(total, hp.max_steps) if hp.max_steps else total
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        shown_step = 0
        while not self._stop.wait(self.every_s):
            history = _history(self.metrics_file)
            if history and history[-1]["step"] != shown_step:
                h = history[-1]
                shown_step = h["step"]
                mfu = f", MFU {h['mfu']:.1%}" if isinstance(h.get("mfu"), float) else ""
                log.info("%s: step %d/%d, loss %.3f, %.0f tokens/s%s", self.stage, h["step"], self.total, h["loss"], h["tokens_per_s"], mfu,
                         extra={"console": True})  # fmt: skip

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


def _history(uri: str) -> list[dict]:
    by_step: dict[int, dict] = {}
    for line in (read_bytes(uri) or b"").decode().splitlines():
        if line.strip():
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
    source = _base_source(ctx.cfg)
    stats = build_blocks(ctx, source)
    return {"data": {k: v for k, v in stats.items() if k != "files"}, **fit(ctx, source, stats, ctx.cfg.pretrain.micro_batch)}


def finetune(ctx: StageRun) -> dict:
    cfg = ctx.cfg
    pretrained = ctx.run.output_path("checkpoints", "pretrain", "final")
    source = ctx.run.output_uri("checkpoints", "pretrain", "final") if ctx.run.exists(posixpath.join(pretrained, "config.json")) else _base_source(cfg)
    stats = build_blocks(ctx, source)
    return {"data": {k: v for k, v in stats.items() if k != "files"}, "base": source, **fit(ctx, source, stats, rows_per_batch(cfg.finetune))}


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
