"""The training loop: DeepSpeed, one readable screen. Runs under Ray Train or alone (single process, debugging).

The environment (Ray Train, or a local run) is a `TrainContext`: rank, world size, how to report metrics and
checkpoints, and where the latest checkpoint is. Everything else is here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from asclepius.config import TrainHyperparams
from asclepius.models import TOKENIZER_MARKER
from asclepius.train.adapters import add_adapter, export_adapter_model, trainable_parameters, uses_adapter
from asclepius.train.data import IGNORE, attention_seq_len, model_inputs
from asclepius.train.settings import deepspeed_config, flops_per_token, lr_at, peak_flops

log = logging.getLogger("asclepius.train")
STATE_FILE = "asclepius_state.json"


@dataclass
class TrainContext:
    rank: int = 0
    world_size: int = 1
    checkpoint_root: str | None = None  # local runs: where checkpoints go
    history: list[dict] = field(default_factory=list)

    @property
    def keeps_checkpoints(self) -> bool:
        """Whether a checkpoint has anywhere to go: a local run without a root (a benchmark) saves none."""
        return self.checkpoint_root is not None

    def report(self, metrics: dict, checkpoint_dir: str | None = None, step: int = 0) -> None:
        """`checkpoint_dir` is handed over: the context deletes it once it is kept (under Ray Train, after the
        background upload), so training goes on while a checkpoint is copied."""
        self.history.append(metrics)
        if checkpoint_dir:
            import shutil

            if self.checkpoint_root:
                shutil.copytree(checkpoint_dir, os.path.join(self.checkpoint_root, f"step-{step:06d}"), dirs_exist_ok=True)
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    def latest_checkpoint(self):
        """A context manager yielding the latest checkpoint directory, or None."""
        import contextlib

        if not self.checkpoint_root or not os.path.isdir(self.checkpoint_root):
            return contextlib.nullcontext(None)
        steps = sorted(d for d in os.listdir(self.checkpoint_root) if d.startswith("step-"))
        return contextlib.nullcontext(os.path.join(self.checkpoint_root, steps[-1]) if steps else None)


class CheckpointIncomplete(RuntimeError):
    """A checkpoint to resume from lacks a file: training would go on with base weights or a fresh optimizer."""


CHECKPOINT_TAG = "state"


def missing_checkpoint_files(ckpt: str, world_size: int, zero_stage: int) -> list[str]:
    """What a resume needs and `ckpt` lacks: our step file and, for every data-parallel rank, DeepSpeed's optimizer
    shard (ZeRO-2: one model-state file; ZeRO-3: one per rank too). DeepSpeed itself only warns when one is missing
    and `load_checkpoint` returns (None, None) or skips the optimizer (deepspeed/runtime/engine.py)."""
    present = set(os.listdir(os.path.join(ckpt, CHECKPOINT_TAG))) if os.path.isdir(os.path.join(ckpt, CHECKPOINT_TAG)) else set()
    missing = [] if os.path.isfile(os.path.join(ckpt, STATE_FILE)) else [STATE_FILE]
    if zero_stage != 3 and "mp_rank_00_model_states.pt" not in present:
        missing.append(f"{CHECKPOINT_TAG}/mp_rank_00_model_states.pt")
    for r in range(world_size):
        if zero_stage == 3 and f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" not in present:
            missing.append(f"{CHECKPOINT_TAG}/zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        optim = f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        if optim not in present and f"bf16_{optim}" not in present:  # the bf16_ prefix when bf16 is on
            missing.append(f"{CHECKPOINT_TAG}/{optim}")
    return missing


def resume(engine, ckpt: str, world_size: int, zero_stage: int, adapter_only: bool = False) -> int:
    """Load `ckpt` into the engine and return the step it was taken at, or stop with what is missing."""
    missing = missing_checkpoint_files(ckpt, world_size, zero_stage)
    if missing:
        raise CheckpointIncomplete(f"cannot resume from {ckpt}: it lacks {', '.join(missing)} (a copy cut off, or a file "
                                   f"deleted); training from it would go on with base weights or a fresh optimizer. "
                                   f"Delete this checkpoint to resume from an earlier one, or rerun the stage with --force")  # fmt: skip
    with open(os.path.join(ckpt, STATE_FILE)) as f:
        state = json.load(f)
    if state.get("world_size", world_size) != world_size:
        raise CheckpointIncomplete(f"cannot resume from {ckpt}: it was written by {state['world_size']} workers and this run has "
                                   f"{world_size}; DeepSpeed's optimizer shards are per worker")  # fmt: skip
    # an adapter's checkpoint has no frozen weights: those already in the module (from the source) are kept
    load_path, _ = engine.load_checkpoint(ckpt, tag=CHECKPOINT_TAG, load_module_strict=not adapter_only)
    if load_path is None:
        raise CheckpointIncomplete(f"cannot resume from {ckpt}: DeepSpeed found no loadable checkpoint there (see its warning above)")
    return int(state["step"])


@dataclass
class LoopResult:
    final_step: int
    resumed_from: int
    history: list[dict]


def _free_port() -> int:
    """A port nobody listens on now. Only a name here: DeepSpeed's CPU shared-memory op keys its segment on
    MASTER_ADDR:MASTER_PORT; the rendezvous itself takes no port (see below)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_distributed_if_needed() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():  # a local run: a world of one (nccl on a GPU, as under Ray Train)
        for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())), ("RANK", "0"),
                            ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):  # fmt: skip
            os.environ.setdefault(name, value)  # DeepSpeed's engine asks for LOCAL_RANK
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu" else "gloo"
        # An in-process store: a TCP store listening on a port picked earlier lost that port to another process
        # on a busy machine (EADDRINUSE); a world of one has nobody to meet.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def skip_cpu_inference_comm_op() -> None:
    """On the CPU, DeepSpeed's comm backend JIT-builds a shared-memory all-reduce when it starts (comm/torch.py
    build_shm_op): about a minute per machine, and again whenever the ninja or the paths that build it change. Only
    DeepSpeed's inference tensor parallelism calls it (inference_all_reduce); ZeRO training's collectives go through
    torch.distributed (gloo). Marking the op incompatible in the dict DeepSpeed keeps for the process (edits to it
    persist, deepspeed/ops/__init__.py) makes build_shm_op return None, and the backend never uses it."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if builder is not None and isinstance(compatible, dict):
        compatible[builder.NAME] = False


def make_optimizer(model, hp: TrainHyperparams, device: str):
    """AdamW with the recipe's settings (HF Trainer: betas 0.9/0.999, eps 1e-8). With ZeRO-Offload the optimizer
    runs on the CPU, where DeepSpeed accepts only its own CPU Adam (a client torch AdamW is refused)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if hp.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=hp.lr, betas=tuple(hp.adam_betas), eps=hp.adam_eps, weight_decay=hp.weight_decay, adamw_mode=True)
    fused = {"fused": True} if device == "cuda" else {}
    return torch.optim.AdamW(params, lr=hp.lr, betas=tuple(hp.adam_betas), eps=hp.adam_eps, weight_decay=hp.weight_decay, **fused)


def numel(p) -> int:
    """A parameter's size, also when ZeRO-3 holds only this rank's shard of it."""
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def compute_params(model) -> int:
    """Parameters that cost matmul FLOPs per token: all of them, less an untied input embedding (a table lookup)."""
    total = sum(numel(p) for p in model.parameters())
    embed = model.get_input_embeddings().weight
    tied = getattr(model.config, "tie_word_embeddings", False)
    return total if tied else total - numel(embed)


def output_projection_params(model) -> int:
    """The vocabulary projection's parameters (lm_head): its FLOPs are paid only where logits are computed."""
    return numel(model.get_output_embeddings().weight)


def next_token_loss(model, inputs: dict) -> tuple[torch.Tensor, int]:
    """transformers' causal-LM loss (the mean cross-entropy of each labelled token given those before it), with the
    vocabulary projection computed only at the positions whose next token is labelled (`logits_to_keep`), and how
    many positions were projected. An instruction's note and question are ~95 % of its tokens and none of its loss:
    the projection is a fifth of SmolLM2-135M's matmuls, and a 2,048-token row's fp32 logits at Llama 3's 128k
    vocabulary take 1 GiB. One index list for the micro-batch (the union of its rows' positions), because
    transformers takes a 1-D `logits_to_keep` for every row alike."""
    targets = torch.nn.functional.pad(inputs["labels"], (0, 1), value=IGNORE)[:, 1:]  # position t predicts token t + 1
    keep = (targets != IGNORE).any(0).nonzero().squeeze(1)
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=keep).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets[:, keep].flatten(), ignore_index=IGNORE)
    return loss, targets.shape[0] * keep.numel()


CHECKPOINT_SCRATCH_PREFIX = "asclepius-ckpt-"


def checkpoint_scratch_dir() -> str:
    """A node-local folder for one checkpoint before the context keeps it, named after this process."""
    return tempfile.mkdtemp(prefix=f"{CHECKPOINT_SCRATCH_PREFIX}{os.getpid()}-")


def remove_orphaned_checkpoint_scratch() -> list[str]:
    """Delete the checkpoint folders that processes now gone left behind; the deleted paths.

    A checkpoint is saved to a local folder and handed over; Ray Train deletes it once uploaded. A worker killed in
    between (a lost node, a worker restart, which kills the whole worker group) leaves it on the node's disk: a 7B
    ZeRO state is ~94 GB across the ranks, so a few restarts fill a node. Each training worker clears what dead
    ones left when it starts. A folder whose process is alive, or not ours by its name, is never touched."""
    import shutil

    import psutil  # as asclepius.lease asks whether a lease's holder is gone

    root = tempfile.gettempdir()
    removed = []
    for name in os.listdir(root):
        pid = name[len(CHECKPOINT_SCRATCH_PREFIX):].split("-", 1)[0] if name.startswith(CHECKPOINT_SCRATCH_PREFIX) else ""
        if not pid.isdigit() or psutil.pid_exists(int(pid)):
            continue
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        removed.append(os.path.join(root, name))
    if removed:
        log.info("removed %d checkpoint folders left by stopped workers", len(removed))
    return removed


def train(
    model,
    batches: Callable[[int, int], Iterator[dict]],
    steps_per_epoch: int,
    hp: TrainHyperparams,
    section: str,
    ctx: TrainContext,
    export_dir: str | None = None,
    tokenizer=None,
    packed_attention: str = "mask",
    max_steps: int | None = None,
    checkpoint_every: int = 0,
    accumulation: int | None = None,
) -> LoopResult:
    """`batches(epoch, start)` yields the micro-batches of an epoch from the `start`-th one on, in the same order
    every time it is asked (asclepius.train.data.epoch_rows), so a resumed run skips exactly what it trained."""
    import deepspeed
    import torch.distributed as dist

    _init_distributed_if_needed()
    skip_cpu_inference_comm_op()
    if ctx.keeps_checkpoints:
        remove_orphaned_checkpoint_scratch()
    device = "cuda" if torch.cuda.is_available() and hp.use_gpu else "cpu"
    bf16 = hp.bf16 and device == "cuda"  # bf16 on GPUs; fp32 on CPU, where bf16 matmuls are slow or unsupported
    ds_config = deepspeed_config(hp, ctx.world_size, section, bf16=bf16, offload_optimizer=hp.offload_optimizer, accumulation=accumulation)
    accum = ds_config["gradient_accumulation_steps"]
    total_steps = max(1, math.ceil(hp.epochs * steps_per_epoch))
    if max_steps:
        total_steps = min(total_steps, max_steps)
    if hp.gradient_checkpointing:  # transformers 5 names it activation checkpointing; the old name warns
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    adapter = uses_adapter(hp)
    if adapter:  # only the adapter trains: the optimizer below takes the parameters that require grad
        model = add_adapter(model, hp)
        trainable, total = trainable_parameters(model)
        log.info("%s: %s, %d of %d parameters train (%.2f%%)", section, hp.method, trainable, total, 100 * trainable / max(1, total))
    optimizer = make_optimizer(model, hp, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total_steps, hp) / hp.lr)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    engine.train()  # dropout on, and transformers checkpoints activations only in training mode

    start_step = 0
    with ctx.latest_checkpoint() as ckpt:
        if ckpt:
            start_step = resume(engine, ckpt, ctx.world_size, hp.zero_stage, adapter_only=adapter)
            log.info("rank %d resumed from step %d", ctx.rank, start_step)

    cfg = model.config
    head = output_projection_params(engine.module)
    body = compute_params(engine.module) - head
    peak = peak_flops(torch.cuda.get_device_name() if device == "cuda" else None)
    dtype = torch.bfloat16 if bf16 else torch.float32

    step, micro, started = start_step, 0, time.time()
    window_loss, window_tokens, window_flops, window_start = 0.0, 0, 0.0, time.time()
    epoch = start_step // max(1, steps_per_epoch)
    first = (start_step - epoch * steps_per_epoch) * accum  # micro-batches of this epoch trained before the checkpoint
    done = step >= total_steps
    while not done:
        for batch in batches(epoch, first):
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss, projected = next_token_loss(engine, model_inputs(batch, dtype, packed_attention))
            engine.backward(loss)
            engine.step()
            micro += 1
            tokens = int((batch["segment_ids"] > 0).sum())
            window_loss += loss.item()
            window_tokens += tokens
            window_flops += tokens * flops_per_token(body, cfg.num_hidden_layers, cfg.hidden_size, attention_seq_len(batch["segment_ids"]),
                                                     weight_grads=not adapter)  # fmt: skip
            window_flops += projected * flops_per_token(head, 0, 0, 0, weight_grads=not adapter)  # lm_head where logits were computed
            if micro % accum:
                continue
            step += 1
            # a collective's tensors live on the training device: nccl has no CPU tensors
            stats = torch.tensor([window_loss / accum, window_tokens, window_flops], dtype=torch.float64, device=device)
            dist.all_reduce(stats)
            elapsed = max(time.time() - window_start, 1e-9)
            tokens_per_s = stats[1].item() / elapsed
            metrics = {
                "step": step,
                "epoch": epoch,
                "loss": stats[0].item() / ctx.world_size,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "tokens_per_s": tokens_per_s,
                "mfu": (stats[2].item() / elapsed / (peak * ctx.world_size)) if peak else "n/a",
                "elapsed_s": time.time() - started,
            }
            if device == "cuda":
                metrics["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            window_loss, window_tokens, window_flops, window_start = 0.0, 0, 0.0, time.time()
            done = step >= total_steps
            if ctx.keeps_checkpoints and ((checkpoint_every and step % checkpoint_every == 0) or done):
                tmp = checkpoint_scratch_dir()  # the context deletes it once kept
                # with an adapter, the checkpoint holds it alone (the frozen base comes from its source on resume)
                engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG, exclude_frozen_parameters=adapter)
                if ctx.rank == 0:
                    with open(os.path.join(tmp, STATE_FILE), "w") as f:
                        json.dump({"step": step, "epoch": epoch, "world_size": ctx.world_size}, f)
                ctx.report(metrics, checkpoint_dir=tmp, step=step)
            else:
                ctx.report(metrics, step=step)
            if ctx.rank == 0:
                log.info("%s step %d/%d loss %.4f lr %.2e tokens/s %.0f mfu %s", section, step, total_steps, metrics["loss"], metrics["lr"], tokens_per_s,
                         f"{metrics['mfu']:.1%}" if peak else "n/a")  # fmt: skip
            if done:
                break
        epoch += 1
        first = 0

    if export_dir:
        if adapter:
            export_adapter_model(engine.module, hp, hp.zero_stage, export_dir, ctx.rank, EXPORT_SHARD_SIZE)
            save_tokenizer(tokenizer, export_dir, ctx.rank)
        else:
            export_hf(engine, hp.zero_stage, export_dir, tokenizer, ctx.rank)
    return LoopResult(final_step=step, resumed_from=start_step, history=ctx.history)


EXPORT_SHARD_SIZE = "4GB"


def export_hf(engine, zero_stage: int, export_dir: str, tokenizer, rank: int) -> None:
    """The trained model in HF format (safetensors + tokenizer); ZeRO-3's shards are gathered in 16 bit first."""
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank takes part
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank == 0:
        os.makedirs(export_dir, exist_ok=True)
        engine.module.config.use_cache = True
        # shards of at most 4 GB (transformers 5 writes one 50 GB shard by default: a 7B model would be one 13.5 GB object,
        # which S3 cannot copy with one CopyObject and which no reader can fetch in parallel)
        engine.module.save_pretrained(export_dir, state_dict=state, safe_serialization=True, max_shard_size=EXPORT_SHARD_SIZE)
        save_tokenizer(tokenizer, export_dir, rank)


def save_tokenizer(tokenizer, export_dir: str, rank: int) -> None:
    if tokenizer is not None and rank == 0:
        tokenizer.save_pretrained(export_dir)
        # serving loads the tokenizer kind training used (slow SentencePiece for the recipe's LLaMA)
        with open(os.path.join(export_dir, TOKENIZER_MARKER), "w", encoding="utf-8") as f:
            json.dump({"use_fast": bool(getattr(tokenizer, "is_fast", False))}, f)
