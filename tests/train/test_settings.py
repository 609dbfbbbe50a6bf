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
