"""The question pool: bootstrapping examples for the question prompts, and the similarity filter.

For each note, the prompt shows `seed_examples` of its task's seed questions and up to `pool_examples` of the
questions generated for that task so far (the recipe's scheme). A new question joins the pool only if its
ROUGE-L F against every seed and pool question of the task is below the threshold (self-instruct's rule).

Exact ROUGE-L (rouge-score) is only computed for candidates that could reach the threshold: the LCS of two token
lists is at most the number of tokens they share, so F ≤ 2·shared / (len a + len b). An inverted index gives the
shared counts of every candidate in one pass over the new question's tokens, so the cost follows the few similar
questions, not the pool's size.

Every decision is journaled (`<dir>/journal-*.jsonl`, an `AppendLog`: fsynced, or one object per decision on
object storage) before it is used: which examples a note's prompt used, and which questions were offered and
accepted. Writers are named by their start time, so the journals replay in the order they were written. A resumed job replays it, so a note asks the same prompt again (and the
teacher ledger answers it without paying) and the pool is what it was.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter, defaultdict

from rouge_score import rouge_scorer, tokenizers

from asclepius.run import stable_fraction
from asclepius.storage import AppendLog, read_log

JOURNAL = "journal"


class TaskPool:
    def __init__(self, seeds: list[str], threshold: float):
        self.threshold = threshold
        self.seeds = list(seeds)
        self.pool: list[str] = []
        self._tokens: list[Counter] = []  # token counts of the seeds, then of the pool questions
        self._index: dict[str, set[int]] = defaultdict(set)
        self._tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self.exact_scores = 0  # how many exact ROUGE-L computations were needed (the prefilter's work)
        for q in self.seeds:
            self._add(q)

    def _add(self, question: str) -> None:
        counts = Counter(self._tokenizer.tokenize(question))
        i = len(self._tokens)
        self._tokens.append(counts)
        for t in counts:
            self._index[t].add(i)

    def _text(self, i: int) -> str:
        return self.seeds[i] if i < len(self.seeds) else self.pool[i - len(self.seeds)]

    def most_similar(self, question: str) -> tuple[float, str | None]:
        """(score, text): a seed or pool question with ROUGE-L F ≥ threshold if there is one, else the best score
        among the candidates that had to be checked (all below the threshold) and None."""
        counts = Counter(self._tokenizer.tokenize(question))
        n = sum(counts.values())
        if not n:
            return 0.0, None
        shared: Counter = Counter()
        for t, c in counts.items():
            for i in self._index.get(t, ()):
                shared[i] += min(c, self._tokens[i][t])
        bounds = sorted(((2 * common / (n + sum(self._tokens[i].values())), i) for i, common in shared.items()), reverse=True)
        best = 0.0
        for bound, i in bounds:
            if bound < self.threshold:
                break  # no candidate from here on can reach the threshold
            self.exact_scores += 1
            score = self._scorer.score(self._text(i), question)["rougeL"].fmeasure
            if score >= self.threshold:
                return score, self._text(i)
            best = max(best, score)
        return best, None

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
        if self._journal is not None:
            self._journal.append(record)

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
