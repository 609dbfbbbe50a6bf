"""Does a replica's KV budget fit its GPU? Checked when the replica starts, before it takes a request.

The engine keeps one K and one V vector per layer, KV head and token for every row of the running batch, and admits
rows while rows × longest (prompt + max_tokens) stays within `max_batch_tokens`. A budget larger than the memory
left after the weights is not a slow replica but one that dies with CUDA out-of-memory under load — so it is refused
at start with the largest budget that would fit."""

from __future__ import annotations

GIB = 1 << 30
HEADROOM = 0.15  # share of the free memory kept for activations, the allocator's fragmentation and CUDA graphs


class ReplicaDoesNotFit(ValueError):
    pass


def kv_bytes_per_token(model_config, dtype_bytes: int = 2) -> int:
    """K and V, every layer, every KV head (grouped-query attention shares them): 2·L·H_kv·d_head·bytes.
    LLaMA-7B in bf16: 2·32·32·128·2 = 512 KiB per token; LLaMA-13B: 800 KiB."""
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return 2 * model_config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def largest_budget(model_config, free_bytes: int, dtype_bytes: int = 2) -> int:
    """The largest max_batch_tokens whose KV cache fits in `free_bytes` (memory left after the weights)."""
    return max(0, int(free_bytes * (1 - HEADROOM)) // kv_bytes_per_token(model_config, dtype_bytes))


def check_kv_budget(name: str, model_config, max_batch_tokens: int, free_bytes: int, dtype_bytes: int = 2) -> None:
    need = max_batch_tokens * kv_bytes_per_token(model_config, dtype_bytes)
    fits = largest_budget(model_config, free_bytes, dtype_bytes)
    if max_batch_tokens > fits:
        raise ReplicaDoesNotFit(
            f"serve.models ({name}).max_batch_tokens {max_batch_tokens} needs {need / GIB:.1f} GiB of KV cache; the GPU has "
            f"{free_bytes / GIB:.1f} GiB free after the weights ({HEADROOM:.0%} kept for activations): set max_batch_tokens "
            f"to at most {fits}, or serve on a larger GPU"
        )
