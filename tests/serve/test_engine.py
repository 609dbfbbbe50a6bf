"""The batching engine on the tiny model, without Ray."""

import pytest

from asclepius.models import chat_prompt_ids, load_model, load_tokenizer
from asclepius.serve.engine import Engine, GenRequest


@pytest.fixture(scope="module")
def engine():
    tok = load_tokenizer("tiny")
    return Engine(load_model("tiny"), tok), tok


def prompts(tok, texts):
    return [chat_prompt_ids(tok, [{"role": "user", "content": t}]) for t in texts]


def test_a_batch_gives_what_each_request_gives_alone(engine):
    eng, tok = engine
    ids = prompts(tok, ["What is HTN?", "List the discharge medications of the patient with COPD and diabetes.", "Hi"])
    reqs = [GenRequest(p, max_new_tokens=12, temperature=0) for p in ids]
    batched = eng.generate(reqs)
    alone = [eng.generate([r])[0] for r in reqs]
    assert batched == alone  # left padding, masks and positions keep rows independent
    assert list(eng.batches)[-4:] == [3, 1, 1, 1]
    assert all(n == 12 and reason == "length" for _, n, reason in batched)


def test_seeded_sampling_is_reproducible_per_request(engine):
    eng, tok = engine
    (p,) = prompts(tok, ["Summarize the hospital course."])
    a = eng.generate([GenRequest(p, 10, temperature=1.0, seed=3), GenRequest(p, 10, temperature=1.0, seed=4)])
    b = eng.generate([GenRequest(p, 10, temperature=1.0, seed=3)])
    assert a[0] == b[0] and a[0] != a[1]


def test_stop_strings_end_the_text_before_them(engine):
    eng, tok = engine
    (p,) = prompts(tok, ["Any question"])
    text, _, _ = eng.generate([GenRequest(p, 20, temperature=0)])[0]
    stop = text[3:5]
    assert stop and stop in text
    cut, n, reason = eng.generate([GenRequest(p, 20, temperature=0, stop=[stop])])[0]
    assert reason == "stop" and cut == text[: text.find(stop)] and n < 20


def test_streamed_chunks_add_up_to_the_text(engine):
    eng, tok = engine
    reqs = [GenRequest(p, 8, temperature=0) for p in prompts(tok, ["a", "bb bb"])]
    full = eng.generate(reqs)
    pieces = ["", ""]
    for step in eng.generate_stream(reqs):
        for i, chunk in enumerate(step):
            if chunk is not None:
                pieces[i] += chunk.text
    assert pieces == [full[0][0], full[1][0]]


def test_guided_choice_replies_with_one_of_the_choices(engine):
    eng, tok = engine
    choices = ["1 1", "1 2", "2 1", "4 3"]
    allowed = [list(tok(c, add_special_tokens=False)["input_ids"]) for c in choices]
    reqs = [GenRequest(p, 12, temperature=t, seed=s, allowed=allowed) for p in prompts(tok, ["Score them.", "x"]) for t, s in ((0, None), (1.0, 7))]
    for text, _, reason in eng.generate(reqs):
        assert text in choices and reason == "stop"
    free, _, _ = eng.generate([GenRequest(reqs[0].prompt_ids, 12, temperature=0)])[0]
    assert free not in choices  # unguided, the (random) tiny model says something else
