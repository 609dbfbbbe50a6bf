"""The models hospitals train today, without downloads: tiny Llama-3-, Qwen2- and Mistral-shaped models with their
families' fast tokenizers through pretraining blocks, instruction tuning, export and /v1/answer's generation; and
LoRA through the loop (one process, DeepSpeed on CPU): only the adapter trains, the checkpoint holds it alone, a
resume continues it, the merged export generates what base + adapter generate."""

import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported in this process

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from asclepius.config import ConfigError, config_from_dict  # noqa: E402
from asclepius.models import load_model, load_tokenizer, resolve_model_source, ships_recipe_tokenizer  # noqa: E402
from asclepius.recipe import load_recipe  # noqa: E402
from asclepius.serve.engine import Engine, GenRequest  # noqa: E402
from asclepius.train.adapters import merged_state_dict  # noqa: E402
from asclepius.train.adapters import add_adapter  # noqa: E402
from asclepius.train.data import collate, epoch_rows, instruction_example, model_inputs, packed_table, pretraining_blocks, pretraining_table  # noqa: E402
from asclepius.train.loop import CHECKPOINT_TAG, TrainContext, next_token_loss, train  # noqa: E402
from asclepius.train.settings import torch_extensions_dir  # noqa: E402

os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())

FAMILIES = ["tiny-llama3", "tiny-qwen2", "tiny-mistral"]
QA = [("Pt w/ CHF, EF 35%. Discharged on furosemide.", "What is the EF?", "The ejection fraction was 35%."),
      ("DKA, glucose 542 on arrival, insulin drip.", "What was the glucose?", "Glucose was 542 on arrival."),
      ("CABG x3 complicated by atrial fibrillation.", "Which arrhythmia?", "Atrial fibrillation after CABG."),
      ("Laparoscopic cholecystectomy, uneventful.", "Which surgery?", "A laparoscopic cholecystectomy.")]  # fmt: skip


def hyperparams(**over):
    base = {"micro_batch": 1, "global_batch": 1, "lr": 3e-3, "warmup_ratio": 0.0, "max_len": 256, "epochs": 50, "zero_stage": 2,
            "gradient_checkpointing": False, "lr_scheduler": "constant", **over}  # fmt: skip
    return config_from_dict({"run_dir": "/tmp/x", "notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]}, "finetune": base}).finetune


def batches_of(rows):
    def batches(epoch, first):
        order = epoch_rows(len(rows), 0, epoch, 0, 1, len(rows))
        for k in range(first, len(rows)):
            yield collate([rows[order[k]]])

    return batches


def instruction_rows(tok):
    examples = [instruction_example(tok, load_recipe().model_prompt, n, q, a, 256) for n, q, a in QA]
    assert all(examples)
    return packed_table(examples, 256, tok.eos_token_id).to_pylist()


def answer(model, tok, note, question, max_tokens=12):
    prompt = load_recipe().model_prompt.format(note=note, question=question)
    from asclepius.models import text_prompt_ids

    return Engine(model, tok).generate([GenRequest(text_prompt_ids(tok, prompt), max_tokens, temperature=0)])[0][0]


# ----------------------------------------------------------------------------------------------- families
@pytest.mark.parametrize("source", FAMILIES)
def test_each_family_ships_its_own_fast_tokenizer_and_conventions(source):
    path = resolve_model_source(source)
    config = json.loads(open(os.path.join(path, "config.json")).read())
    tok = load_tokenizer(source)
    assert tok.is_fast and not ships_recipe_tokenizer(path) and not os.path.exists(os.path.join(path, "tokenizer.model"))
    text = "Pt w/ h/o HTN — résumé 2021-03-04; Na 128 → 135."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text  # byte-level or byte fallback: nothing is unknown
    if source == "tiny-qwen2":  # Qwen2 has no bos: nothing is prepended, eos ends the text
        assert tok.bos_token_id is None and config["model_type"] == "qwen2" and ids[0] != tok.eos_token_id
    else:  # Llama-3 (<|begin_of_text|>) and Mistral (<s>) prepend their bos
        assert ids[0] == tok.bos_token_id == config["bos_token_id"]
    assert tok.eos_token_id == config["eos_token_id"]
    # pretraining's layout: [bos] note [eos] ... — eos alone between notes where the family has no bos
    notes = [tok(t, add_special_tokens=False)["input_ids"] for t in ("Note one.", "Note two.")]
    stream = pretraining_blocks(notes, tok.bos_token_id, tok.eos_token_id, 4)[0]
    assert (stream[0] == tok.bos_token_id) if tok.bos_token_id is not None else (stream[: len(notes[0])] == notes[0][:4])


@pytest.mark.parametrize("source", ["tiny-qwen2", "tiny-mistral"])
def test_each_family_pretrains_on_its_notes(source):
    """Continued pretraining's blocks in the family's own layout (Qwen2: eos alone between notes), loss falling."""
    from asclepius.train.data import pretraining_table

    tok = load_tokenizer(source)
    notes = [n * 3 for n, _, _ in QA]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in notes]
    blocks = pretraining_blocks(ids, tok.bos_token_id, tok.eos_token_id, 32)
    assert len(blocks) >= 4 and (tok.bos_token_id is not None) == (blocks[0][0] == tok.bos_token_id)
    rows = pretraining_table(blocks).to_pylist()
    hp = config_from_dict({"run_dir": "/tmp/x", "notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]},
                           "pretrain": {"micro_batch": 1, "global_batch": 1, "lr": 3e-3, "warmup_ratio": 0.0, "max_len": 32, "epochs": 50,
                                        "zero_stage": 2, "gradient_checkpointing": False, "lr_scheduler": "constant"}}).pretrain  # fmt: skip
    result = train(load_model(source), batches_of(rows), len(rows), hp, "pretrain", TrainContext(), packed_attention="causal", max_steps=24)
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def test_the_recipes_slow_tokenizer_stays_the_default_for_llama_1_only(tmp_path):
    def model_dir(name, model_type, vocab, sentencepiece):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": vocab}))
        if sentencepiece:
            (d / "tokenizer.model").write_bytes(b"sp")
        (d / "tokenizer.json").write_text("{}")
        return str(d)

    assert ships_recipe_tokenizer(model_dir("llama1", "llama", 32000, True))  # huggyllama/llama-7b: the recipe's slow one
    assert not ships_recipe_tokenizer(model_dir("llama3", "llama", 128256, False))  # Llama-3: byte-level BPE, fast
    assert not ships_recipe_tokenizer(model_dir("mistral", "mistral", 32768, True))  # Mistral ships SentencePiece too: fast
    assert not ships_recipe_tokenizer(model_dir("qwen2", "qwen2", 151936, False))
    assert config_from_dict({"run_dir": "/tmp/x", "notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]},
                             "model": {"base": "tiny-qwen2"}}).model.use_fast_tokenizer is None  # auto  # fmt: skip


@pytest.mark.parametrize("source", FAMILIES)
def test_each_family_fine_tunes_exports_and_answers(source, tmp_path):
    tok = load_tokenizer(source)
    rows = instruction_rows(tok)
    out = tmp_path / "final"
    result = train(load_model(source), batches_of(rows), len(rows), hyperparams(), "finetune", TrainContext(), export_dir=str(out),
                   tokenizer=tok, max_steps=48)  # fmt: skip
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, losses  # the loss falls on the family's own tokens
    served_tok = load_tokenizer(str(out))
    assert served_tok.is_fast and served_tok.bos_token_id == tok.bos_token_id  # served as trained
    from asclepius.console import model_answer

    text = model_answer(str(out), QA[0][0], QA[0][1], max_tokens=16)  # as /v1/answer gives it: greedy, stop markers, loop cut
    # the export, served with its tokenizer, gives the answer it learnt (tiny models may miss a digit) and stops at eos
    assert text.strip().startswith("The ejection fraction") and len(text.strip()) <= len(QA[0][2]) + 8, text


# ----------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("source", FAMILIES)
def test_the_loss_projects_only_the_labelled_positions_and_is_transformers_own(source):
    tok = load_tokenizer(source)
    torch.manual_seed(0)
    models = {"full": load_model(source), "lora": add_adapter(load_model(source), lora_hp())}
    examples = [instruction_example(tok, load_recipe().model_prompt, n, q, a, 256) for n, q, a in QA]
    alone = [packed_table([ex], len(ex), tok.eos_token_id).to_pylist()[0] for ex in examples]  # rows of their own lengths
    pretraining = pretraining_table(pretraining_blocks([tok.encode(" ".join(n for n, _, _ in QA))], tok.bos_token_id, tok.eos_token_id, 32))
    batches = {"two rows, answers at different places": collate(alone[:2]), "four examples packed in a row": collate(instruction_rows(tok)[:1]),
               "a pretraining block": collate(pretraining.to_pylist()[:1])}  # fmt: skip
    for kind, model in models.items():
        model.train(False)  # (no dropout: the two computations see the same network)
        projected_rows = []
        model.get_output_embeddings().register_forward_hook(lambda m, args, out: projected_rows.append(args[0].shape[:-1].numel()))
        for name, batch in batches.items():
            inputs = model_inputs(batch, torch.float32, "mask")
            model.zero_grad()
            expected = model(**inputs).loss  # transformers' ForCausalLMLoss over logits at every position
            expected.backward()
            expected_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
            model.zero_grad()
            loss, projected = next_token_loss(model, dict(inputs))
            loss.backward()
            assert torch.allclose(loss, expected, atol=1e-5), (kind, name)
            assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip([p for p in model.parameters() if p.requires_grad], expected_grads)), (kind, name)
            labels, (rows, length) = batch["labels"], batch["labels"].shape
            next_labelled = (labels[:, 1:] != -100).any(0)  # positions whose next token is learned, in any row
            assert projected_rows[-1] == projected == rows * int(next_labelled.sum()), (kind, name)
            if name == "a pretraining block":
                assert projected == rows * (length - 1)  # every position but the last
            else:
                assert projected < 0.5 * rows * length  # the notes and questions are not projected


def lora_hp(**over):
    return hyperparams(**{"method": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}, "lr": 1e-2, **over})


def test_lora_trains_the_adapter_alone_and_its_loss_falls(tmp_path):
    tok = load_tokenizer("tiny-llama3")
    rows = instruction_rows(tok)
    model = load_model("tiny-llama3")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = TrainContext(checkpoint_root=str(tmp_path / "ckpt"))
    result = train(model, batches_of(rows), len(rows), lora_hp(), "finetune", ctx, max_steps=24, checkpoint_every=12)
    losses = [h["loss"] for h in result.history]
    # a frozen base gives the same loss every epoch on the same 4 examples; the adapter alone lowers it (~0.9 nats here:
    # a random tiny base with frozen embeddings learns slowly)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses
    trained = model.state_dict()  # peft wrapped the model in place: base weights under base_layer
    for name, before in base.items():
        stem, _, kind = name.rpartition(".")
        key = name if name in trained else f"{stem}.base_layer.{kind}"  # an adapted layer keeps its weight as base_layer
        assert torch.equal(trained[key], before), f"{name} changed: the base must stay frozen"
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: the adapter learnt
    # the checkpoint holds the adapter alone
    states = [f for f in os.listdir(tmp_path / "ckpt" / "step-000024" / CHECKPOINT_TAG) if "model_states" in f]
    module = torch.load(tmp_path / "ckpt" / "step-000024" / CHECKPOINT_TAG / states[0], map_location="cpu", weights_only=False)["module"]
    assert module and all("lora_" in k for k in module), sorted(module)[:5]


def test_a_resumed_lora_run_continues_the_adapter(tmp_path):
    tok = load_tokenizer("tiny-llama3")
    rows = instruction_rows(tok)
    whole = train(load_model("tiny-llama3"), batches_of(rows), len(rows), lora_hp(), "finetune", TrainContext(), max_steps=8)
    ctx = lambda: TrainContext(checkpoint_root=str(tmp_path / "ckpt"))  # noqa: E731
    train(load_model("tiny-llama3"), batches_of(rows), len(rows), lora_hp(), "finetune", ctx(), max_steps=4, checkpoint_every=4)
    resumed = train(load_model("tiny-llama3"), batches_of(rows), len(rows), lora_hp(), "finetune", ctx(), max_steps=8)
    assert resumed.resumed_from == 4 and resumed.final_step == 8
    # the adapter and its optimizer state came back: the steps after the kill are the uninterrupted run's
    after = [h["loss"] for h in resumed.history]
    assert after == pytest.approx([h["loss"] for h in whole.history[4:]], rel=1e-4)


@pytest.mark.parametrize("export,zero_stage", [("merged", 2), ("adapter", 2), ("merged", 3)])
def test_the_export_generates_what_base_plus_adapter_generate(export, zero_stage, tmp_path):
    tok = load_tokenizer("tiny-qwen2")
    rows = instruction_rows(tok)
    model = load_model("tiny-qwen2")
    hp = lora_hp(lora={"rank": 8, "alpha": 16, "dropout": 0.0, "export": export}, zero_stage=zero_stage)
    train(model, batches_of(rows), len(rows), hp, "finetune", TrainContext(), export_dir=str(tmp_path / "final"), tokenizer=tok, max_steps=12)
    files = set(os.listdir(tmp_path / "final"))
    if export == "adapter":
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "config.json" not in files
        assert all("lora_" in k for k in load_file(tmp_path / "final" / "adapter_model.safetensors"))
    else:
        assert "config.json" in files and "adapter_config.json" not in files
    model.eval()
    expected = answer(model, tok, QA[1][0], QA[1][1])  # the trained base + adapter
    served = load_model(str(tmp_path / "final"))  # merged weights, or base + adapter put together by load_model
    assert answer(served, load_tokenizer(str(tmp_path / "final")), QA[1][0], QA[1][1]) == expected
    if export == "merged":  # and peft's own merge math (each LoRA layer's delta weight) agrees with ours
        ours = served.state_dict()
        adapted = [(name, m) for name, m in model.named_modules() if hasattr(m, "base_layer") and hasattr(m, "get_delta_weight")]
        assert len(adapted) == 2 * 7  # every projection of both layers
        import contextlib

        import deepspeed

        # under ZeRO-3 the training module's weights are partitioned: gathered to compare (the export gathered them too)
        gathered = deepspeed.zero.GatheredParameters(list(model.parameters())) if zero_stage == 3 else contextlib.nullcontext()
        with gathered:
            for name, layer in adapted:
                theirs = layer.base_layer.weight + layer.get_delta_weight("default")
                assert torch.allclose(ours[f"{name}.weight"], theirs, atol=1e-6), name


def test_merged_state_dict_is_loras_update():
    a, b, w = torch.randn(4, 16), torch.randn(8, 4), torch.randn(8, 16)
    state = {"base_model.model.layer.q_proj.base_layer.weight": w, "base_model.model.layer.q_proj.lora_A.default.weight": a,
             "base_model.model.layer.q_proj.lora_B.default.weight": b, "base_model.model.norm.weight": torch.ones(16)}  # fmt: skip
    merged = merged_state_dict(state, 2.0)
    assert set(merged) == {"layer.q_proj.weight", "norm.weight"}
    assert torch.allclose(merged["layer.q_proj.weight"], w + 2.0 * b @ a)


def test_lora_settings_are_validated_naming_the_field():
    with pytest.raises(ConfigError, match="qlora"):
        hyperparams(method="qlora", lora={"export": "adapter"})  # 4-bit needs GPU workers
    with pytest.raises(ConfigError, match="lora.export"):
        hyperparams(method="qlora", use_gpu=True)
    with pytest.raises(ConfigError, match="rank"):
        hyperparams(method="lora", lora={"rank": 0})


def test_the_readmes_memory_per_gpu_is_what_the_presets_and_the_estimate_say():
    import re
    from pathlib import Path

    from asclepius.config import load_config
    from asclepius.train.settings import MODEL_SHAPES, model_state_gib_per_gpu, trainable_params

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    rows = re.findall(r"^\s*\| (LLaMA-7B|LLaMA-13B|Llama-3\.1-8B)[^|]* \| (full|lora|qlora) \| (\d) \| (\d) \| ([\d,]+) M \| ([\d.]+) GiB \|", readme, re.M)
    assert len(rows) == 7
    shape_of = {"LLaMA-7B": "huggyllama/llama-7b", "LLaMA-13B": "huggyllama/llama-13b", "Llama-3.1-8B": "meta-llama/Llama-3.1-8B"}
    for base, method, gpus, zero, trainable, gib in rows:
        lora = {"export": "adapter"} if method == "qlora" else {}
        hp = hyperparams(method=method, num_workers=int(gpus), zero_stage=int(zero), use_gpu=True, lora=lora)
        shape = MODEL_SHAPES[shape_of[base]]
        assert (round(trainable_params(shape, hp) / 1e6), round(model_state_gib_per_gpu(shape, hp), 1)) == (int(trainable.replace(",", "")), float(gib))
    preset = load_config(root / "configs" / "asclepius-lora-8b.yaml")
    assert preset.model.base in MODEL_SHAPES and preset.model.use_fast_tokenizer is None
    for stage in (preset.pretrain, preset.finetune):
        assert stage.method == "lora" and stage.lora.export == "merged" and stage.use_gpu and stage.zero_stage == 2
        assert round(model_state_gib_per_gpu(MODEL_SHAPES[preset.model.base], stage), 1) == 15.0  # the preset's row
