"""The recipe's judge: prompt text, seeded agent order, and reading scores out of messy replies."""

import pytest

from asclepius.evaluate.judge import agent_order, answers_block, judge_prompt, parse_scores, repair_message
from asclepius.recipe import load_recipe

RECIPE = load_recipe().raw


def test_judge_prompt_is_the_recipes_text():
    answers = ["Aspirin 81 mg.", "Metoprolol."]
    prompt = judge_prompt(RECIPE["judge_prompt"], "Pt w/ CAD.", "Which medications?", answers)
    # the recipe's eval/gpt4_evaluate.py, generate_inst_prompt, written out by hand
    block = ("[Agent A's Answer Begin]\nAspirin 81 mg.\n[Agent A's Answer End]\n\n"
             "[Agent B's Answer Begin]\nMetoprolol.\n[Agent B's Answer End]\n\n")  # fmt: skip
    assert answers_block(answers) == block
    assert prompt == RECIPE["judge_prompt"].format(note="Pt w/ CAD.", question="Which medications?", answers=block, num_samples=2)
    assert prompt.startswith("You are an intelligent clinical language model. \n\n[Discharge Summary Begin]\nPt w/ CAD.\n")
    assert "You are also provided with 2 corresponding responses from 2 different clinical models." in prompt
    assert prompt.endswith("The 2 scores are separated by a space.\nOutput scores without explanation.\n")
    assert RECIPE["judge_request"]["temperature"] == 0


def test_agent_order_is_seeded_per_item_and_reversible():
    orders = {tuple(agent_order(0, f"item-{i}", 3)) for i in range(40)}
    assert len(orders) > 3  # shuffled, not one fixed order
    assert agent_order(0, "item-7", 3) == agent_order(0, "item-7", 3)  # the same on every run
    assert agent_order(0, "item-7", 3, reverse=True) == agent_order(0, "item-7", 3)[::-1]
    assert any(agent_order(1, f"item-{i}", 3) != agent_order(0, f"item-{i}", 3) for i in range(10))  # the seed counts


def test_scores_map_back_to_the_right_model_in_both_orders():
    models = ["finetuned", "teacher", "gpt"]
    quality = {"finetuned": 4, "teacher": 2, "gpt": 3}
    for item in ("a", "b", "c", "d"):
        for reverse in (False, True):
            order = agent_order(5, item, 3, reverse)
            agents = [models[k] for k in order]  # Agent A, B, C
            reply = " ".join(str(quality[m]) for m in agents)  # a judge that knows each model's quality
            scores = parse_scores(reply, 3).scores
            assert dict(zip(agents, scores)) == quality


GOOD = [
    ("3 4", 2, [3, 4]),
    ("3, 4", 2, [3, 4]),
    ('"3 4"', 2, [3, 4]),
    ("'2 1'", 2, [2, 1]),
    ("Agent A: 3, Agent B: 4", 2, [3, 4]),
    ("Agent B: 4\nAgent A: 3", 2, [3, 4]),  # labelled: read by letter, in any order
    ("Scores: 3 4", 2, [3, 4]),
    ("3/4 2/4", 2, [3, 2]),
    ("3 4\nExplanation: Agent A omitted 5 of the findings", 2, [3, 4]),  # the first line only
    ("**3** **4**", 2, [3, 4]),
    ("[3, 4, 1]", 3, [3, 4, 1]),
    ("A: 3 B: 4", 2, [3, 4]),
    ("1. 3\n2. 4", 2, [3, 4]),
    ("\n\n2 4\n", 2, [2, 4]),
    ("Agent A - 3; Agent B - 4", 2, [3, 4]),
    ("The scores are: A=2, B=3, C=1", 3, [2, 3, 1]),
    ("4", 1, [4]),
]
BAD = [
    ("", 2, "empty"),
    (None, 2, "empty"),
    ("3", 2, "1 scores for 2 answers"),
    ("3 4 2", 2, "3 scores for 2 answers"),
    ("5 3", 2, "outside 1-4"),
    ("0 3", 2, "outside 1-4"),
    ("-1 3", 2, "outside 1-4"),
    ("3.5 4", 2, "not an integer"),
    ("three four", 2, "0 scores"),
    ("I cannot judge these answers.", 2, "0 scores"),
    ("Agent A: 3", 2, "1 scores for 2 answers"),
    ("10 4", 2, "outside 1-4"),
]


@pytest.mark.parametrize("reply,n,scores", GOOD)
def test_parser_reads_messy_replies(reply, n, scores):
    assert parse_scores(reply, n).scores == scores


@pytest.mark.parametrize("reply,n,reason", BAD)
def test_parser_refuses_what_is_not_one_score_per_answer(reply, n, reason):
    parsed = parse_scores(reply, n)
    assert parsed.scores is None and reason in parsed.error


def test_repair_message_restates_the_rule():
    assert "only 3 values" in repair_message(3) and "Agent A to Agent C" in repair_message(3)
