"""The generating stages' logic without Ray: prompts, task draw, pool, filters, postprocessing."""

import json
import re
from collections import Counter

import pytest

from asclepius.config import config_from_dict
from asclepius.generate.pool import QuestionPool, QuestionPoolService, TaskPool
from asclepius.generate.postprocess import clean_question, compile_filter, instruction_drop_reason
from asclepius.generate.prompts import answer_prompt, fit_note, is_eval_note, question_prompt, synthesis_prompt, task_for
from asclepius.recipe import load_recipe
from asclepius.teacher.cost import TokenCounter

R = load_recipe()
CFG = config_from_dict({"run_dir": "/tmp/x", "notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]}})


def test_prompts_are_the_recipes_text():
    assert synthesis_prompt(CFG.synthesize.prompt, "CASE") == R.raw["note_synthesis_prompt"].replace("{pmc}", "CASE")
    assert "[The start of case report]\nCASE\n[The end of case report]" in synthesis_prompt(CFG.synthesize.prompt, "CASE")
    q = question_prompt(CFG.questions.prompt, "Summarization", "NOTE", ["ex one?", "ex two?"])
    assert q == R.raw["question_prompt"].replace("{task}", "Summarization").replace("{note}", "NOTE").replace("{samples}", "ex one?\nex two?")
    assert 'about the task of "Summarization"' in q and "[Example Questions Begin]\nex one?\nex two?\n[Example Questions End]" in q
    a = answer_prompt(CFG.answers.prompt, "NOTE", "Q?")
    assert a == R.raw["answer_prompt"].replace("{note}", "NOTE").replace("{question}", "Q?")
    assert a.endswith("Response:")
    # request parameters default to the recipe's, the answer budget to its intent (400 new tokens)
    assert (CFG.questions.temperature, CFG.questions.max_tokens, CFG.answers.max_tokens, CFG.synthesize.context_tokens) == (1.0, 300, 400, 4088)
    assert [t.task for t in CFG.questions.tasks] == R.task_names and CFG.questions.tasks[0].seed_questions == list(R.tasks[0].seed_questions)


def test_task_draw_is_reproducible_and_uniform():
    draws = [task_for(f"note-{i}", seed=0, n_tasks=8) for i in range(16000)]
    assert draws == [task_for(f"note-{i}", seed=0, n_tasks=8) for i in range(16000)]
    counts = Counter(draws)
    assert set(counts) == set(range(8)) and all(abs(c - 2000) < 200 for c in counts.values())  # ~4.5 sigma
    assert draws != [task_for(f"note-{i}", seed=1, n_tasks=8) for i in range(16000)]  # the seed matters


def test_eval_split_by_hash():
    held = [is_eval_note(f"n{i}", 0.1, 0) for i in range(5000)]
    assert 400 < sum(held) < 600 and held == [is_eval_note(f"n{i}", 0.1, 0) for i in range(5000)]
    assert not any(is_eval_note(f"n{i}", 0.0, 0) for i in range(100))


def test_pool_examples_three_seeds_and_up_to_two_from_the_pool(tmp_path):
    tasks = {t.task: list(t.seed_questions) for t in R.tasks}
    pool = QuestionPool(tasks, 0.7, 3, 2, seed=0, journal_dir=str(tmp_path))
    plan = pool.examples("n1", "Paraphrasing")
    assert len(plan["examples"]) == 3 and set(plan["examples"]) <= set(tasks["Paraphrasing"]) and plan["pool_indices"] == []
    pool.offer("n1", "Paraphrasing", "How would you explain 'myocardial infarction' to the patient's family in plain words?")
    plan2 = pool.examples("n2", "Paraphrasing")
    assert len(plan2["examples"]) == 4 and plan2["examples"][3] in pool.tasks["Paraphrasing"].pool
    for i in range(3, 6):
        pool.offer(f"n{i}", "Paraphrasing", f"Can you restate the sentence about {['sepsis', 'a stent', 'dialysis'][i - 3]} in everyday language for a layperson?")
    plan3 = pool.examples("n9", "Paraphrasing")
    assert len(plan3["examples"]) == 5 and len(set(plan3["examples"][3:]) & set(pool.tasks["Paraphrasing"].pool)) == 2
    assert pool.examples("n2", "Paraphrasing") == plan2  # a note keeps its plan

    # a restart replays the journal: same plans, same pool, same decisions
    again = QuestionPool(tasks, 0.7, 3, 2, seed=0, journal_dir=str(tmp_path))
    assert again.examples("n2", "Paraphrasing") == plan2 and again.tasks["Paraphrasing"].pool == pool.tasks["Paraphrasing"].pool
    first = pool.decisions["n1"]
    assert again.offer("n1", "Paraphrasing", first["question"]) == first  # the same offer again: the recorded decision
    # another question or task for the note (a changed config) is decided afresh, never answered from the journal
    assert again.offer("n1", "Paraphrasing", "anything else")["question"] == "anything else"
    assert again.examples("n2", "Summarization")["task"] == "Summarization"
    assert set(again.examples("n2", "Summarization")["examples"][:3]) <= set(tasks["Summarization"])


def test_a_list_of_calls_is_journaled_in_one_write_before_any_is_handed_out(tmp_path, monkeypatch):
    """The pool's actor takes its calls in lists; their decisions go to the journal in one write (one fsync, one
    object on object storage), and a call that fails part-way still journals the decisions made before it."""
    from asclepius.storage import AppendLog

    writes = []
    real = AppendLog.append_many
    monkeypatch.setattr(AppendLog, "append_many", lambda self, records: (writes.append([r["note_id"] for r in records]), real(self, records))[1])
    tasks = {t.task: list(t.seed_questions) for t in R.tasks}
    args = dict(tasks=tasks, threshold=0.7, seed_examples=3, pool_examples=2, seed=0, journal_dir=str(tmp_path))
    service = QuestionPoolService(**args)
    plans = service.examples([(f"n{i}", "Paraphrasing") for i in range(5)])
    offers = [(f"n{i}", "Paraphrasing", q) for i, q in enumerate(["Restate the sepsis line?", "Restate the sepsis line?",
                                                                  "Explain dialysis in plain words?", "", "What is a stent, simply?"])]  # fmt: skip
    decisions = service.offer(offers)
    assert writes == [[f"n{i}" for i in range(5)]] * 2  # 2 writes for 10 decisions
    assert [d["accepted"] for d in decisions] == [True, False, True, True, True]
    # the same calls one by one on a pool of their own decide the same
    alone = QuestionPool(**{**args, "journal_dir": None})
    assert [alone.examples(n, t) for n, t in [(f"n{i}", "Paraphrasing") for i in range(5)]] == plans
    assert [alone.offer(*o) for o in offers] == decisions
    with pytest.raises(KeyError):  # an unknown task, third in the list
        service.offer([("n7", "Paraphrasing", "Say 'NPO' plainly?"), ("n8", "Paraphrasing", "Say 'PRN' plainly?"), ("n9", "No such task", "?")])
    assert writes[-1] == ["n7", "n8"]
    replayed = QuestionPoolService(**args).pool  # a restart replays all 12 decisions made
    assert set(replayed.plans) == {f"n{i}" for i in range(5)} and set(replayed.decisions) == {f"n{i}" for i in (0, 1, 2, 3, 4, 7, 8)}
    assert replayed.tasks["Paraphrasing"].pool == service.pool.tasks["Paraphrasing"].pool


def test_similarity_filter():
    tp = TaskPool(list(R.seed_questions("Abbreviation Expansion")), threshold=0.7)
    near = "What is the expanded form of the abbreviation 'CHF'?"  # one word from a seed question
    accepted, score = tp.offer(near)
    assert not accepted and score >= 0.7
    distinct = "Which abbreviations in the medication list refer to dosing frequency?"
    accepted, score = tp.offer(distinct)
    assert accepted and score < 0.7 and tp.pool == [distinct]
    assert not tp.offer("Which abbreviations in the medication list refer to dosing frequency, exactly?")[0]
    # threshold 1.0 disables the filter
    assert TaskPool(list(R.seed_questions("Abbreviation Expansion")), threshold=1.0).offer(near)[0]


def test_prefilter_spares_exact_scores_for_unrelated_questions():
    tp = TaskPool(["What is the dose of metformin?"], threshold=0.7)
    for i in range(300):
        tp.offer(f"Question number {i} about topic{i} with words w{i}a w{i}b w{i}c?")
    before = tp.exact_scores
    tp.offer("Describe the patient's wound care plan after discharge.")
    assert tp.exact_scores - before <= 2  # not one per pool question


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("  What was the EF?  ", ("What was the EF?", "ok")),
        ('"What was the EF?"', ("What was the EF?", "ok")),
        ("Question: What was the EF?", ("What was the EF?", "ok")),
        ("1. What was the EF?\n2. When was the echo?", ("What was the EF?", "multiple")),
        ("Here is a question:\nWhat was the EF?", ("What was the EF?", "multiple")),
        ("", (None, "empty")),
        (None, (None, "empty")),
        ('""', (None, "empty")),
    ],
)
def test_clean_question(reply, expected):
    assert clean_question(reply) == expected


def test_recipe_filters_on_crafted_rows():
    regex = compile_filter(CFG.answers.filter_regex)
    end = CFG.answers.drop_if_answer_endswith
    assert instruction_drop_reason("note", "q", "The EF was 35%.", regex, end) is None
    assert instruction_drop_reason("note", "q", "As an AI language model, I cannot", regex, end) == "model_mention_in_answer"
    assert instruction_drop_reason("note", "Ask THE MODEL this", "fine.", regex, end) == "model_mention_in_question"
    assert instruction_drop_reason("pt seen by NER Model team", "q", "fine.", regex, end) == "model_mention_in_note"
    assert instruction_drop_reason("note", "q", "Could you clarify which medication?", regex, end) == "answer_ends_with_question_mark"
    assert instruction_drop_reason("note", "q", "The model of care was... fine", regex, end) == "model_mention_in_answer"  # the recipe's regex is that blunt
    assert isinstance(regex, re.Pattern) and regex.flags & re.IGNORECASE


def test_fit_note_truncates_to_the_budget():
    counter = TokenCounter("bytes")
    render = lambda n: f"PROMPT [{n}] END"  # noqa: E731
    note = "word " * 1000
    fitted, truncated = fit_note(note, render, counter, budget=300)
    assert truncated and counter.count_text(render(fitted)) <= 300 and counter.count_text(render(fitted)) > 250
    assert fit_note("short", render, counter, 300) == ("short", False)
    assert fit_note(note, render, counter, budget=2) is None
    json.dumps(fitted)


def test_another_teacher_model_reruns_the_generating_stages():
    from asclepius.generate.answers import STAGE as ANSWERS

    def _stage_hash(cfg, _):
        return ANSWERS.config_hash(cfg)

    base = {"run_dir": "/tmp/x", "notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]},
            "teacher": {"provider": "openai_compatible", "base_url": "http://h/v1", "model": "a"}}  # fmt: skip
    one = config_from_dict(base)
    assert _stage_hash(one, "answers") == _stage_hash(config_from_dict(base, ["teacher.requests_per_minute=10"]), "answers")
    assert _stage_hash(one, "answers") != _stage_hash(config_from_dict(base, ["teacher.model=b"]), "answers")
