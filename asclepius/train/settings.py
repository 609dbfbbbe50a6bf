"""DeepSpeed config, learning-rate schedule and FLOPs accounting — built from our config, checked up front."""

from __future__ import annotations

import math
import re

from asclepius.config import TrainHyperparams

# Dense bf16 tensor-core peaks (FLOP/s, NVIDIA datasheets, without sparsity) for MFU, by a name's part; the most
# specific part wins ("H100 PCIe" before "H100", "L40S" before "L4"). CPUs have no single peak: MFU is n/a.
PEAK_FLOPS = {
    "H100 PCIE": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12,
    "A100": 312e12, "A10G": 125e12, "A10": 125e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
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


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: float) -> float:
    """Training FLOPs per token: 6·N for the matmuls (forward + backward) + 12·L·H·T for attention (PaLM, App. B),
    T the span a token attends over — for packed examples their own length (data.attention_seq_len), not the block."""
    return 6 * n_params + 12 * n_layers * hidden * seq_len


def peak_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    name = device_name.upper().replace("-", " ")
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if re.search(rf"\b{re.escape(key)}\b", name):
            return PEAK_FLOPS[key]
    return None


def torch_extensions_dir() -> str:
    from asclepius.models import cache_dir

    return str(cache_dir() / "torch_extensions")
