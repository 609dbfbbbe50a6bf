"""The question pool at the recipe's size: offering N generated questions to one task's pool, 1k to 20k.

    python benchmarks/question_pool.py                       # 1k, 2k, 5k, 10k, 20k; ours, and the old pool up to 5k
    python benchmarks/question_pool.py --sizes 20000 --baseline-max 0

The questions are realistic for the filter: a shared clinical vocabulary (Zipf-distributed, so the common words
— "what", "the", "patient", "discharge" — are in most questions and their posting lists span the pool), question
openings and templates as the teacher writes them, 8–30 tokens, with near-duplicates among them. Every question is
offered in order (self-instruct's rule: it joins only if its ROUGE-L F against every seed and pool question is below
0.7). The baseline is the previous TaskPool (token-count bound + rouge-score's Python LCS), measured in the same
run up to --baseline-max; both must take the same decisions. Appends a row to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from record import record  # noqa: E402

OPENINGS = ["What", "Which", "How", "When", "Why", "Based on the discharge summary, what", "According to the note, which",
            "Can you explain what", "In the hospital course, how", "What was the", "Please summarize how", "Is there any mention of"]
COMMON = ("the patient was is of and to in for with on at during after before discharge hospital course admission "
          "summary note given treated diagnosed history medication medications dose plan follow up care status "
          "reported noted symptoms condition findings management").split()
CLINICAL = ("hypertension diabetes mellitus insulin metformin lisinopril atrial fibrillation warfarin heparin pneumonia "
            "sepsis antibiotics vancomycin ceftriaxone creatinine potassium sodium hemoglobin troponin echocardiogram "
            "ejection fraction catheterization stent cabg copd exacerbation albuterol prednisone asthma stroke aphasia "
            "hemiparesis mri ct angiography dvt pulmonary embolism anticoagulation cirrhosis ascites paracentesis "
            "lactulose encephalopathy renal failure dialysis furosemide edema chf bnp pacemaker syncope seizure "
            "levetiracetam eeg biopsy carcinoma chemotherapy radiation wound debridement cellulitis abscess drainage "
            "fracture orif physical therapy delirium haloperidol pain morphine oxycodone constipation nausea "
            "ondansetron glucose ketoacidosis hyperkalemia hyponatremia transfusion platelets coagulopathy intubation "
            "extubation tracheostomy ventilator oxygen saturation").split()


def make_questions(n: int, seed: int = 0) -> list[str]:
    """n questions over a shared vocabulary: Zipf over the clinical words, the common words in most questions,
    and one in ten a light rewording of an earlier one (what the filter exists to catch)."""
    rng = random.Random(seed)
    weights = [1 / (r + 1) ** 1.1 for r in range(len(CLINICAL))]
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < 0.1:  # a near-duplicate: one word changed or added
            words = rng.choice(out).rstrip("?").split()
            i = rng.randrange(len(words))
            words[i] = rng.choice(COMMON + CLINICAL)
            if rng.random() < 0.5:
                words.insert(rng.randrange(len(words) + 1), rng.choice(COMMON))
            out.append(" ".join(words) + "?")
            continue
        words = rng.choice(OPENINGS).split()
        for _ in range(rng.randint(6, 24)):
            words.append(rng.choices(CLINICAL, weights)[0] if rng.random() < 0.45 else rng.choice(COMMON))
        out.append(" ".join(words) + "?")
    return out


class OldTaskPool:
    """The pool before this benchmark (kept here as the baseline): an inverted index gives each candidate's shared
    token count, F ≤ 2·shared / (m + n) bounds it, and rouge-score computes the survivors exactly."""

    def __init__(self, seeds, threshold):
        from rouge_score import rouge_scorer, tokenizers

        self.threshold, self.seeds, self.pool = threshold, list(seeds), []
        self._tokens, self._index = [], defaultdict(set)
        self._tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        for q in self.seeds:
            self._add(q)

    def _add(self, question):
        counts = Counter(self._tokenizer.tokenize(question))
        i = len(self._tokens)
        self._tokens.append(counts)
        for t in counts:
            self._index[t].add(i)

    def _text(self, i):
        return self.seeds[i] if i < len(self.seeds) else self.pool[i - len(self.seeds)]

    def offer(self, question):
        counts = Counter(self._tokenizer.tokenize(question))
        n = sum(counts.values())
        shared = Counter()
        for t, c in counts.items():
            for i in self._index.get(t, ()):
                shared[i] += min(c, self._tokens[i][t])
        bounds = sorted(((2 * common / (n + sum(self._tokens[i].values())), i) for i, common in shared.items()), reverse=True)
        for bound, i in bounds:
            if bound < self.threshold:
                break
            if self._scorer.score(self._text(i), question)["rougeL"].fmeasure >= self.threshold:
                return False
        self.pool.append(question)
        self._add(question)
        return True


def timed(pool_class, seeds, questions, threshold) -> tuple[float, list[bool]]:
    pool = pool_class(seeds, threshold)
    started = time.perf_counter()
    decisions = []
    for q in questions:
        accepted = pool.offer(q)
        decisions.append(accepted[0] if isinstance(accepted, tuple) else accepted)
    return time.perf_counter() - started, decisions


def main() -> None:
    from asclepius.generate.pool import TaskPool
    from asclepius.recipe import load_recipe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,2000,5000,10000,20000")
    ap.add_argument("--baseline-max", type=int, default=5000, help="largest size the old pool is timed at (it grows ~N^2.3)")
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    seeds = list(load_recipe().seed_questions("Question Answering"))
    sizes = [int(s) for s in args.sizes.split(",")]
    questions = make_questions(max(sizes))
    ours, old = {}, {}
    for n in sizes:
        seconds, decisions = timed(TaskPool, seeds, questions[:n], args.threshold)
        ours[n] = seconds
        line = f"{n:>6} questions: ours {seconds:7.2f} s, {sum(decisions):>6} accepted"
        if n <= args.baseline_max:
            old_seconds, old_decisions = timed(OldTaskPool, seeds, questions[:n], args.threshold)
            assert old_decisions == decisions, "the two pools took different decisions"
            old[n] = old_seconds
            line += f"; old pool {old_seconds:7.2f} s (same decisions), {old_seconds / seconds:.1f}x"
        print(line, flush=True)
    growth = ""
    if len(sizes) >= 2:
        import math

        a, b = sizes[0], sizes[-1]
        growth = f"ours grows ~N^{math.log(ours[b] / max(ours[a], 1e-9)) / math.log(b / a):.2f} from {a:,} to {b:,}"
        print(growth)
    if not args.no_record:
        figures = "; ".join(f"{n:,}: ours {ours[n]:.1f} s" + (f", old {old[n]:.1f} s" if n in old else "") for n in sizes)
        biggest_old = max(old) if old else None
        ratio = f"{old[biggest_old] / ours[biggest_old]:.0f}x at {biggest_old:,}; {growth}" if biggest_old else growth
        record("question_pool", f"python benchmarks/question_pool.py --sizes {args.sizes} --baseline-max {args.baseline_max}",
               "one task's pool, realistic questions (shared Zipf clinical vocabulary, 10 % near-duplicates), ROUGE-L 0.7, "
               "every question offered in order", figures + "; same decisions", f"{ratio}; goal < 60 s at 20,000", "2 CPU")  # fmt: skip


if __name__ == "__main__":
    main()
