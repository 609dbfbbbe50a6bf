"""Configuration: pydantic models for every stage, YAML presets, and `key.sub=value` overrides.

Every value that comes from the Asclepius recipe has the recipe's value as its default (read from
asclepius/recipe/, never retyped), so a preset only states what differs from the recipe.
Unknown fields are errors (a typo in a preset must not silently fall back to a default), and every error names
the field by its dotted path, e.g. `notes.sources.0.kind`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from asclepius.recipe import load_recipe

_RECIPE = load_recipe()


RUN_DIR_VARIABLE = "${run_dir}"
PLACEHOLDER = "YOUR-"  # what the presets write where only the user knows the value (bucket, Azure resource, registry)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending field(s)."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------------- Ray
class NodeTypeConfig(StrictModel):
    resources: dict[str, float] = Field(description="What one node of the type offers Ray, e.g. {CPU: 96, GPU: 8, train_node: 8}.")
    max_workers: int = Field(ge=0, description="How many of them the autoscaler may start.")


class RayConfig(StrictModel):
    address: str | None = Field(
        None, description="Ray address to connect to ('auto', 'ray://...'); None starts a local instance."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local instance (None: all).")
    object_store_memory_mb: int | None = Field(None, ge=75)
    include_dashboard: bool = False
    check_fits: bool = Field(True, description="Before the first stage, check that every stage's workers, replicas and "
                             "actors fit the nodes the cluster has or its autoscaler can add (asclepius/fits.py).")
    node_types: dict[str, NodeTypeConfig] | None = Field(
        None, description="The node types the cluster's autoscaler can add, for the fits check, when it cannot read them "
        "itself (it reads the cluster launcher's config on the head and KubeRay's RayCluster). {} declares a cluster "
        "that adds no nodes: only the nodes it has count.",
    )
    preflight_timeout_s: float = Field(
        900.0, gt=0, description="Before the first stage, how long the key-file check may wait for a node of each type "
        "that reads a key (on a cluster that scales from zero, the node is started for it).",
    )


class LeaseConfig(StrictModel):
    """One driver per run directory (asclepius/lease.py)."""

    heartbeat_s: float = Field(30.0, gt=0, description="How often the driver renews its lease on the run directory.")
    stale_after_s: float = Field(300.0, gt=0, description="A lease not renewed for this long is taken over (its driver is gone).")


class StorageConfig(StrictModel):
    endpoint_url: str | None = Field(
        None, pattern=r"^https?://[^\s/]+(/\S*)?$", description="S3-compatible endpoint for an s3:// run_dir (MinIO, Ceph, a local test server); exported as "
        "AWS_ENDPOINT_URL to the driver and every Ray worker. Credentials are never in the config: they come from the "
        "usual AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, the node's instance role, IRSA).",
    )
    region: str | None = Field(None, description="Object storage region (exported as AWS_REGION).")


# --------------------------------------------------------------------------------------------------- notes
SourceKind = Literal["mimic3", "mimic4", "pmc", "generic"]
CREDENTIALED_KINDS = ("mimic3", "mimic4")


class NoteSourceConfig(StrictModel):
    kind: SourceKind
    path: str = Field(
        description="A file, a directory of files, a glob, or `sample:<kind>` for the bundled fictional samples. "
        "Local paths or pyarrow filesystem URIs (s3://, gs://). CSV may be gzip-compressed (.csv.gz)."
    )
    name: str | None = Field(None, description="Value of the `source` column; defaults to `kind`.")
    format: Literal["auto", "csv", "jsonl", "json", "parquet"] = "auto"
    # generic sources: which column holds the note, which its id, what else to keep (into `extra`)
    text_column: str | None = None
    id_column: str | None = None
    keep_columns: list[str] = Field(default_factory=list)
    # MIMIC-III: the recipe keeps CATEGORY == "Discharge summary" and removes its 517 evaluation ROW_IDs
    keep_categories: list[str] = Field(default_factory=lambda: [load_recipe().raw["mimic3_filter"]["keep_category"]])
    exclude_row_ids_file: str | None = Field(
        None, description="File of ROW_IDs to exclude (one per line); None uses the recipe's 517 ids."
    )
    drop_iserror: bool = True
    # MIMIC-IV-Note: discharge notes have note_type DS
    keep_note_types: list[str] = Field(default_factory=lambda: ["DS"])
    credentialed: bool | None = Field(
        None,
        description="Notes under a data use agreement (PhysioNet credentialed access): every row and everything made "
        "from it carries the flag, and the privacy guard refuses to send them to the public OpenAI API. None: true "
        "for mimic3/mimic4, false otherwise — set true for your own hospital's notes.",
    )

    @property
    def source_name(self) -> str:
        return self.name or self.kind

    @property
    def is_credentialed(self) -> bool:
        return self.credentialed if self.credentialed is not None else self.kind in CREDENTIALED_KINDS

    @model_validator(mode="after")
    def _mimic_is_credentialed(self) -> NoteSourceConfig:
        if self.kind in CREDENTIALED_KINDS and self.credentialed is False:
            raise ValueError(f"credentialed: {self.kind} notes are credentialed data (PhysioNet DUA); it cannot be false")
        return self

    @model_validator(mode="after")
    def _generic_needs_text_column(self) -> NoteSourceConfig:
        if self.kind == "generic" and not self.text_column:
            raise ValueError("a generic source needs `text_column` (the column holding the note text)")
        return self


class NotesConfig(StrictModel):
    sources: list[NoteSourceConfig] = Field(min_length=1)
    deid_tag_map: dict[str, str] = Field(default_factory=lambda: dict(_RECIPE.deid_tag_map))
    deid_fallback_tag: str = Field(
        "[DEID]", description="Tag for MIMIC-III placeholders of a type the recipe's map does not know (counted)."
    )
    mimic4_placeholder_tag: str = Field("[DEID]", description="What MIMIC-IV-Note's `___` placeholders become.")
    on_bad_utf8: Literal["replace", "drop"] = Field(
        "replace", description="Undecodable bytes: replace with U+FFFD and flag the row, or drop it (counted)."
    )
    min_chars: int = Field(1, ge=1, description="Notes shorter than this after stripping whitespace are dropped.")
    block_mb: int = Field(
        16, ge=1, description="Ray Data block size: each block becomes one Parquet file; smaller uses less memory."
    )


# --------------------------------------------------------------------------------------------------- teacher
class Price(StrictModel):
    prompt_per_1m: float = Field(ge=0)
    completion_per_1m: float = Field(ge=0)


class TeacherConfig(StrictModel):
    """The LLM every generating stage calls: OpenAI, Azure OpenAI, or any OpenAI-compatible server."""

    provider: Literal["openai", "azure", "openai_compatible"] = "openai"
    model: str = Field("gpt-3.5-turbo", description="Model name; for Azure, the model behind the deployment.")
    base_url: str | None = Field(None, description="openai_compatible: e.g. http://127.0.0.1:8000/v1 (vLLM, Ray Serve).")
    azure_endpoint: str | None = Field(None, description="azure: https://<resource>.openai.azure.com")
    azure_deployment: str | None = None
    api_version: str = "2024-10-21"
    api_key_env: str | None = Field(
        None, description="Environment variable holding the API key. Default: OPENAI_API_KEY for openai, "
        "AZURE_OPENAI_API_KEY for azure, none for openai_compatible (a user's OpenAI key never goes to another host).",
    )
    api_key_file: str | None = Field(None, description="File holding the API key (takes precedence over the env).")
    requests_per_minute: float = Field(3500, gt=0)
    tokens_per_minute: float = Field(90000, gt=0)
    rate_safety: float = Field(0.99, gt=0, le=1, description="Share of the limits to use (the rest absorbs jitter).")
    window_s: float = Field(60.0, gt=0, description="The limits' window; 60 for every real API.")
    mode: Literal["online", "batch"] = Field(
        "online", description="batch: OpenAI's / Azure OpenAI's Batch API — half the price, a separate quota, results "
        "within 24 h (asclepius/teacher/batch.py). Credentialed notes need batch_zero_retention_agreement.",
    )
    batch_poll_s: float = Field(30.0, gt=0, description="Seconds between polls of a running batch.")
    batch_max_requests: int = Field(50000, ge=1, le=50000, description="Requests per batch file (OpenAI's limit: 50,000).")
    batch_wave_size: int = Field(2000, ge=1, description="Questions stage in batch mode: notes per wave (one batch each; "
                                 "the question pool is updated between waves).")
    batch_zero_retention_agreement: bool = Field(
        False, description="The provider keeps batch input and output files for a while, which PhysioNet's rules do not "
        "allow for credentialed notes: set only under a zero-data-retention agreement with the provider.",
    )
    rate_accounting: Literal["reserved", "reserved_then_trued_up", "usage"] = Field(
        "reserved", description="How the provider counts tokens/min: reserved (prompt + max_tokens, kept; OpenAI and "
        "Azure OpenAI), reserved_then_trued_up (until the response, then its usage), usage (used tokens only).",
    )
    key_includes_endpoint: bool = Field(
        False, description="Make the endpoint (host, deployment) part of a request's ledger key. Off: the same model "
        "behind a new address (our Serve app on another port, a moved vLLM) answers from the ledger, unpaid.",
    )
    num_actors: int = Field(2, ge=1, description="Ray Data actors sending requests (the work is split among them).")
    actor_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each request-sending actor needs, to place the actors on "
        "a node type (e.g. {teacher_node: 1}); none: any node with a tenth of a CPU free.",
    )
    concurrency_per_actor: int | Literal["auto"] = Field(
        "auto", description="Requests in flight per actor; auto: from the quota and latency by Little's law "
        "(in flight = requests/s the quota allows × expected_latency_s).",
    )
    expected_latency_s: float = Field(5.0, gt=0, description="A request's typical latency, for concurrency `auto`.")
    timeout_s: float = Field(120.0, gt=0)
    max_attempts: int = Field(6, ge=1)
    backoff_base_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(60.0, ge=0)
    token_counter: Literal["auto", "tiktoken", "bytes", "hf"] = Field(
        "auto", description="auto: tiktoken for OpenAI/Azure, `hf` if `tokenizer` is set, else UTF-8 bytes / 4."
    )
    tokenizer: str | None = Field(None, description="Local HF tokenizer of a self-hosted model, for token counts.")
    prices: dict[str, Price] = Field(default_factory=dict, description="USD per 1M tokens, overrides the table.")
    budget_usd: float | None = Field(None, ge=0, description="Refuse to start a stage that may cost more.")
    ledger_dir: str | None = Field(None, description="Where the request ledger lives (a path or s3:// / gs:// URI); default <run>/ledger.")
    limiter_name: str | None = Field(None, description="Name of the cluster-wide limiter; default from endpoint.")
    progress_every_s: float = Field(10.0, gt=0)
    credentialed_sources: list[str] = Field(
        default_factory=lambda: ["mimic3", "mimic4"],
        description="Source names (the `source` column) refused like credentialed rows, in addition to every row whose "
        "provenance flag (notes.sources.N.credentialed) is set.",
    )
    i_have_permission_to_send_credentialed_notes_to_public_openai: bool = Field(
        False,
        description="PhysioNet's data use agreement forbids sending MIMIC notes to the public OpenAI API; Azure "
        "OpenAI (with opt-out of human review) or a self-hosted model are allowed. Set only with written permission.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_inline_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(k in data for k in ("api_key", "key", "token")):
            raise ValueError(
                "API keys never go in the config text: name an environment variable (api_key_env) or a file "
                "(api_key_file)"
            )
        return data

    @model_validator(mode="after")
    def _endpoint_complete(self) -> TeacherConfig:
        if self.provider == "azure" and not (self.azure_endpoint and self.azure_deployment):
            raise ValueError("an azure teacher needs azure_endpoint and azure_deployment")
        if self.provider == "openai_compatible" and not self.base_url:
            raise ValueError("an openai_compatible teacher needs base_url")
        return self


# --------------------------------------------------------------------------------------------------- generate
class TaskConfig(StrictModel):
    task: str
    seed_questions: list[str] = Field(min_length=1)


class SplitConfig(StrictModel):
    """Notes held out for evaluation never reach questions, answers or pretraining."""

    eval_fraction: float = Field(0.05, ge=0, lt=1, description="Share of notes held out, chosen by a hash of note_id.")
    seed: int = 0


class SynthesizeConfig(StrictModel):
    case_report_sources: list[str] = Field(default_factory=lambda: ["pmc"], description="`source` values of case reports.")
    prompt: str = Field(default_factory=lambda: _RECIPE.note_synthesis_prompt)
    temperature: float = Field(default_factory=lambda: float(_RECIPE.note_synthesis_request["temperature"]), ge=0, le=2)
    context_tokens: int = Field(4088, ge=64, description="max_tokens = context_tokens − prompt tokens (recipe: 4088).")
    max_tokens_cap: int | None = Field(None, ge=1, description="Cap on max_tokens (small in the demo).")
    min_completion_tokens: int = Field(64, ge=1, description="A prompt leaving less room than this is too long.")
    on_too_long: Literal["truncate", "skip"] = "truncate"
    keep_cut_off: bool = Field(False, description="Keep replies cut off by max_tokens (finish_reason length).")
    limit: int | None = Field(None, ge=1, description="At most this many case reports (first by note_id).")


class QuestionsConfig(StrictModel):
    prompt: str = Field(default_factory=lambda: _RECIPE.question_prompt)
    tasks: list[TaskConfig] = Field(default_factory=lambda: [TaskConfig(task=t.task, seed_questions=list(t.seed_questions)) for t in _RECIPE.tasks])
    temperature: float = Field(default_factory=lambda: float(_RECIPE.question_request["temperature"]), ge=0, le=2)
    max_tokens: int = Field(default_factory=lambda: int(_RECIPE.question_request["max_tokens"]), ge=1)
    seed_examples: int = Field(3, ge=0, description="Examples drawn from the task's seed questions.")
    pool_examples: int = Field(2, ge=0, description="Examples drawn from the task's pool of generated questions.")
    similarity_threshold: float = Field(0.7, gt=0, le=1, description="ROUGE-L F at or above which a question is too similar; 1.0 disables.")
    drop_similar: bool = Field(False, description="Drop (note, question) pairs whose question was too similar.")
    context_tokens: int = Field(4096, ge=64, description="The teacher's context: prompt + max_tokens must fit.")
    on_too_long: Literal["truncate", "skip"] = "truncate"
    note_sources: list[str] | None = Field(None, description="Note sources to ask about; None: all but case reports.")
    limit: int | None = Field(None, ge=1)


class AnswersConfig(StrictModel):
    prompt: str = Field(default_factory=lambda: _RECIPE.answer_prompt)
    temperature: float = Field(default_factory=lambda: float(_RECIPE.answer_request["temperature"]), ge=0, le=2)
    # The recipe asked for prompt tokens + 400 (double-counting the prompt against the limit, and able to exceed
    # the context); 400 new tokens was the intent.
    max_tokens: int = Field(400, ge=1)
    context_tokens: int = Field(4096, ge=64)
    on_too_long: Literal["truncate", "skip"] = "truncate"
    filter_regex: str = Field(default_factory=lambda: _RECIPE.instruction_filters["drop_if_any_field_matches_regex_case_insensitive"])
    drop_if_answer_endswith: str = Field(default_factory=lambda: _RECIPE.instruction_filters["drop_if_answer_endswith"])
    keep_cut_off: bool = Field(True, description="Keep answers cut off by max_tokens (the recipe kept them).")
    export_recipe_json: bool = Field(True, description="Also write instructions.json, the recipe's format.")


class ImportConfig(StrictModel):
    """Released instruction data instead of generating it."""

    kind: Literal["asclepius_r", "synthetic"]
    path: str = Field(description="asclepius_r: mimiciii_discharge.csv (ROW_ID, Question, Answer, Task); "
                      "synthetic: CSV/Parquet with patient_id, note, question, answer, task.")
    notes_source: str = Field("mimic3", description="asclepius_r: the notes source holding NOTEEVENTS' rows.")


# --------------------------------------------------------------------------------------------------- serve
class AutoscalingConfig(StrictModel):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)


class ServedModelConfig(StrictModel):
    name: str = Field(description="The `model` name clients ask for.")
    source: str = Field(description="HF dir, HF id, gguf:<file>, smollm2 or tiny (asclepius/models.py); ${run_dir}/... names "
                        "an output of this run (e.g. ${run_dir}/checkpoints/finetune/final), loaded from its published version.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for the model (default: num_cpus).")
    max_batch_size: int = Field(16, ge=1, description="Generations a replica decodes together (continuous batching: "
                                "they join and leave between decoding steps).")
    max_queued_requests: int = Field(64, ge=0, description="Generations that may wait for a place in the batch; a request "
                                     "whose generations (prompts × n) do not fit gets 503 with Retry-After.")
    max_batch_tokens: int = Field(
        32768, ge=1, description="KV budget: rows × longest (prompt + max_tokens) in the running batch. Size it for the GPU: "
        "a 7B model's KV cache takes ~0.5 MiB per token in bf16.",
    )
    context_length: int | None = Field(None, ge=1, description="Default: the model's max_position_embeddings.")
    truncate_prompt: bool = Field(False, description="chat/completions: cut long prompts from the left instead of answering 400 "
                                  "(/v1/answer always shortens the note from its end, as training does, and says so).")
    default_max_tokens: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _batch_fits(self) -> ServedModelConfig:
        if self.max_batch_tokens < self.max_batch_size:
            raise ValueError("max_batch_tokens must be at least max_batch_size")
        return self


class ServeConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "asclepius"
    route_prefix: str = "/"
    models: list[ServedModelConfig] = Field(min_length=1)
    api_key_env: str | None = Field(None, description="If set (and the variable is), clients need this bearer key.")
    api_key_file: str | None = None
    keep_running: bool = Field(False, description="Pipeline: leave the app running after its smoke check.")
    docs: bool = Field(False, description="Serve /openapi.json (behind the key when one is set).")


# --------------------------------------------------------------------------------------------------- evaluate
class EvalDatasetConfig(StrictModel):
    path: str = Field(description="CSV, JSONL, JSON (list of objects) or Parquet with note, question[, task][, reference] "
                      "and optional <model>_answer columns; local path or pyarrow URI.")  # fmt: skip
    credentialed: bool = Field(
        True, description="The file's notes are under a data use agreement (refused for the public OpenAI API). Set "
        "false only for public data (e.g. the synthetic notes of the public Asclepius set).",
    )


class CandidateConfig(StrictModel):
    """One model whose answers are judged; exactly one of `served`, `teacher`, `endpoint`, `column`."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="The model's name in the report.")
    served: str | None = Field(None, description="A model of this run's Serve app (serve.models, or asclepius-finetuned).")
    teacher: bool = Field(False, description="The pipeline's teacher (for the demo: the served SmolLM2).")
    endpoint: TeacherConfig | None = Field(None, description="Any OpenAI / Azure / OpenAI-compatible model.")
    column: str | None = Field(None, description="Answers given in the dataset, column <column>_answer.")
    api: Literal["answer", "chat"] | None = Field(
        None, description="answer: our /v1/answer (the recipe's model prompt, applied by the server; default for `served`); "
        "chat: chat completions with the recipe's model prompt as the user message (default otherwise).",
    )
    generation: Literal["recipe", "greedy"] = Field(
        "recipe", description="recipe: its evaluation settings (400 new tokens, temperature 1; its 5-beam search has no "
        "OpenAI-API equivalent); greedy: temperature 0, reproducible.",
    )
    max_tokens: int | None = Field(None, ge=1, description="Default: the recipe's 400.")

    @model_validator(mode="after")
    def _one_source(self) -> CandidateConfig:
        given = [k for k in ("served", "teacher", "endpoint", "column") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"a candidate needs exactly one of served, teacher, endpoint, column (got {given or 'none'})")
        if self.api is None:
            object.__setattr__(self, "api", "answer" if self.served else "chat")
        if self.api == "answer" and self.endpoint is not None and self.endpoint.provider != "openai_compatible":
            raise ValueError("api: answer is our Serve app's /v1/answer; an OpenAI or Azure endpoint takes api: chat")
        return self


class JudgeConfig(StrictModel):
    endpoint: TeacherConfig | None = Field(None, description="The judge; None: the pipeline's teacher.")
    prompt: str = Field(default_factory=lambda: _RECIPE.raw["judge_prompt"])
    max_tokens: int = Field(default_factory=lambda: int(_RECIPE.raw["judge_request"]["max_tokens"]), ge=1)
    max_reasks: int = Field(2, ge=0, le=10, description="Re-asks of a reply that is not one score 1-4 per answer.")
    guided_choice: bool = Field(
        False, description="Ask a self-hosted judge (our Serve app, vLLM) to reply with one of the valid score lines "
        "(vLLM's guided_choice; up to 4 answers): small judges then give readable scores, chosen by their own "
        "likelihoods. OpenAI and Azure do not take it.",
    )


class EvaluateConfig(StrictModel):
    dataset: EvalDatasetConfig | None = Field(None, description="None: the held-out notes, one question each.")
    limit: int | None = Field(None, ge=1, description="At most this many items (first by id).")
    candidates: list[CandidateConfig] = Field(min_length=1)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    reverse_order: bool = Field(True, description="Judge each item twice, answers in reverse order the second time.")
    bootstrap_samples: int = Field(2000, ge=100, le=100000)

    @model_validator(mode="after")
    def _unique_names(self) -> EvaluateConfig:
        names = [c.name for c in self.candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"candidate names must be unique (got {names})")
        if len(names) > 26:
            raise ValueError("at most 26 candidates (the judge labels them Agent A to Z)")
        return self


# --------------------------------------------------------------------------------------------------- model/train
class ModelConfig(StrictModel):
    base: str = Field(description="HF model id, a local HF directory, `gguf:<file>`, `smollm2`, `tiny` (LLaMA-1-shaped) or "
                      "`tiny-llama3` / `tiny-qwen2` / `tiny-mistral` (tests, quick runs; built locally).")
    tokenizer: str | None = Field(None, description="Tokenizer source; None uses `base`.")
    use_fast_tokenizer: bool | None = Field(
        None, description="None (auto): slow for a LLaMA-1/2 SentencePiece tokenizer (the recipe's use_fast=False), fast for "
        "every current family (Llama-3, Qwen2, Mistral), as the model ships it; true/false force it.")  # fmt: skip


class LoraSettings(StrictModel):
    """LoRA's adapter (Hu et al., 2021) through peft: W + (alpha / rank) · B·A on the target modules."""

    rank: int = Field(16, ge=1, description="r: the adapter's inner dimension.")
    alpha: float = Field(32, gt=0, description="lora_alpha: the update is scaled by alpha / rank.")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear layers that get an adapter (every attention and MLP projection of LLaMA, Qwen2 and Mistral).")  # fmt: skip
    export: Literal["merged", "adapter"] = Field(
        "merged", description="merged: the export is plain HF weights with the adapter folded in (served like any model); "
        "adapter: the export is the adapter alone (adapter_config.json + weights), served on top of its base.")  # fmt: skip


class TrainHyperparams(StrictModel):
    """Hyper-parameters of one training stage; defaults are filled from the recipe per stage."""

    method: Literal["full", "lora", "qlora"] = Field(
        "full", description="full: every parameter trains (the recipe). lora: only a LoRA adapter trains (peft); the base "
        "stays frozen, so optimizer states and gradients cover ~1% of the parameters. qlora: lora over a 4-bit base "
        "(bitsandbytes, GPU workers only).")  # fmt: skip
    lora: LoraSettings = Field(default_factory=LoraSettings)

    epochs: float = Field(gt=0)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    warmup_ratio: float = Field(ge=0, le=1)
    lr_scheduler: Literal["cosine", "linear", "constant"]
    global_batch: int = Field(ge=1)
    micro_batch: int = Field(1, ge=1)
    max_len: int = Field(ge=8)
    bf16: bool
    gradient_checkpointing: bool = True
    global_batch_unit: Literal["examples", "blocks"] = Field(
        "examples", description="What global_batch counts when instruction examples are packed: examples (the recipe's "
        "128 examples per step; the accumulation follows the examples per block) or blocks. Pretraining counts blocks.",
    )
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas (the recipe's HF Trainer default).")
    adam_eps: float = Field(1e-8, gt=0)
    gradient_clipping: float = Field(1.0, ge=0)
    zero_stage: Literal[2, 3] = 3
    offload_optimizer: bool = Field(False, description="ZeRO: keep optimizer states in CPU memory.")
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each training worker needs, to place it on a node type: "
        "e.g. {train_node: 1} for nodes started with `--resources '{\"train_node\": 8}'`, or {\"accelerator_type:A100\": "
        "0.001} for the accelerator Ray detected.",
    )
    packing: Literal["packed", "pad_to_longest"] = Field("packed", description="Instruction data only.")
    packed_attention: Literal["auto", "varlen", "flex", "mask"] = Field(
        "auto", description="How packed examples are kept apart in attention. auto: varlen on GPU workers that have "
        "flash-attn, else flex on GPUs, mask on CPU. varlen: flash-attention 2's varlen kernel, example boundaries given "
        "as cu_seq_lens (GPU + flash-attn). flex: PyTorch flex_attention with a block-causal BlockMask (GPU; it has no "
        "backward on CPU). mask: a dense (L×L) block-diagonal mask through SDPA (CPU fallback: it rules out SDPA's flash "
        "kernel and computes the full L² scores). varlen and flex take one row of micro_batch × max_len tokens.",
    )
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (demo, tests).")
    checkpoint_every_steps: int = Field(200, ge=0, description="Optimizer steps between checkpoints, so a restart "
                                        "(max_failures) loses at most this many steps; 0: only at the end.")
    num_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0, description="Ray Train restarts from the latest checkpoint this often.")
    seed: int = 0

    @model_validator(mode="after")
    def _qlora_needs_gpus(self):
        if self.method == "qlora" and self.lora.export == "merged":
            raise ValueError("lora.export: merged folds the adapter into the base, which qlora holds in 4 bits; "
                             "set lora.export: adapter (served on its 16-bit base)")  # fmt: skip
        if self.method == "qlora" and self.zero_stage == 3:
            raise ValueError("method: qlora keeps the 4-bit base whole on each GPU, which ZeRO-3 cannot partition: set zero_stage: 2")
        if self.method == "qlora" and not self.use_gpu:
            raise ValueError("method: qlora quantizes the base to 4 bits with bitsandbytes, which runs on GPU workers only: "
                             "set use_gpu: true, or method: lora")  # fmt: skip
        return self

    @model_validator(mode="before")
    @classmethod
    def _old_attention_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("packed_attention") == "position_ids":  # its name before varlen had cu_seq_lens
            data = {**data, "packed_attention": "varlen"}
        return data


def _recipe_train_defaults(stage: str) -> dict[str, Any]:
    keys = ("epochs", "lr", "weight_decay", "warmup_ratio", "lr_scheduler", "global_batch", "max_len", "bf16")
    values = {k: _RECIPE.raw[stage][k] for k in keys}
    values["gradient_checkpointing"] = _RECIPE.raw[stage].get("gradient_checkpointing", True)
    return values


# --------------------------------------------------------------------------------------------------- whole config
class Config(StrictModel):
    run_dir: str = Field(description="Run directory: local path or pyarrow filesystem URI (s3://...).")
    seed: int = 0
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    lease: LeaseConfig = Field(default_factory=LeaseConfig)
    notes: NotesConfig
    teacher: TeacherConfig | None = None
    teacher_from_serve: str | None = Field(
        None, description="Use this served model (serve.models) as the teacher: the pipeline deploys it first."
    )
    split: SplitConfig = Field(default_factory=SplitConfig)
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig)
    questions: QuestionsConfig = Field(default_factory=QuestionsConfig)
    answers: AnswersConfig = Field(default_factory=AnswersConfig)
    instructions_import: ImportConfig | None = None
    serve: ServeConfig | None = None
    evaluate: EvaluateConfig | None = None
    model: ModelConfig | None = None
    pretrain: TrainHyperparams
    finetune: TrainHyperparams

    @model_validator(mode="before")
    @classmethod
    def _recipe_training_defaults(cls, data: Any) -> Any:
        # A preset states only what differs from the recipe: `pretrain: {micro_batch: 4}` keeps the recipe's lr.
        if isinstance(data, dict):
            data = dict(data)
            for section, stage in (("pretrain", "pretraining"), ("finetune", "finetuning")):
                given = data.get(section) or {}
                if isinstance(given, dict):
                    data[section] = {**_recipe_train_defaults(stage), **given}
        return data

    @model_validator(mode="after")
    def _run_relative_sources(self) -> Config:
        # a preset names the model this run exports as ${run_dir}/..., so overriding run_dir moves it too
        if self.serve is not None:
            for m in self.serve.models:
                if m.source.startswith(RUN_DIR_VARIABLE):
                    object.__setattr__(m, "source", self.run_dir.rstrip("/") + m.source[len(RUN_DIR_VARIABLE) :])
        return self

    @model_validator(mode="after")
    def _evaluation_has_what_it_names(self) -> Config:
        if self.evaluate is None:
            return self
        served = [c.name for c in self.evaluate.candidates if c.served]
        if served and self.serve is None:
            raise ValueError(f"evaluate.candidates {served} are `served` models: they need a `serve` section")
        uses_teacher = any(c.teacher for c in self.evaluate.candidates) or self.evaluate.judge.endpoint is None
        if uses_teacher and self.teacher is None and not self.teacher_from_serve:
            raise ValueError("evaluate uses the pipeline's teacher (a `teacher: true` candidate, or no judge.endpoint): "
                             "set `teacher` or `teacher_from_serve`")  # fmt: skip
        return self

    def stage_hash(self, section: str) -> str:
        """A stable hash of one section: a stage whose section changed is rerun, others are skipped."""
        value = getattr(self, section)
        dumped = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        payload = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------- loading
def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = e.get("input")
        got_text = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {where}: {msg}{got_text}")
    return "\n".join(lines)


def _parse_scalar(text: str) -> Any:
    # YAML scalar rules: `4` is an int, `true` a bool, `null` None, `[a, b]` a list, anything else a string.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; list items are addressed by index (`sources.0.path`)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    key, raw_value = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r} has an empty key part")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {key}: {where} is not an index of a list of {len(node)}")
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override {key}: {'.'.join(parts[:i])} is a value, not a section")
    last = parts[-1]
    value = _parse_scalar(raw_value)
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {key}: {last} is not an index of a list of {len(node)}")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {key}: {'.'.join(parts[:-1])} is a value, not a section")


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), origin: str = "dict") -> Config:
    data = json.loads(json.dumps(data))  # deep copy, and proves the data is plain JSON-like values
    for override in overrides:
        apply_override(data, override)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return config_from_dict(data, overrides, origin=str(path))


def placeholders(cfg: Config) -> list[str]:
    """The fields that still hold a preset's placeholder (YOUR-BUCKET, YOUR-RESOURCE): a run must not start with them."""
    found = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}.{i}")
        elif isinstance(value, str) and PLACEHOLDER in value:
            found.append(where)

    walk(cfg.model_dump(mode="json"), "")
    run_dir = cfg.run_dir.rstrip("/") + "/"
    derived = {f"serve.models.{i}.source" for i, m in enumerate(cfg.serve.models if cfg.serve else []) if m.source.startswith(run_dir)}
    return [f for f in found if f not in derived]  # a ${run_dir}/... source follows run_dir: only run_dir needs a value


# The recipe's own values, by section (the other fields are how a run is placed and kept, not what it computes).
RECIPE_FIELDS = {
    "split": ("eval_fraction",),
    "synthesize": ("temperature", "max_tokens_cap", "context_tokens", "limit", "keep_cut_off"),
    "questions": ("temperature", "max_tokens", "context_tokens", "limit", "similarity_threshold", "seed_examples", "pool_examples"),
    "answers": ("temperature", "max_tokens", "context_tokens", "limit"),
    "pretrain": ("method", "epochs", "lr", "weight_decay", "warmup_ratio", "lr_scheduler", "global_batch", "max_len", "bf16", "max_steps",
                 "adam_betas", "adam_eps", "gradient_clipping"),
    "finetune": ("method", "epochs", "lr", "weight_decay", "warmup_ratio", "lr_scheduler", "global_batch", "global_batch_unit", "max_len", "bf16", "max_steps",
                 "adam_betas", "adam_eps", "gradient_clipping"),
}  # fmt: skip
RECIPE_BASE = "LLaMA-7B"


def recipe_departures(cfg: Config) -> list[str]:
    """Every recipe value this config changes, as `section.field=value (recipe: value)`: the one list a demo or a
    preset's departures are read from (the console, the evaluation report)."""
    recipe = config_from_dict({"run_dir": cfg.run_dir, "notes": cfg.notes.model_dump()})
    out = []
    for section, fields in RECIPE_FIELDS.items():
        ours, theirs = getattr(cfg, section), getattr(recipe, section)
        for name in fields:
            if hasattr(ours, name) and getattr(ours, name) != getattr(theirs, name):
                out.append(f"{section}.{name}={_plain(getattr(ours, name))} (recipe: {_plain(getattr(theirs, name))})")
    if cfg.model is not None and "llama-7b" not in cfg.model.base.lower():
        out.insert(0, f"model.base={cfg.model.base} (recipe: {RECIPE_BASE})")
    if cfg.evaluate is not None:
        for c in cfg.evaluate.candidates:
            if c.generation != "recipe" or c.max_tokens is not None:
                out.append(f"evaluate.{c.name}: generation {c.generation}, max_tokens {c.max_tokens} (recipe: sampling, 400)")
    return out


def _plain(value: Any) -> str:
    return json.dumps(list(value)) if isinstance(value, tuple) else str(value)
