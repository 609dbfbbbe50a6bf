"""The model replica: one served model's tokenizer, weights and continuous-batching engine (asclepius.serve.engine)
on its own thread, as a Ray Serve deployment the ingress (asclepius.serve.app) calls.

Logs carry request ids, sizes and timings — never prompts, notes or answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

from asclepius import metrics
from asclepius.config import ServedModelConfig
from asclepius.recipe import load_recipe
from asclepius.serve.edge import _error_dict
from asclepius.storage import is_remote, local_copy

log = logging.getLogger("asclepius.serve")
QUEUE_METRICS_EVERY_S = 2.0


def configure_replica_logging() -> None:
    """Inside a Serve replica our loggers have no handler: give them Serve's (the replica's log file, the
    dashboard), so operators see ids, sizes and timings next to Ray's access lines."""
    ours, theirs = logging.getLogger("asclepius"), logging.getLogger("ray.serve")
    if theirs.handlers and not ours.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def answer_prompt(note: str, question: str) -> str:
    """The recipe's trained prompt (its typo included), fields stripped of surrounding newlines as in training."""
    return load_recipe().model_prompt.format(note=note.strip("\n"), question=question.strip("\n"))


class ModelServer:
    """One model: tokenizer, weights, and a continuous-batching engine on its own thread."""

    def __init__(self, cfg: ServedModelConfig):
        import torch

        from asclepius.models import load_model, load_tokenizer
        from asclepius.serve.engine import Engine

        configure_replica_logging()
        self.cfg = cfg
        device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        if device == "cpu":  # transformers may import DeepSpeed, which warns that it found no GPU: it is not meant to
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # Ray gives a worker one thread per reserved CPU (OMP_NUM_THREADS); torch_threads can use more of a node
        # than the replica reserves, leaving CPUs to schedule other work on.
        torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.num_cpus)))
        # a checkpoint in object storage (s3://, gs://) is downloaded once per node into a private cache
        source = local_copy(cfg.source) if is_remote(cfg.source) else cfg.source
        self.tokenizer = load_tokenizer(source)
        model = load_model(source, cfg.dtype, device)
        self.context = cfg.context_length or getattr(model.config, "max_position_embeddings", 2048)
        if device == "cuda":  # refuse a KV budget the GPU cannot hold now, not with out-of-memory under load
            from asclepius.serve.sizing import check_kv_budget

            check_kv_budget(cfg.name, model.config, max(cfg.max_batch_tokens, self.context), torch.cuda.mem_get_info()[0],
                            dtype_bytes=next(model.parameters()).element_size())  # fmt: skip
        self.engine = Engine(model, self.tokenizer, self.context, max_batch_size=cfg.max_batch_size,
                             max_batch_tokens=max(cfg.max_batch_tokens, self.context), max_waiting=cfg.max_queued_requests)  # fmt: skip
        self.engine.start()
        self.vocab = len(self.tokenizer)
        threading.Thread(target=self._report_queue, name=f"queue-metrics-{cfg.name}", daemon=True).start()
        log.info("model %s ready on %s (context %d, batch %d)", cfg.name, device, self.context, cfg.max_batch_size)

    def _report_queue(self) -> None:
        while True:  # the dashboard's queue depth: generations decoding and waiting for a place in the batch
            metrics.serve_queue(self.cfg.name, *self.engine.load())
            time.sleep(QUEUE_METRICS_EVERY_S)

    def info(self) -> dict:
        return {"name": self.cfg.name, "context_length": self.context, "source": self.cfg.source}

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_texts(self, seq: list[int], alternatives: list[list[int]]) -> tuple[list[str], list[list[str]]]:
        """The text each token of `seq` adds after the tokens before it (so the pieces add up to the decoded text —
        a SentencePiece token alone loses its leading space), and the same for each position's alternatives."""
        chosen, alts = [], []
        for i, token in enumerate(seq):
            prefix = seq[max(0, i - 6) : i]
            base = self.decode(prefix)
            chosen.append(self.decode(prefix + [token])[len(base) :])
            alts.append([self.decode(prefix + [a])[len(base) :] for a in alternatives[i]])
        return chosen, alts

    def prepare(self, kind: str, payload: dict) -> dict:
        """Prompt token ids for a request, or an error {status, code, message, param}."""
        from asclepius.models import chat_prompt_ids, text_prompt_ids

        for token in (payload.get("logit_bias") or {}):
            if token >= self.vocab:
                return _error_dict(400, "invalid_logit_bias", f"logit_bias: token id {token} is outside the vocabulary ({self.vocab})", "logit_bias")
        max_tokens = payload["max_tokens"]
        if kind == "answer":
            return self._prepare_answer(payload)
        if kind == "chat":
            ids = chat_prompt_ids(self.tokenizer, payload["messages"])
        elif isinstance(payload["prompt"], list):
            ids = list(payload["prompt"])
            if max(ids) >= self.vocab:
                return _error_dict(400, "invalid_prompt", f"prompt: token id {max(ids)} is outside the vocabulary ({self.vocab})", "prompt")
        else:
            ids = text_prompt_ids(self.tokenizer, payload["prompt"])
        over = len(ids) + max_tokens - self.context
        truncated = 0
        if over > 0:
            if not self.cfg.truncate_prompt or max_tokens >= self.context:
                return _error_dict(400, "context_length_exceeded", f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds "
                                   f"the context of {self.context} tokens by {over}; shorten the prompt or lower max_tokens", "messages")  # fmt: skip
            ids, truncated = ids[:1] + ids[1 + over :], over  # the oldest text goes; the first token (BOS / template) stays
        prepared = {"prompt_ids": ids, "truncated_tokens": truncated}
        if payload.get("guided_choice"):
            prepared["allowed"] = [list(self.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in payload["guided_choice"]]
        return prepared

    def _prepare_answer(self, payload: dict) -> dict:
        """The recipe's prompt around note and question; a note too long for the context is shortened from its end,
        as training shortens it (the header and the question always stay), and the response says so."""
        from asclepius.models import text_prompt_ids

        note, question, max_tokens = payload["note"].strip("\n"), payload["question"], payload["max_tokens"]
        ids = text_prompt_ids(self.tokenizer, answer_prompt(note, question))
        if len(ids) + max_tokens <= self.context:
            return {"prompt_ids": ids, "truncated_tokens": 0}
        note_ids = list(self.tokenizer(note, add_special_tokens=False)["input_ids"])
        keep = len(note_ids) - (len(ids) + max_tokens - self.context)
        while keep > 0:
            ids = text_prompt_ids(self.tokenizer, answer_prompt(self.tokenizer.decode(note_ids[:keep]), question))
            if len(ids) + max_tokens <= self.context:
                return {"prompt_ids": ids, "truncated_tokens": len(note_ids) - keep}
            keep -= max(1, len(ids) + max_tokens - self.context)
        return _error_dict(400, "context_length_exceeded", f"the question and max_tokens ({max_tokens}) leave no room for the note "
                           f"in the context of {self.context} tokens; lower max_tokens", "max_tokens")  # fmt: skip

    def _requests(self, specs: list[dict]):
        from asclepius.serve.engine import GenRequest

        return [GenRequest(
            prompt_ids=s["prompt_ids"], max_new_tokens=s["max_tokens"], temperature=s["temperature"], top_p=s["top_p"], stop=s["stop"],
            seed=s["seed"], request_id=s["request_id"], allowed=s.get("allowed"), logprobs=s.get("logprobs"),
            prompt_logprobs=s.get("prompt_logprobs"), logit_bias=s.get("logit_bias") or {},
            frequency_penalty=s.get("frequency_penalty", 0.0), presence_penalty=s.get("presence_penalty", 0.0),
            cut_repetition=s.get("cut_repetition", False),
        ) for s in specs]  # fmt: skip

    async def generate(self, specs: list[dict]):
        """All of a request's generations, admitted together; yields lists of {"index", chunk...} as tokens come
        (whatever has arrived, in one message: fewer hops per token under load), or one {"overloaded":
        retry_after_s}. If the caller goes away (a client disconnect cancels this), the generations stop at the
        engine's next step."""
        from dataclasses import asdict

        from asclepius.serve.engine import EngineOverloaded

        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()
        requests = self._requests(specs)

        def emitter(i):
            return lambda chunk: loop.call_soon_threadsafe(chunks.put_nowait, (i, chunk))

        try:
            self.engine.submit(requests, [emitter(i) for i in range(len(requests))])
        except EngineOverloaded as err:
            log.info("%s refused: %s", specs[0]["request_id"].split("/")[0], err)
            yield {"overloaded": err.retry_after_s}
            return
        open_ = set(range(len(requests)))
        try:
            while open_:
                got = [await chunks.get()]
                while not chunks.empty():
                    got.append(chunks.get_nowait())
                for i, chunk in got:
                    if chunk.finish_reason:
                        open_.discard(i)
                yield [{"index": i, **asdict(chunk)} for i, chunk in got]
        finally:
            for i in open_:  # cancelled, or the caller stopped reading
                self.engine.cancel(requests[i].request_id)
            if open_:
                log.info("%s cancelled %d generation(s) (client went away)", specs[0]["request_id"].split("/")[0], len(open_))

    async def generate_full(self, specs: list[dict]) -> dict:
        """Non-streaming: the chunks are gathered here, in the replica, so only the results cross the network."""
        results = [{"text": "", "completion_tokens": 0, "finish_reason": "length", "logprobs": [], "prompt_logprobs": None, "error": None}
                   for _ in specs]  # fmt: skip
        async for items in self.generate(specs):
            if "overloaded" in items:
                return items
            for item in items:
                r = results[item["index"]]
                r["text"] += item["text"]
                r["logprobs"] += item["logprobs"]
                r["completion_tokens"] = item["completion_tokens"]
                r["prompt_logprobs"] = item["prompt_logprobs"] or r["prompt_logprobs"]
                if item["finish_reason"]:
                    r["finish_reason"], r["error"] = item["finish_reason"], item["error"]
        return {"results": results}

    def stats(self) -> dict:
        running, waiting = self.engine.load()
        return {"batch_sizes": list(self.engine.batches), "running": running, "waiting": waiting, "steps": self.engine.steps}


