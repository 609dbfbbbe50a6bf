"""The report's numbers from a fixed scores table, checked against answers worked out by hand."""

import math

import numpy as np
import pandas as pd

from asclepius.evaluate import aggregate
from asclepius.evaluate import report as reporting


def fixed_table() -> pd.DataFrame:
    """Two models, 4 items, judged forward and reversed. Worked out by hand:
    item means  A: i1 4, i2 3.5, i3 2, i4 unscored-forward → 3 (reversed only) ; B: i1 2, i2 2, i3 2, i4 missing answer
    A mean = (4 + 3.5 + 2 + 3) / 4 = 3.125; B mean = 2.0 over 3 items."""
    rows = []

    def add(item, task, model, order, score):
        rows.append({"item_id": item, "task": task, "model": model, "order": order, "score": score})

    add("i1", "Summarization", "A", "forward", 4.0), add("i1", "Summarization", "A", "reversed", 4.0)
    add("i1", "Summarization", "B", "forward", 2.0), add("i1", "Summarization", "B", "reversed", 2.0)
    add("i2", "Summarization", "A", "forward", 4.0), add("i2", "Summarization", "A", "reversed", 3.0)  # disagree by 1
    add("i2", "Summarization", "B", "forward", 2.0), add("i2", "Summarization", "B", "reversed", 2.0)
    add("i3", "Question Answering", "A", "forward", 2.0), add("i3", "Question Answering", "A", "reversed", 2.0)
    add("i3", "Question Answering", "B", "forward", 1.0), add("i3", "Question Answering", "B", "reversed", 3.0)  # by 2
    add("i4", "Question Answering", "A", "forward", None), add("i4", "Question Answering", "A", "reversed", 3.0)  # unscored
    add("i4", "Question Answering", "B", "no answer", None)  # the endpoint failed: never a score
    return pd.DataFrame(rows)


def test_item_means_leave_unscored_and_missing_out_never_as_zero():
    items = aggregate.item_scores(fixed_table()).set_index(["item_id", "model"]).score
    assert items[("i2", "A")] == 3.5 and items[("i4", "A")] == 3.0 and math.isnan(items[("i4", "B")])
    models = aggregate.per_model(aggregate.item_scores(fixed_table()), samples=500).set_index("model")
    assert models.loc["A", "mean"] == 3.125 and models.loc["A", "scored_items"] == 4
    assert models.loc["B", "mean"] == 2.0 and (models.loc["B", "scored_items"], models.loc["B", "items"]) == (3, 4)


def test_bootstrap_ci_known_answers():
    assert aggregate.bootstrap_ci([3, 3, 3, 3]) == (3.0, 3.0)  # no spread, no interval
    lo, hi = aggregate.bootstrap_ci([])
    assert math.isnan(lo) and math.isnan(hi)
    # 400 items, half 1s and half 4s: mean 2.5, sd 1.5; the CI must match the normal approximation ±1.96·sd/√n
    values = [1] * 200 + [4] * 200
    lo, hi = aggregate.bootstrap_ci(values, samples=4000, seed=1)
    half = 1.96 * 1.5 / math.sqrt(400)
    assert abs(lo - (2.5 - half)) < 0.03 and abs(hi - (2.5 + half)) < 0.03
    # the same seed, the same interval
    assert aggregate.bootstrap_ci(values, 1000, seed=3) == aggregate.bootstrap_ci(values, 1000, seed=3)
    assert np.isclose(np.mean(aggregate.bootstrap_ci([1, 2, 3, 4, 5] * 40, 2000, 0)), 3.0, atol=0.05)


def test_tasks_distribution_pairs_and_position_bias():
    table = fixed_table()
    items = aggregate.item_scores(table)
    tasks = aggregate.per_task(items).set_index(["task", "model"])
    assert tasks.loc[("Summarization", "A"), "mean"] == 3.75 and tasks.loc[("Question Answering", "A"), "mean"] == 2.5
    assert tasks.loc[("Question Answering", "B"), "n"] == 1
    dist = aggregate.distribution(table)
    assert dist.loc["A"].tolist() == [0, 2, 2, 3] and dist.loc["B"].tolist() == [1, 4, 1, 0]
    pairs = aggregate.pairwise(items).iloc[0]
    assert (pairs.model, pairs.other, pairs.wins, pairs.ties, pairs.losses, pairs["items"]) == ("A", "B", 2, 1, 0, 3)  # i3: A 2 vs B (1 + 3) / 2 = 2, a tie
    bias = aggregate.position_bias(table)
    # judged twice with both scores: i1, i2, i3 (i4: A unscored forward, B no answer) → i2 and i3 disagree
    assert bias["items_judged_twice"] == 3 and bias["disagreeing_items"] == 2 and bias["share"] == round(2 / 3, 4)
    assert bias["per_model_mean_difference"] == {"A": round(1 / 3, 4), "B": round(-2 / 3, 4)}


def test_report_files_hold_the_tables_numbers(tmp_path):
    table = fixed_table()
    counts = {"items": 4, "judgements": 7, "unscored": 1, "reasked": 2, "missing_answers": {"A": 0, "B": 1},
              "unscored_by_model": {"A": 1, "B": 0}, "dropped": {}}  # fmt: skip
    numbers = reporting.build(table, {"A": 41.5, "B": 12.0}, counts, {"judge": {"requests": 7, "prompt_tokens": 7000,
                              "completion_tokens": 30, "cost_usd": 0.21}}, "smollm2-135m-instruct", "a fixed table", True, 500, 0)  # fmt: skip
    text = reporting.markdown(**numbers)
    reporting.plot_tasks(numbers["tasks"], str(tmp_path / "per_task.png"))
    reporting.plot_histogram(numbers["dist"], str(tmp_path / "scores.png"))
    assert (tmp_path / "per_task.png").stat().st_size > 5000 and (tmp_path / "scores.png").stat().st_size > 5000
    assert "| A | 3.12 |" in text and "| B | 2.00 |" in text  # per-model means (3.125 rounds to 3.12)
    assert "| 3 / 4 | 1 | 0 | 12.0 |" in text  # B: scored items, missing answers, unscored, length
    assert "| Summarization | 3.75 (n=2) | 2.00 (n=2) |" in text
    assert "| A | 0 | 2 | 2 | 3 |" in text and "| A | B | 2 | 1 | 0 | 3 |" in text
    assert "2 of 3 items (67%)" in text and "A +0.33, B -0.67" in text
    assert "not a GPT-4-class model" in text and "$0.2100" in text
    assert "](per_task.png)" in text and "](scores.png)" in text
    assert not reporting.is_gpt4_class("smollm2-135m-instruct") and reporting.is_gpt4_class("gpt-4o-2024-08-06")
    assert not reporting.is_gpt4_class("gpt-4o-mini") and reporting.is_gpt4_class("gpt-4.1")
    assert reporting.summary_line(numbers["models"]).startswith("evaluate: mean judge score (95% CI): A 3.12 [")


def test_what_a_weak_judges_judgements_say():
    """A judge that answers "1 2" every time prefers a position and says nothing about the models; the report says that."""
    import pandas as pd

    from asclepius.evaluate.aggregate import judge_signal
    from asclepius.evaluate.report import signal_lines

    rows = []
    for item in range(4):
        for order, agents in (("forward", ["teacher", "finetuned"]), ("reversed", ["finetuned", "teacher"])):
            for k, model in enumerate(agents):
                rows.append({"item_id": item, "task": "t", "model": model, "order": order, "agent": "AB"[k], "score": [1.0, 2.0][k]})
    scores = pd.DataFrame(rows)
    signal = judge_signal(scores)
    assert signal == {"judgements": 8, "distinct": 1, "most_common": "1 2", "most_common_share": 1.0, "first_higher": 0,
                      "second_higher": 8, "ties": 0}  # fmt: skip
    text = "\n".join(signal_lines(signal, {"share": 1.0, "items_judged_twice": 4}, {"teacher": 40.2, "finetuned": 12.0}))
    assert "the same every time, saying nothing about the models" in text
    assert "the one shown second 8, ties 0" in text and "both orders agree on 0% of 4 items" in text and "finetuned 12 tokens" in text
    scores.loc[(scores.item_id == 0) & (scores.order == "forward"), "score"] = [3.0, 3.0]
    assert judge_signal(scores)["distinct"] == 2 and judge_signal(scores)["ties"] == 1
