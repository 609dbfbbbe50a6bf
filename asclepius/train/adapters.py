"""LoRA / QLoRA through peft: which parameters train, what a checkpoint holds, what the export is.

With `method: lora` the base model is frozen and a LoRA adapter is added to `lora.target_modules`; only the adapter's
parameters reach the optimizer (make_optimizer takes those that require grad), so Adam's states and the gradients
cover ~1% of the model, and DeepSpeed's checkpoints hold the adapter alone (`exclude_frozen_parameters`): the base
is read again from its source on resume. `qlora` loads the base in 4 bits (NF4, bitsandbytes, GPUs only) first.
The export is either the base with the adapter merged in (plain HF weights, served like any model) or the adapter
alone (`adapter_config.json` + weights; `asclepius.models.load_model` puts it on its base).
"""

from __future__ import annotations

import os

from asclepius.config import TrainHyperparams

ADAPTER_CONFIG = "adapter_config.json"


def uses_adapter(hp: TrainHyperparams) -> bool:
    return hp.method in ("lora", "qlora")


def quantization_config(hp: TrainHyperparams):
    """The 4-bit load of QLoRA (Dettmers et al., 2023: NF4, double quantization, bf16 compute), or None."""
    if hp.method != "qlora":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise RuntimeError("method: qlora needs bitsandbytes on the GPU workers (pip install bitsandbytes)") from err
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)


def add_adapter(model, hp: TrainHyperparams):
    """The model with a fresh LoRA adapter; the base's parameters no longer require grad."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if hp.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=hp.gradient_checkpointing)
    import torch

    lora = hp.lora
    torch.manual_seed(hp.seed)  # A's random init: the same adapter in every attempt and on every rank (B starts at zero)
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
                        bias="none", task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, config)
    if hp.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad when the embeddings are frozen
    return model


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts (ZeRO-3 partitions report their full size)."""

    def numel(p):
        return p.ds_numel if hasattr(p, "ds_numel") else p.numel()

    params = list(model.parameters())
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)


def merged_state_dict(state: dict, scaling: float, adapter: str = "default") -> dict:
    """peft's state dict (base_model.model.<name>.base_layer.weight, ...lora_A/lora_B) → the base's own names, each
    adapted weight W + scaling · B·A (LoRA's merge, computed in fp32)."""
    prefix = "base_model.model."
    out = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        name = key[len(prefix):] if key.startswith(prefix) else key
        if ".base_layer." in key:
            stem = key.rsplit(".base_layer.", 1)[0]
            name = name.replace(".base_layer.", ".")
            a, b = state.get(f"{stem}.lora_A.{adapter}.weight"), state.get(f"{stem}.lora_B.{adapter}.weight")
            if a is not None and b is not None and key.endswith(".weight"):
                value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
        out[name] = value
    return out


def export_adapter_model(module, hp: TrainHyperparams, zero_stage: int, export_dir: str, rank: int, shard_size: str) -> None:
    """Rank 0 writes the adapter alone or the merged model. Under ZeRO-3 the weights are gathered first (a collective:
    every rank takes part), one module at a time, into rank 0's CPU memory."""
    import contextlib

    import torch

    def gathered(params):
        if zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    state = {}
    for name, sub in module.named_modules():  # module by module: never the whole model at once on every GPU
        own = dict(sub.named_parameters(recurse=False))
        if not own:
            continue
        with gathered(list(own.values())):
            if rank == 0:
                for pname, p in own.items():
                    state[f"{name}.{pname}" if name else pname] = p.detach().to("cpu", copy=True)
    if rank != 0:
        return
    os.makedirs(export_dir, exist_ok=True)
    if hp.lora.export == "adapter":
        from peft import get_peft_model_state_dict

        adapter_state = get_peft_model_state_dict(module, state_dict=state)
        module.peft_config["default"].save_pretrained(export_dir)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in adapter_state.items()}, os.path.join(export_dir, "adapter_model.safetensors"))
        return
    from transformers import AutoModelForCausalLM

    base = module.get_base_model()
    merged = merged_state_dict(state, hp.lora.alpha / hp.lora.rank)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(base.config)
    plain.load_state_dict(merged, strict=False, assign=True)
    plain.tie_weights()
    missing = [k for k, v in plain.state_dict().items() if v.is_meta]
    if missing:
        raise RuntimeError(f"the merged export lacks {missing[:5]}")
    plain.config.use_cache = True
    plain.save_pretrained(export_dir, safe_serialization=True, max_shard_size=shard_size)
