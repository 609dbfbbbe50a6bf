"""The pool's filter is self-instruct's rule exactly: the same decisions and the same best score as rouge-score's
ROUGE-L F against every seed and pool question, on random and adversarial question sets."""

import random
import string
import sys
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from asclepius.generate.pool import TaskPool, rouge_tokens

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from question_pool import make_questions  # noqa: E402

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def test_the_tokens_are_rouge_scores():
    """rouge-score's tokenizer (no stemmer), without importing it: the same tokens on adversarial text — characters
    whose lower case is or holds ASCII (the Kelvin sign, dotted I), other digits, every separator, lone surrogates."""
    from rouge_score import tokenizers

    theirs = tokenizers.DefaultTokenizer(use_stemmer=False)
    rng = random.Random(0)
    alphabet = list(string.printable) + ["\u212a", "\u0130", "\u00df", "\uff11", "\u0663", "\u00e9", "\ud800", "\udfff", "\u00a0",
                                         "\u2028", "\x85", "\u0131", "\u017f", "\ufb01", "\U0001f600", "\u0399\u0308\u0301"]  # fmt: skip
    texts = ["", " ", "What is the EF?", "Kelvin \u212a and \u0130stanbul", "x1 2 \uff11\uff12 \u0663", "a\nb\tc\rd\x0be\x0cf"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    texts += adversarial(rng, 300) + make_questions(300, seed=1)
    for text in texts:
        assert rouge_tokens(text) == theirs.tokenize(text), repr(text)


def test_the_pool_does_not_import_rouge_score():
    """Its actor starts before any question request can be sent: nltk, scipy and scikit-learn (rouge-score's
    imports) cost seconds there."""
    import subprocess

    code = "import sys, asclepius.generate.pool; print(sorted(m for m in ('rouge_score', 'nltk', 'scipy', 'sklearn', 'openai') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def brute_force(seeds, questions, threshold):
    """rouge-score against every seed and pool question: (accepted, best score) per offer."""
    pool, out = list(seeds), []
    for q in questions:
        best = max((SCORER.score(other, q)["rougeL"].fmeasure for other in pool), default=0.0)
        accepted = threshold >= 1.0 or best < threshold
        if accepted:
            pool.append(q)
        out.append((accepted, best))
    return out


def check(seeds, questions, threshold):
    pool = TaskPool(seeds, threshold)
    expected = brute_force(seeds, questions, threshold)
    for q, (accepted, best) in zip(questions, expected):
        got_accepted, score = pool.offer(q)
        assert got_accepted == accepted, (q, score, best)
        if not accepted:
            assert score == best  # the highest F, to the last bit
        else:
            assert score <= best  # below the threshold: the best of the candidates that could reach it
    return pool


def adversarial(rng: random.Random, n: int) -> list[str]:
    """Repeated tokens, empty and punctuation-only questions, lone surrogates and other non-ASCII, digits, case."""
    words = ["a", "A", "the", "THE", "x1", "2", "é", "naïve", "\ud800", "ß", "ok", "ok-ok", "what", "What?"]
    out = []
    for _ in range(n):
        kind = rng.randrange(6)
        if kind == 0:
            out.append(" ".join([rng.choice(words)] * rng.randint(1, 12)))  # one token repeated
        elif kind == 1:
            out.append(rng.choice(["", "   ", "?!", "...", "\n\t", string.punctuation]))
        elif kind == 2 and out:
            base = rng.choice(out).split()  # a permutation of an earlier question: same tokens, other order
            rng.shuffle(base)
            out.append(" ".join(base))
        else:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 9))))
    return out


@pytest.mark.parametrize("threshold", [0.7, 2 / 3, 0.5, 1.0])
def test_same_decisions_as_rouge_score_on_realistic_questions(threshold):
    check(["What is the dose of metformin?", "Which antibiotics was the patient discharged on?"], make_questions(250, seed=3), threshold)


@pytest.mark.parametrize("seed", range(4))
def test_same_decisions_as_rouge_score_on_adversarial_questions(seed):
    rng = random.Random(seed)
    for threshold in (0.7, 0.5, 2 / 3, 0.4):
        check(["what is a"], adversarial(rng, 150), threshold)


def test_a_threshold_reached_exactly_is_too_similar():
    # m = n = 3, LCS 2: F = 2/3 exactly as rouge-score computes it, which is >= a threshold of 2/3
    pool = check(["alpha beta gamma"], ["alpha beta delta", "alpha gamma epsilon zeta eta theta"], 2 / 3)
    assert pool.pool == ["alpha gamma epsilon zeta eta theta"]


def test_the_filter_checks_few_candidates_in_a_pool_of_shared_words():
    """Prefix filtering on the rarest tokens: common words, in every question, do not make every question a candidate."""
    pool = TaskPool(["seed question"], 0.7)
    for i in range(2000):
        pool.offer(f"what is the patient discharge plan for topic{i} with item{i} and detail{i}?")
    before = pool.exact_scores
    pool.offer("what is the patient discharge plan for topic7 with something else entirely new here?")
    assert pool.exact_scores - before <= 3  # those that hold a rare token of the new question, not 2,000
