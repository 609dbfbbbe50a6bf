import math

import pytest

from asclepius.config import config_from_dict
from asclepius.train.settings import TrainConfigError, accumulation_steps, deepspeed_config, flops_per_token, lr_at, peak_flops

CFG = config_from_dict({"run_dir": "/tmp/x", "notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]},
                        "pretrain": {"micro_batch": 4, "zero_stage": 3, "num_workers": 8}})  # fmt: skip


def test_global_batch_is_checked_with_a_clear_error():
    assert accumulation_steps(CFG.pretrain, 8, "pretrain") == 4  # 128 = 4 × 4 × 8
    with pytest.raises(TrainConfigError, match=r"pretrain.global_batch \(128\) must be a multiple of pretrain.micro_batch \(4\) × workers \(6\)"):
        accumulation_steps(CFG.pretrain, 6, "pretrain")


def test_deepspeed_config_from_our_settings():
    ds = deepspeed_config(CFG.pretrain, 8, "pretrain", bf16=True, offload_optimizer=True)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (128, 4, 4)
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and ds["bf16"] == {"enabled": True}
    assert ds["gradient_clipping"] == 1.0
    two = deepspeed_config(CFG.finetune.model_copy(update={"zero_stage": 2, "micro_batch": 16}), 8, "finetune", bf16=False)
    assert two["zero_optimization"] == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True} and two["gradient_accumulation_steps"] == 1


def test_cosine_schedule_with_warmup():
    hp = CFG.pretrain  # lr 2e-5, 3 % warmup, cosine
    total = 100
    assert lr_at(0, total, hp) == pytest.approx(2e-5 / 3) and lr_at(2, total, hp) == pytest.approx(2e-5)
    assert lr_at(3, total, hp) == pytest.approx(2e-5)
    assert lr_at(51, total, hp) == pytest.approx(1e-5, rel=0.02)
    assert lr_at(99, total, hp) < 1e-8 + 2e-5 * (1 - math.cos(math.pi / 97)) and lr_at(99, total, hp) >= 0


def test_flops_and_peaks():
    assert flops_per_token(7_000_000_000, 32, 4096, 2048) == 6 * 7e9 + 12 * 32 * 4096 * 2048
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops(None) is None and peak_flops("cpu") is None
    # the most specific name wins: an L40S is not an L4, an H100 PCIe not an SXM part
    assert peak_flops("NVIDIA L40S") == 362e12 and peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("NVIDIA H100 NVL") == 835e12 and peak_flops("NVIDIA H200") == 989e12
    # an H200 NVL is clocked as an H100 NVL; an A10G (AWS g5) is not an A10
    assert peak_flops("NVIDIA H200 NVL") == 835e12 and peak_flops("NVIDIA A10G") == 70e12 and peak_flops("NVIDIA A10") == 125e12


def test_adamw_is_the_recipes_and_offload_takes_deepspeeds_cpu_adam():
    import torch

    from asclepius.models import load_model
    from asclepius.train.loop import compute_params, make_optimizer

    assert CFG.finetune.adam_betas == (0.9, 0.999) and CFG.finetune.adam_eps == 1e-8  # HF Trainer's defaults
    model = load_model("tiny")
    opt = make_optimizer(model, CFG.finetune, "cpu")
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)
    custom = CFG.finetune.model_copy(update={"adam_betas": (0.9, 0.95)})
    assert make_optimizer(model, custom, "cpu").defaults["betas"] == (0.9, 0.95)
    # tied embeddings: the one matrix is the LM head's matmul, counted once
    assert compute_params(model) == sum(p.numel() for p in model.parameters()) - (
        0 if model.config.tie_word_embeddings else model.get_input_embeddings().weight.numel())


def test_the_global_batch_counts_examples_as_the_recipe_did():
    from asclepius.train.settings import global_batch_accumulation

    ft = config_from_dict({"run_dir": "/tmp/x", "notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]},
                           "finetune": {"micro_batch": 1, "num_workers": 8}}).finetune  # fmt: skip
    stats = {"examples": 158_000, "blocks": 100_000}  # 1.58 packed examples per block
    accum, per_step = global_batch_accumulation(ft, stats, workers=8, rows=1, stage="finetune")
    assert accum == 10 and abs(per_step - 126.4) < 0.1  # ~128 examples per step, not 128 blocks (~202 examples)
    blocks = ft.model_copy(update={"global_batch_unit": "blocks"})
    assert global_batch_accumulation(blocks, stats, workers=8, rows=1, stage="finetune")[0] == 16  # 128 blocks per step
    pre = CFG.pretrain  # the recipe's pretraining counts blocks of max_len
    assert global_batch_accumulation(pre, {"examples": 5, "blocks": 9}, workers=8, rows=4, stage="pretrain") == (4, 128.0)
