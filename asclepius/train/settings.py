"""DeepSpeed config, attention path and data layout, learning-rate schedule and FLOPs accounting — built from our
config, checked up front. No Ray here: the device script and benchmarks use it on images without Ray."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from asclepius.config import TrainHyperparams

# attention path → transformers' attention implementation that reads what asclepius.train.data.model_inputs passes
ATTENTION_IMPLEMENTATION = {"causal": "sdpa", "mask": "sdpa", "flex": "flex_attention", "varlen": "flash_attention_2"}

# Dense bf16 tensor-core peaks (FLOP/s, NVIDIA datasheets, without sparsity) for MFU, by a name's part; the most
# specific part wins ("H100 PCIe" before "H100", "L40S" before "L4"). CPUs have no single peak: MFU is n/a.
# The A10G (AWS g5) is not the A10: ~70 TF dense bf16 against the A10's 125. The H200 NVL (PCIe) runs at the
# H100 NVL's clocks: 835 TF, not the SXM H200's 989.
PEAK_FLOPS = {
    "H100 PCIE": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200 NVL": 835e12, "H200": 989e12, "GH200": 989e12,
    "B200": 2250e12, "A100": 312e12, "A10G": 70e12, "A10": 125e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
}  # fmt: skip


class TrainConfigError(ValueError):
    pass


def accumulation_steps(hp: TrainHyperparams, workers: int, section: str) -> int:
    """global batch = micro-batch × accumulation × workers, exactly (the recipe's 128)."""
    per_step = hp.micro_batch * workers
    if hp.global_batch % per_step:
        raise TrainConfigError(
            f"{section}.global_batch ({hp.global_batch}) must be a multiple of {section}.micro_batch ({hp.micro_batch}) × "
            f"workers ({workers}) = {per_step}; e.g. set {section}.micro_batch to a divisor of {hp.global_batch // workers}"
        )
    return hp.global_batch // per_step


def deepspeed_config(hp: TrainHyperparams, workers: int, section: str, bf16: bool, offload_optimizer: bool = False,
                     accumulation: int | None = None) -> dict:  # fmt: skip
    """`accumulation`: decided from the data when the global batch counts examples (packed blocks hold several)."""
    accum = accumulation or accumulation_steps(hp, workers, section)
    zero: dict = {"stage": hp.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if hp.zero_stage == 3:
        # ZeRO-3 shards the weights; gather them in 16 bit when the final model is saved.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": hp.micro_batch * accum * workers,
        "train_micro_batch_size_per_gpu": hp.micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": hp.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log metrics ourselves
        "wall_clock_breakdown": False,
    }


def one_row_layout(hp: TrainHyperparams) -> bool:
    """Packed instruction data without a dense mask (varlen, flex; `auto` on GPUs) takes a micro-batch as ONE row
    of micro_batch × max_len tokens of whole examples (each ≤ max_len, positions restarting): examples of
    1,000–2,000 tokens pack into it with ~1 % padding against ~8 % in max_len blocks (benchmarks/sft_packing.py),
    and neither path computes attention across examples. With the dense mask (CPU) attention cost grows with the
    square of the row, so rows stay max_len long and a micro-batch holds micro_batch of them."""
    if hp.packing != "packed":
        return False
    return hp.packed_attention in ("varlen", "flex") or (hp.packed_attention == "auto" and hp.use_gpu)


def packed_block_len(hp: TrainHyperparams) -> int:
    return hp.micro_batch * hp.max_len if one_row_layout(hp) else hp.max_len


def rows_per_batch(hp: TrainHyperparams) -> int:
    return 1 if one_row_layout(hp) else hp.micro_batch


def global_batch_accumulation(hp: TrainHyperparams, stats: dict, workers: int, rows: int, stage: str) -> tuple[int, float]:
    """(gradient accumulation, examples per optimizer step). The recipe's global batch of 128 counts examples and a
    packed block holds several, so by default (`global_batch_unit: examples`) the accumulation is chosen for about
    `global_batch` examples per step; `blocks` counts a block as one. Pretraining's unit is the block (the recipe's)."""
    if stage == "pretrain" or hp.packing == "pad_to_longest" or hp.global_batch_unit == "blocks":
        accum = accumulation_steps(hp, workers, stage)  # global batch = micro_batch × accumulation × workers, exactly
        per_row = 1.0 if stage == "pretrain" or hp.packing == "pad_to_longest" else stats["examples"] / max(1, stats["blocks"])
        return accum, accum * rows * workers * per_row
    per_row = stats["examples"] / max(1, stats["blocks"])
    accum = max(1, round(hp.global_batch / (per_row * rows * workers)))
    return accum, accum * rows * workers * per_row


def attention_for(hp: TrainHyperparams, stage: str, use_gpu: bool, has_flash_attn: bool | None = None) -> tuple[str, str]:
    """(attention path for asclepius.train.data.model_inputs, transformers' attention implementation).
    Pretraining blocks are one causal sequence each: no mask, so SDPA runs its flash kernel. Instruction data, by
    `packed_attention`: auto picks flash-attention varlen on GPU workers that have flash-attn, flex_attention on
    other GPUs, the dense mask on CPU. An explicit choice that cannot run here is refused, never replaced: varlen
    without flash-attn would attend across examples, flex has no backward on CPU."""
    if stage == "pretrain":
        return "causal", ATTENTION_IMPLEMENTATION["causal"]
    if has_flash_attn is None:
        import importlib.util

        has_flash_attn = importlib.util.find_spec("flash_attn") is not None
    path = hp.packed_attention
    if path == "auto":
        path = ("varlen" if has_flash_attn else "flex") if use_gpu else "mask"
    if path == "varlen" and not (use_gpu and has_flash_attn):
        raise RuntimeError(f"{stage}.packed_attention: varlen needs flash-attn on GPU workers (it is in the project's image; "
                           f"pip install flash-attn), or use packed_attention: auto")  # fmt: skip
    if path == "flex" and not use_gpu:
        raise RuntimeError(f"{stage}.packed_attention: flex needs GPU workers (flex_attention has no backward on CPU); use mask or auto")
    return path, ATTENTION_IMPLEMENTATION[path]


# What DeepSpeed writes per parameter at a checkpoint: the fp32 master weights and Adam's two moments (12 bytes),
# plus, under ZeRO-2, rank 0's bf16 module state (2 bytes); ZeRO-3's model-state files hold only partition metadata.
CHECKPOINT_BYTES_PER_PARAM = {2: 14, 3: 12}


def checkpoint_cost(n_params: float, zero_stage: int, nodes: int, gbit_per_s_per_node: float) -> tuple[float, float]:
    """(GB written per checkpoint, seconds to upload it) when every node uploads its ranks' shards at the given rate."""
    size_gb = n_params * CHECKPOINT_BYTES_PER_PARAM[zero_stage] / 1e9
    return size_gb, size_gb / nodes / (gbit_per_s_per_node / 8)


@dataclass(frozen=True)
class ModelShape:
    """What the memory of training depends on (a model's config.json)."""

    params: float
    hidden: int
    intermediate: int
    layers: int
    kv_dim: int  # num_key_value_heads × head_dim


# The base models the presets name, from their config.json (hub ids the presets use).
MODEL_SHAPES = {
    "huggyllama/llama-7b": ModelShape(6.74e9, 4096, 11008, 32, 4096),
    "huggyllama/llama-13b": ModelShape(13.0e9, 5120, 13824, 40, 5120),
    "meta-llama/Llama-3.1-8B": ModelShape(8.03e9, 4096, 14336, 32, 1024),
}


def model_shape(source: str) -> ModelShape | None:
    """The shape of a base model: a preset's hub id from MODEL_SHAPES, or a local directory's config.json (a Llama-,
    Qwen2- or Mistral-shaped decoder: attention with grouped key/value heads, a gated MLP, two norms per layer).
    None where it cannot be known without a download."""
    if source in MODEL_SHAPES:
        return MODEL_SHAPES[source]
    path = Path(source).expanduser() / "config.json"
    if not path.is_file():
        return None
    c = json.loads(path.read_text())
    c = c.get("text_config", c)
    try:
        hidden, inter, layers, heads, vocab = (int(c[k]) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                                    "num_attention_heads", "vocab_size"))  # fmt: skip
    except (KeyError, TypeError, ValueError):
        return None
    head_dim = int(c.get("head_dim") or hidden // heads)
    q, kv = heads * head_dim, int(c.get("num_key_value_heads") or heads) * head_dim
    bias = c.get("attention_bias", c.get("model_type") == "qwen2")  # Qwen2 biases q, k and v
    per_layer = hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * inter + 2 * hidden + ((q + 2 * kv) if bias else 0)
    embeddings = vocab * hidden * (1 if c.get("tie_word_embeddings", False) else 2)
    return ModelShape(float(layers * per_layer + embeddings + hidden), hidden, inter, layers, kv)


# GPU memory (GiB, as the driver reports it) by the accelerator_type Ray gives a node (ray.util.accelerators; the AWS
# node provider and KubeRay fill it in for GPU node types). Where one name covers two sizes (A100: 40 or 80 GB, V100:
# 16 or 32 GB) the larger: the fits check refuses only what cannot fit.
GPU_MEMORY_GIB = {"T4": 15.0, "V100": 32.0, "A10G": 22.5, "L4": 22.5, "L40S": 45.0, "A100": 80.0, "A100-40G": 40.0,
                  "A100-80G": 80.0, "H100": 79.6, "H200": 140.4}  # fmt: skip


def gpu_memory_gib(resources: dict[str, float]) -> tuple[str, float] | None:
    """(accelerator type, GiB) of a node's GPUs from its Ray resources, where its type is one we know."""
    for key in resources:
        if key.startswith("accelerator_type:") and key.split(":", 1)[1] in GPU_MEMORY_GIB:
            kind = key.split(":", 1)[1]
            return kind, GPU_MEMORY_GIB[kind]
    return None


LORA_TARGET_SHAPES = {  # (in, out) of each projection, from the shape
    "q_proj": lambda s: (s.hidden, s.hidden), "k_proj": lambda s: (s.hidden, s.kv_dim), "v_proj": lambda s: (s.hidden, s.kv_dim),
    "o_proj": lambda s: (s.hidden, s.hidden), "gate_proj": lambda s: (s.hidden, s.intermediate),
    "up_proj": lambda s: (s.hidden, s.intermediate), "down_proj": lambda s: (s.intermediate, s.hidden),
}  # fmt: skip


def trainable_params(shape: ModelShape, hp: TrainHyperparams) -> float:
    """Parameters the optimizer updates: all of them (full), or LoRA's A (r × in) and B (out × r) per target."""
    if hp.method == "full":
        return shape.params
    per_layer = sum(hp.lora.rank * sum(LORA_TARGET_SHAPES[t](shape)) for t in hp.lora.target_modules if t in LORA_TARGET_SHAPES)
    return per_layer * shape.layers


def model_state_gib_per_gpu(shape: ModelShape, hp: TrainHyperparams) -> float:
    """GPU memory of the model states per worker, activations apart (they follow micro_batch × max_len, and
    gradient checkpointing keeps them to one layer's): the weights — bf16 (2 bytes) or, for qlora, 4-bit NF4 with
    double-quantized constants (~0.52 bytes) — whole on every GPU, or a 1/N shard under ZeRO-3; the trainable
    parameters' bf16 gradients (2 bytes) and AdamW's fp32 master weights and two moments (12 bytes), a 1/N shard
    each under ZeRO-2 and -3 (none on the GPU with offload_optimizer)."""
    n, t, workers = shape.params, trainable_params(shape, hp), hp.num_workers
    weight_bytes = 0.52 if hp.method == "qlora" else 2
    weights = n * weight_bytes / (workers if hp.zero_stage == 3 else 1)
    gradients = t * 2 / workers
    optimizer = 0 if hp.offload_optimizer else t * 12 / workers
    return (weights + gradients + optimizer) / 2**30


def lr_at(step: int, total_steps: int, hp: TrainHyperparams) -> float:
    """Linear warmup over warmup_ratio of the steps, then the scheduler (cosine to 0, linear to 0, or constant)."""
    warmup = math.ceil(total_steps * hp.warmup_ratio)
    if step < warmup:
        return hp.lr * (step + 1) / warmup
    if hp.lr_scheduler == "constant":
        return hp.lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    if hp.lr_scheduler == "linear":
        return hp.lr * max(0.0, 1 - progress)
    return hp.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: float, weight_grads: bool = True) -> float:
    """Training FLOPs per token: 6·N for the matmuls (forward + backward) + 12·L·H·T for attention (PaLM, App. B),
    T the span a token attends over — for packed examples their own length (data.attention_seq_len), not the block.
    A frozen base (LoRA) computes no weight gradients: 4·N (forward, and the backward to the activations)."""
    return (6 if weight_grads else 4) * n_params + 12 * n_layers * hidden * seq_len


def peak_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    name = device_name.upper().replace("-", " ")
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if re.search(rf"\b{re.escape(key)}\b", name):
            return PEAK_FLOPS[key]
    return None


def torch_extensions_dir() -> str:
    """Where DeepSpeed's JIT-built ops (CPU Adam) are kept: one folder per Python environment, because a build names
    its environment's include paths and torch; two environments sharing one folder rebuild it for each other."""
    from asclepius.models import cache_dir

    tag = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:12]
    return str(cache_dir() / "torch_extensions" / f"py{sys.version_info[0]}{sys.version_info[1]}-{tag}")
