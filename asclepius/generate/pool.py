"""The question pool: bootstrapping examples for the question prompts, and the similarity filter.

For each note, the prompt shows `seed_examples` of its task's seed questions and up to `pool_examples` of the
questions generated for that task so far (the recipe's scheme). A new question joins the pool only if its
ROUGE-L F against every seed and pool question of the task is below the threshold (self-instruct's rule).

The rule is kept exactly (same tokens as rouge-score's, same F, same comparison) and made near-linear:
- **Which questions can reach the threshold.** F = 2·LCS / (m + n) for token counts m, n, and LCS ≤ min(m, n), so a
  candidate's length lies in [t·m / (2−t), (2−t)·m / t] and it shares at least k = ⌈t·(m + n_min) / 2⌉ tokens with
  the new question. Any k shared tokens include one of the new question's m − k + 1 **rarest** tokens, so only the
  questions holding one of those are candidates (prefix filtering, as in set-similarity joins): the posting lists of
  "what", "the", "patient" — which span the pool — are never walked.
- **The exact LCS in C++.** Tokens are mapped to one character each and rapidfuzz's `LCSseq` (exact, bit-parallel)
  gives the LCS; F is then computed with rouge-score's own formula, so the decision at the threshold is the same
  float comparison (tests/generate/test_pool_equivalence.py checks it against rouge-score on random and adversarial
  sets).
benchmarks/question_pool.py measures it from 1k to 20k questions per task.

Every decision is journaled (`<dir>/journal-*.jsonl`, an `AppendLog`: fsynced, or one object per list of calls
on object storage) before it is used: which examples a note's prompt used, and which questions were offered and
accepted. Writers are named by their start time, so the journals replay in the order they were written. A resumed job replays it, so a note asks the same prompt again (and the
teacher ledger answers it without paying) and the pool is what it was.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import time
import uuid
from collections import Counter, defaultdict

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

from asclepius.run import stable_fraction
from asclepius.storage import AppendLog, read_log

JOURNAL = "journal"
# rouge-score's tokens without its stemmer (rouge_score/tokenize.py): lowercased, every run of characters outside
# [a-z0-9] a separator, empty tokens dropped — which is every maximal run of [a-z0-9]. Its module imports nltk, scipy
# and scikit-learn (2.5 s of CPU in the pool's actor, which every question request waited for at a stage's start).
_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """The tokens rouge-score's DefaultTokenizer(use_stemmer=False) gives (tests/generate/test_pool_equivalence.py)."""
    return _TOKEN.findall(text.lower())

_SURROGATES = 0xD800  # token ids map to code points, skipping the surrogate block (not valid in a str)


class _Growing:
    """A NumPy array appended to in amortised O(1): a posting list, the questions' lengths, their codes."""

    def __init__(self, dtype=np.int32):
        self.data, self.size = np.empty(16, dtype=dtype), 0

    def append(self, value: int) -> None:
        if self.size == len(self.data):
            self.data = np.concatenate([self.data, np.empty_like(self.data)])
        self.data[self.size] = value
        self.size += 1

    def view(self) -> np.ndarray:
        return self.data[: self.size]


class TaskPool:
    def __init__(self, seeds: list[str], threshold: float):
        self.threshold = threshold
        self.seeds = list(seeds)
        self.pool: list[str] = []
        self._ids: dict[str, str] = {}  # token → its one-character code
        self._codes = _Growing(object)  # every seed and pool question as a string of token codes
        self._lengths = _Growing()
        self._postings: dict[str, _Growing] = defaultdict(_Growing)  # token code → questions holding it
        self.exact_scores = 0  # how many exact LCS computations were needed (the filter's work)
        for q in self.seeds:
            self._add(q)

    def _encode(self, question: str) -> str:
        out = []
        for token in rouge_tokens(question):
            code = self._ids.get(token)
            if code is None:
                n = len(self._ids) + 1
                code = self._ids[token] = chr(n if n < _SURROGATES else n + 0x800)
            out.append(code)
        return "".join(out)

    def _add(self, question: str) -> None:
        codes = self._encode(question)
        i = self._codes.size
        self._codes.append(codes)
        self._lengths.append(len(codes))
        for c in set(codes):
            self._postings[c].append(i)

    def _text(self, i: int) -> str:
        return self.seeds[i] if i < len(self.seeds) else self.pool[i - len(self.seeds)]

    def most_similar(self, question: str) -> tuple[float, str | None]:
        """(score, text): the seed or pool question with the highest ROUGE-L F if that is ≥ threshold, else the
        best score among the candidates that had to be checked (all below the threshold) and None."""
        codes = self._encode(question)
        m, t = len(codes), self.threshold
        if not m or not self._codes.size:
            return 0.0, None
        slack = 1e-9  # the bounds only choose candidates: rounded towards more of them, never fewer
        shortest = max(1, math.ceil(t * m / (2 - t) - slack))
        longest = math.floor((2 - t) * m / t + slack)
        need = max(1, math.ceil(t * (m + shortest) / 2 - slack))
        counts = Counter(codes)
        prefix, covered = [], 0
        for c in sorted(counts, key=lambda c: self._postings[c].size if c in self._postings else 0):  # rarest first
            if covered >= m - need + 1:
                break
            prefix.append(c)
            covered += counts[c]
        lengths = self._lengths.view()
        holds = np.zeros(len(lengths), dtype=bool)
        for c in prefix:
            if c in self._postings:
                holds[self._postings[c].view()] = True
        candidates = np.flatnonzero(holds & (lengths >= shortest) & (lengths <= longest))
        if not len(candidates):
            return 0.0, None
        self.exact_scores += len(candidates)
        others = self._codes.view()[candidates].tolist()
        lcs = process.cdist([codes], others, scorer=LCSseq.similarity, dtype=np.int32, workers=1)[0]
        lcs = lcs.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):  # rouge-score's fmeasure, operation for operation
            precision, recall = lcs / m, lcs / lengths[candidates]
            scores = np.where(lcs > 0, 2 * precision * recall / (precision + recall), 0.0)
        best = int(np.argmax(scores))
        score = float(scores[best])
        return (score, self._text(int(candidates[best]))) if score >= t else (score, None)

    def offer(self, question: str) -> tuple[bool, float]:
        if self.threshold >= 1.0:
            self.pool.append(question)
            self._add(question)
            return True, 0.0
        score, _ = self.most_similar(question)
        if score >= self.threshold:
            return False, score
        self.pool.append(question)
        self._add(question)
        return True, score


def recorded_plans(journal_dir: str) -> dict[str, dict]:
    """The example plans a journal already holds (note id → plan): a resumed stage prices those notes' requests
    with their exact prompts, so what the ledger answers is not counted (or paid) again."""
    plans: dict[str, dict] = {}
    for line, whole in read_log(journal_dir, JOURNAL):
        if whole:
            rec = json.loads(line)
            if rec["kind"] == "plan":
                plans[rec["note_id"]] = rec
    return plans


class QuestionPool:
    """All tasks' pools, the per-note example plans, and the journal that makes both survive a restart."""

    def __init__(self, tasks: dict[str, list[str]], threshold: float, seed_examples: int, pool_examples: int,
                 seed: int, journal_dir: str | None):
        self.tasks = {name: TaskPool(seeds, threshold) for name, seeds in tasks.items()}
        self.seed_examples = seed_examples
        self.pool_examples = pool_examples
        self.seed = seed
        self.plans: dict[str, dict] = {}
        self.decisions: dict[str, dict] = {}
        self._journal = None
        self._unwritten: list[dict] | None = None  # the records of the calls in one_write, not yet journaled
        if journal_dir:
            self._replay(journal_dir)
            # the journal holds generated questions about clinical notes: private (AppendLog); named by start time
            self._journal = AppendLog(journal_dir, JOURNAL, writer_id=f"{time.time_ns():020d}-{uuid.uuid4().hex[:6]}")

    def _replay(self, journal_dir: str) -> None:
        for line, whole in read_log(journal_dir, JOURNAL):
            if not whole:
                continue  # cut short by a kill: that decision never counted
            rec = json.loads(line)
            if rec["kind"] == "plan":
                self.plans[rec["note_id"]] = rec
            elif rec["kind"] == "offer":
                self.decisions[rec["note_id"]] = rec
                if rec["accepted"]:
                    pool = self.tasks[rec["task"]]
                    pool.pool.append(rec["question"])
                    pool._add(rec["question"])

    def _write(self, record: dict) -> None:
        if self._unwritten is not None:
            self._unwritten.append(record)
        elif self._journal is not None:
            self._journal.append(record)

    @contextlib.contextmanager
    def one_write(self):
        """The decisions made inside are journaled together when it ends, before any of them is handed out: one
        fsync (or one object on object storage) for a list of calls, not one each — the pool's actor serves every
        request of the stage, and on object storage a PUT per decision would set the stage's pace."""
        self._unwritten = []
        try:
            yield
        finally:
            records, self._unwritten = self._unwritten, None
            if self._journal is not None:
                self._journal.append_many(records)

    def examples(self, note_id: str, task: str) -> dict:
        """The examples for a note's prompt: the recorded ones if it already has a plan for this task."""
        if note_id in self.plans and self.plans[note_id]["task"] == task:
            return self.plans[note_id]
        rng = random.Random(int(stable_fraction(self.seed, f"examples:{note_id}") * 2**53))
        pool = self.tasks[task]
        seeds = rng.sample(pool.seeds, min(self.seed_examples, len(pool.seeds)))
        k = min(self.pool_examples, len(pool.pool))
        picked = rng.sample(range(len(pool.pool)), k)
        plan = {"kind": "plan", "note_id": note_id, "task": task, "examples": seeds + [pool.pool[i] for i in picked],
                "pool_indices": picked, "pool_size": len(pool.pool)}  # fmt: skip
        self._write(plan)
        self.plans[note_id] = plan
        return plan

    def offer(self, note_id: str, task: str, question: str) -> dict:
        """Offer a note's generated question to its task's pool (once; the same offer again returns the decision)."""
        recorded = self.decisions.get(note_id)
        if recorded and recorded["task"] == task and recorded["question"] == question:
            return recorded
        accepted, score = self.tasks[task].offer(question)
        rec = {"kind": "offer", "note_id": note_id, "task": task, "question": question, "accepted": accepted,
               "rouge_l": round(score, 4)}  # fmt: skip
        self._write(rec)
        self.decisions[note_id] = rec
        return rec

    def stats(self) -> dict:
        offered = len(self.decisions)
        rejected = sum(1 for d in self.decisions.values() if not d["accepted"])
        return {
            "offered": offered,
            "rejected_similar": rejected,
            "rejection_rate": round(rejected / offered, 4) if offered else 0.0,
            "pool_sizes": {t: len(p.pool) for t, p in self.tasks.items()},
            "exact_rouge_computations": sum(p.exact_scores for p in self.tasks.values()),
        }


class QuestionPoolService:
    """The pool as the questions stage's actor serves it (asclepius.generate.questions.QuestionPoolActor). Calls come
    in lists, so a teacher actor's requests share a round trip (QuestionHooks), and a list's decisions share one
    journal write; a list is taken in its order, so the pool decides exactly what the same calls one by one would.
    Defined here, not beside the actor, so that its process imports only this module (not the teacher's client)."""

    def __init__(self, **kwargs):
        self.pool = QuestionPool(**kwargs)

    def examples(self, calls: list[tuple[str, str]]) -> list[dict]:
        with self.pool.one_write():
            return [self.pool.examples(note_id, task) for note_id, task in calls]

    def offer(self, calls: list[tuple[str, str, str]]) -> list[dict]:
        with self.pool.one_write():
            return [self.pool.offer(note_id, task, question) for note_id, task, question in calls]

    def stats(self):
        return self.pool.stats()
