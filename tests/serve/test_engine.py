"""The continuous-batching engine on the tiny model, without Ray."""

import threading
import time

import pytest
import torch

from asclepius.models import chat_prompt_ids, load_model, load_tokenizer
from asclepius.serve.engine import Engine, EngineOverloaded, GenRequest


@pytest.fixture(scope="module")
def parts():
    tok = load_tokenizer("tiny")
    return load_model("tiny"), tok


@pytest.fixture
def engine(parts):
    model, tok = parts
    return Engine(model, tok), tok


def prompts(tok, texts):
    return [chat_prompt_ids(tok, [{"role": "user", "content": t}]) for t in texts]


def collect(eng, reqs):
    """Submit, drive the loop here, and return each request's chunks."""
    chunks = [[] for _ in reqs]
    eng.submit(reqs, [chunks[i].append for i in range(len(reqs))])
    eng.run_until_done()
    return chunks


def test_a_batch_gives_what_each_request_gives_alone(engine):
    eng, tok = engine
    ids = prompts(tok, ["What is HTN?", "List the discharge medications of the patient with COPD and diabetes.", "Hi"])
    reqs = [GenRequest(p, max_new_tokens=12, temperature=0) for p in ids]
    batched = eng.generate(reqs)
    assert max(eng.batches) == 3  # decoded together
    alone = [Engine(eng.model, tok).generate([r])[0] for r in reqs]
    assert batched == alone  # left padding, masks and positions keep rows independent
    assert all(n == 12 and reason == "length" for _, n, reason in batched)


def test_requests_join_and_leave_between_steps(engine):
    eng, tok = engine
    long, short = prompts(tok, ["Summarize the hospital course in detail.", "Hi"])
    eng.submit([GenRequest(long, 60, temperature=0, request_id="long")], [lambda c: None])
    for _ in range(5):
        eng.step()  # the long request is decoding
    done_at = {}
    eng.submit([GenRequest(short, 3, temperature=0, request_id="short")], [lambda c: c.finish_reason and done_at.setdefault("short", eng.steps)])
    steps_before = eng.steps
    while eng.batch.rows or eng.waiting:
        eng.step()
        if "short" in done_at and "long_left" not in done_at:
            done_at["long_left"] = [r.req.request_id for r in eng.batch.rows]
    assert done_at["short"] - steps_before <= 4  # it joined at once and left after its 3 tokens
    assert done_at["long_left"] == ["long"]  # the long one kept decoding without it
    assert 2 in eng.batches and list(eng.batches)[-1] == 1


def test_joining_does_not_change_anyone_s_tokens(engine):
    eng, tok = engine
    reqs = [GenRequest(p, n, temperature=0, request_id=str(i)) for i, (p, n) in enumerate(zip(prompts(tok, ["a b c", "d", "e f g h i j", "k l", "m"]), [5, 40, 12, 3, 25]))]
    small = Engine(eng.model, tok, max_batch_size=2)  # 5 requests through a batch of 2: they must take turns
    together = small.generate(reqs)
    assert together == [Engine(eng.model, tok).generate([r])[0] for r in reqs]
    assert max(small.batches) == 2 and small.steps < sum(r.max_new_tokens for r in reqs)


def test_seeded_sampling_is_reproducible_per_request(engine):
    eng, tok = engine
    (p,) = prompts(tok, ["Summarize the hospital course."])
    a = eng.generate([GenRequest(p, 10, temperature=1.0, seed=3), GenRequest(p, 10, temperature=1.0, seed=4)])
    b = eng.generate([GenRequest(p, 10, temperature=1.0, seed=3)])
    assert a[0] == b[0] and a[0] != a[1]
    assert eng.generate([GenRequest(p, 4, temperature=1.0, seed=2**64 - 1)])[0][1] == 4  # a seed past 63 bits is fine


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
    chunks = collect(eng, reqs)
    assert ["".join(c.text for c in cs) for cs in chunks] == [full[0][0], full[1][0]]
    assert all(cs[-1].finish_reason == "length" and cs[-1].completion_tokens == 8 for cs in chunks)


def test_cancel_stops_a_generation_at_the_next_step(engine):
    eng, tok = engine
    (p,) = prompts(tok, ["Write a long discharge summary."])
    got = []
    eng.submit([GenRequest(p, 200, temperature=0, request_id="gone"), GenRequest(p, 6, temperature=0, request_id="stays")],
               [got.append, lambda c: None])  # fmt: skip
    for _ in range(4):
        eng.step()
    eng.cancel("gone")
    n = len(got)
    eng.run_until_done()
    assert len(got) == n and not eng.batch.rows and eng.steps < 20  # nothing more sent; 200 tokens never generated


def test_a_failing_request_does_not_fail_the_others(engine):
    eng, tok = engine
    ids = prompts(tok, ["one", "two", "three"])
    out = [[], [], []]

    def broken(chunk):  # a receiver that fails (e.g. a request whose stream handling raises)
        if chunk.finish_reason != "error":
            raise RuntimeError("boom")
        out[1].append(chunk)

    eng.submit([GenRequest(p, 5, temperature=0) for p in ids], [out[0].append, broken, out[2].append])
    eng.run_until_done()
    assert out[1][-1].finish_reason == "error" and "RuntimeError" in out[1][-1].error
    assert [c[-1].finish_reason for c in (out[0], out[2])] == ["length", "length"]


def test_logprobs_are_the_model_s_own(parts):
    model, tok = parts
    eng = Engine(model, tok)
    (p,) = prompts(tok, ["What is the EF?"])
    chunks = collect(eng, [GenRequest(p, 3, temperature=0, logprobs=2, prompt_logprobs=1)])[0]
    entries = [e for c in chunks for e in c.logprobs]
    generated = [e.token_id for e in entries]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + generated])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    for i, e in enumerate(entries):  # the token at position len(p)+i is predicted by the logits at len(p)+i-1
        assert e.logprob == pytest.approx(float(lp[len(p) - 1 + i, e.token_id]), abs=1e-4)
        assert e.top[0][0] == e.token_id and len(e.top) == 2  # greedy: the chosen token is the top one
    prompt = chunks[0].prompt_logprobs
    assert prompt[0].logprob is None and len(prompt) == len(p)
    assert prompt[3].logprob == pytest.approx(float(lp[2, p[3]]), abs=1e-4) and len(prompt[3].top) == 1


def test_logit_bias_and_guided_choice(engine):
    eng, tok = engine
    (p,) = prompts(tok, ["Score them."])
    forced = tok("oxygen", add_special_tokens=False)["input_ids"][0]
    text, _, _ = eng.generate([GenRequest(p, 3, temperature=0, logit_bias={forced: 100.0})])[0]
    assert text.startswith(tok.decode([forced]).strip()[:3])
    choices = ["1 1", "1 2", "2 1", "4 3"]
    allowed = [list(tok(c, add_special_tokens=False)["input_ids"]) for c in choices]
    reqs = [GenRequest(q, 12, temperature=t, seed=s, allowed=allowed) for q in prompts(tok, ["Score them.", "x"]) for t, s in ((0, None), (1.0, 7))]
    for text, _, reason in eng.generate(reqs):
        assert text in choices and reason == "stop"
    free, _, _ = eng.generate([GenRequest(reqs[0].prompt_ids, 12, temperature=0)])[0]
    assert free not in choices  # unguided, the (random) tiny model says something else


def test_full_engine_refuses_with_a_retry_time(parts):
    model, tok = parts
    eng = Engine(model, tok, max_batch_size=2, max_waiting=2)
    (p,) = prompts(tok, ["x"])
    eng.submit([GenRequest(p, 5) for _ in range(3)], [lambda c: None] * 3)
    with pytest.raises(EngineOverloaded) as err:
        eng.submit([GenRequest(p, 5) for _ in range(2)], [lambda c: None] * 2)  # all or none: 3 + 2 > 4
    assert err.value.retry_after_s >= 1 and eng.load() == (0, 3)
    eng.run_until_done()


def test_the_engine_thread_serves_concurrent_submitters(parts):
    model, tok = parts
    eng = Engine(model, tok, max_batch_size=8)
    eng.start()
    results, lock = {}, threading.Lock()

    def client(i):
        done = threading.Event()
        text = []

        def emit(c):
            text.append(c.text)
            if c.finish_reason:
                with lock:
                    results[i] = ("".join(text), c.finish_reason)
                done.set()

        eng.submit([GenRequest(prompts(tok, [f"q {i}"])[0], 4 + i, temperature=0)], [emit])
        assert done.wait(60)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    started = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    eng.stop()
    assert len(results) == 6 and time.time() - started < 60 and max(eng.batches) > 1


def test_a_degenerate_loop_is_cut_to_one_copy_when_asked(engine):
    from asclepius.serve.engine import loop_period

    assert loop_period([5, 1, 2, 3, 1, 2, 3, 1, 2, 3]) == 3 and loop_period([7, 7, 7]) == 1
    assert loop_period([1, 2, 3, 1, 2, 3]) == 0 and loop_period([1, 2, 3, 4, 1, 2, 3, 5]) == 0  # twice is not a loop
    eng, tok = engine
    (p,) = prompts(tok, ["Say it again."])
    phrase = list(tok("oxygen saturation", add_special_tokens=False)["input_ids"])
    # the bias makes the tiny model say the phrase's tokens over and over
    bias = {t: 100.0 for t in phrase}
    looped, n_looped, reason_looped = eng.generate([GenRequest(p, 40, temperature=0, logit_bias=bias)])[0]
    cut, n_cut, reason = eng.generate([GenRequest(p, 40, temperature=0, logit_bias=bias, cut_repetition=True)])[0]
    assert reason_looped == "length" and n_looped == 40
    assert reason == "repetition" and n_cut < 40 and looped.startswith(cut) and cut
    assert loop_period(list(tok(cut, add_special_tokens=False)["input_ids"])) == 0  # what is left does not loop


def test_the_answer_endpoint_stops_at_the_recipes_prompt_markers_by_default():
    from asclepius.recipe import load_recipe
    from asclepius.serve.schemas import PROMPT_MARKERS, AnswerRequest

    assert all(marker in load_recipe().model_prompt for marker in PROMPT_MARKERS)
    default = AnswerRequest.model_validate({"note": "n", "question": "q"})
    assert default.stops == list(PROMPT_MARKERS) and default.cut_repetition
    recipe = AnswerRequest.model_validate({"note": "n", "question": "q", "stop": [], "cut_repetition": False})
    assert recipe.stops == [] and not recipe.cut_repetition  # what stage 8 sends: the recipe's settings
    with pytest.raises(ValueError):
        AnswerRequest.model_validate({"note": "n", "question": "q", "stop": [""]})
