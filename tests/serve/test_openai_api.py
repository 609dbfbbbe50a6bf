"""The served API as real clients and attackers use it: malformed requests, batch-mates, overload, disconnects,
auth that fails closed, replica logs, and the OpenAI features the official client and lm-eval use."""

import concurrent.futures as cf
import http.client
import json
import os
import time
import urllib.error
import urllib.request

import openai
import pytest
import ray
import torch
from ray import serve

from asclepius.config import ServeConfig
from asclepius.serve.app import ServeConfigError, start
from asclepius.testing.server_process import free_port

pytestmark = pytest.mark.ray
KEY = "k-openai-api-test"


def model(name, **kw):
    return {"name": name, "source": "tiny", "num_cpus": 0, "max_batch_size": 8, "max_queued_requests": 24, **kw}


FAMILY_SOURCES = {"qwen2": "tiny-qwen2", "mistral": "tiny-mistral"}  # and Llama-3 under the adapter (a replica each costs ~8 s)
NOTE, QUESTION = "Pt w/ CHF, EF 35%. Discharged on furosemide.", "What is the EF?"


def adapter_export(directory):
    """A LoRA adapter on tiny-llama3 saved as training's `lora.export: adapter` saves it (no base weights), with B
    drawn at random (a trained adapter is not zero); and the answer base + adapter give in process, unmerged."""
    from asclepius.config import config_from_dict
    from asclepius.console import model_answer
    from asclepius.models import load_model, load_tokenizer, text_prompt_ids
    from asclepius.recipe import load_recipe
    from asclepius.serve.engine import Engine, GenRequest
    from asclepius.serve.schemas import PROMPT_MARKERS
    from asclepius.train.adapters import add_adapter, export_adapter_model
    from asclepius.train.loop import save_tokenizer

    hp = config_from_dict({"run_dir": "/tmp/x", "notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]},
                           "finetune": {"method": "lora", "lora": {"rank": 8, "alpha": 16, "export": "adapter"}}}).finetune  # fmt: skip
    model = add_adapter(load_model("tiny-llama3"), hp)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    tok = load_tokenizer("tiny-llama3")
    export_adapter_model(model, hp, 2, str(directory), rank=0, shard_size="4GB")
    save_tokenizer(tok, str(directory), rank=0)
    prompt = load_recipe().model_prompt.format(note=NOTE, question=QUESTION)
    request = GenRequest(text_prompt_ids(tok, prompt), 12, temperature=0, stop=list(PROMPT_MARKERS), cut_repetition=True)
    with_adapter = Engine(model.eval(), tok).generate([request])[0][0]
    assert with_adapter != model_answer("tiny-llama3", NOTE, QUESTION, max_tokens=12)  # the adapter changes what it says
    return with_adapter


@pytest.fixture(scope="module")
def app(ray_local, tmp_path_factory):
    port = free_port()
    adapter_dir = tmp_path_factory.mktemp("lora-llama3")
    adapter_answer = adapter_export(adapter_dir)
    families = [model(name, source=source) for name, source in FAMILY_SOURCES.items()] + [model("lora-llama3", source=str(adapter_dir))]
    url = start(ServeConfig(port=port, app_name="api", route_prefix="/api",
                            models=[model("tiny-a"), model("tiny-b", context_length=256), *families]))  # fmt: skip
    small = start(ServeConfig(port=port, app_name="busy", route_prefix="/busy", models=[model("tiny-busy", max_batch_size=2, max_queued_requests=2)]))
    yield {"url": url, "small": small, "port": int(url.split(":")[2].split("/")[0]), "adapter_answer": adapter_answer}  # Serve's port (it may run already)
    for name in ("api", "busy"):
        serve.delete(name)


def client(url, key="none"):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


def send(url, raw: bytes, headers=None):
    req = urllib.request.Request(url, data=raw, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def post(url, body, headers=None):
    status, raw, hdrs = send(url, json.dumps(body).encode() if not isinstance(body, bytes) else body, headers)
    return status, json.loads(raw), hdrs


CHAT = {"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
CMPL = {"model": "tiny-a", "prompt": "The patient", "max_tokens": 4}
# (route, body or raw bytes, status, the field the error must name (param) or a phrase of its message)
MALFORMED = [
    ("chat/completions", {**CHAT, "stop": ""}, 400, "stop"),
    ("chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("chat/completions", {**CHAT, "seed": 2**64}, 400, "seed"),
    ("chat/completions", {**CHAT, "seed": -(2**63) - 1}, 400, "seed"),
    ("chat/completions", b'{"model": "tiny-a", "messages": [{"role": "user", "content": "x"}], "max_tokens": ' + b"9" * 5000 + b"}", 400, "too large"),
    ("chat/completions", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ("chat/completions", b'{"model": "tiny-a", "messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages.0.content"),
    ("chat/completions", b'{"model": "tiny-a", "messages": [{"role": "user", "content": "ok"}], "user": "\\udfff"}', 400, "user"),
    ("chat/completions", b"\xff\xfe{}", 400, "UTF-8"),
    ("chat/completions", b"{not json", 400, "not valid JSON"),
    ("chat/completions", b"[]", 400, "JSON object"),
    ("chat/completions", {**CHAT, "n": 0}, 400, "n"),
    ("chat/completions", {**CHAT, "n": 17}, 400, "n"),
    ("chat/completions", {**CHAT, "temperature": -1}, 400, "temperature"),
    ("chat/completions", {**CHAT, "temperature": 3}, 400, "temperature"),
    ("chat/completions", {**CHAT, "top_p": 0}, 400, "top_p"),
    ("chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("chat/completions", {**CHAT, "max_tokens": -5}, 400, "max_tokens"),
    ("chat/completions", {**CHAT, "max_tokens": "lots"}, 400, "max_tokens"),
    ("chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("chat/completions", {"model": "tiny-a"}, 400, "messages"),
    ("chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
    ("chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    ("chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": None}]}, 400, "messages.0.content"),
    ("chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("chat/completions", {**CHAT, "tool_choice": "auto"}, 400, "tool_choice"),
    ("chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat/completions", {**CHAT, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("chat/completions", {**CHAT, "logit_bias": {"5": 200}}, 400, "logit_bias"),
    ("chat/completions", {**CHAT, "logit_bias": {"999999": 1}}, 400, "logit_bias"),
    ("chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("chat/completions", {**CHAT, "frequency_penalty": 5}, 400, "frequency_penalty"),
    ("chat/completions", {**CHAT, "store": True}, 400, "store"),
    ("chat/completions", {**CHAT, "surprise": 1}, 400, "surprise"),
    ("chat/completions", {**CHAT, "guided_choice": []}, 400, "guided_choice"),
    ("chat/completions", {**CHAT, "model": "gpt-4"}, 404, "model"),
    ("chat/completions", {**CHAT, "model": "tiny-b", "messages": [{"role": "user", "content": "word " * 400}], "max_tokens": 10}, 400, "context"),
    ("completions", {**CMPL, "prompt": []}, 400, "prompt"),
    ("completions", {**CMPL, "prompt": [[]]}, 400, "prompt"),
    ("completions", {**CMPL, "prompt": [1, -1]}, 400, "prompt"),
    ("completions", {**CMPL, "prompt": [10**12]}, 400, "prompt"),
    ("completions", {**CMPL, "prompt": [5, 999999]}, 400, "prompt"),
    ("completions", {**CMPL, "prompt": ["x"] * 65}, 400, "prompt"),
    ("completions", {**CMPL, "prompt": ["x"] * 32, "n": 16}, 400, "prompt"),  # 512 generations: beyond the queue, refused whole
    ("completions", {**CMPL, "best_of": 3}, 400, "best_of"),
    ("completions", {**CMPL, "suffix": "end"}, 400, "suffix"),
    ("completions", {**CMPL, "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {**CMPL, "logprobs": 6}, 400, "logprobs"),
    ("completions", {**CMPL, "prompt": 7}, 400, "prompt"),
    ("answer", {"note": "", "question": "q"}, 400, "note"),
    ("answer", {"note": "n", "question": "q", "stream": True}, 400, "stream"),
    ("answer", {"note": "n", "question": "q", "seed": 2**70}, 400, "seed"),
    ("answer", b'{"note": "n", "question": "\\ud83d"}', 400, "question"),
    ("answer", {"note": "n", "question": "q", "model": "nope"}, 404, "model"),
    ("answer", b'{"note": "n", "question": "q", "max_tokens": 1e400}', 400, "max_tokens"),
    ("answer", {"note": "n", "question": "q", "temperature": "hot"}, 400, "temperature"),
    ("chat/completions", {**CHAT, "model": 5}, 400, "model"),
    ("chat/completions", {**CHAT, "n": 2.5}, 400, "n"),
    ("chat/completions", {**CHAT, "stream": "yes"}, 400, "stream"),
    ("completions", {**CMPL, "stream": True, "echo": True}, 400, "stream"),
    ("completions", {**CMPL, "prompt": [[1, 2], "mixed"]}, 400, "prompt"),
]


def test_every_malformed_request_is_a_4xx_with_an_openai_error(app):
    base = app["url"]
    seen = []
    for route, body, status, named in MALFORMED:
        code, raw, _ = send(f"{base}/{route}", body if isinstance(body, bytes) else json.dumps(body).encode())
        err = json.loads(raw)["error"]
        seen.append((route, code))
        assert code == status, (route, body if not isinstance(body, bytes) else body[:60], code, err)
        assert set(err) >= {"message", "type", "param", "code"}
        assert named == err["param"] or named in err["message"], (named, err)
    assert len(seen) == len(MALFORMED) >= 64
    code, raw, _ = send(f"{base}/chat/completions", b'{"x": "' + b"a" * (17 << 20) + b'"}')  # over 16 MiB
    assert code == 413
    # the official client sees 400 as BadRequestError (a 422 would be UnprocessableEntityError and slip past)
    with pytest.raises(openai.BadRequestError):
        client(base).chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "x"}], max_tokens=2, temperature=7)


def test_bad_requests_never_reach_their_batch_mates(app):
    base = app["url"]
    bad = [{**CHAT, "stop": ""}, {**CHAT, "seed": 2**64, "temperature": 0.7}, {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}]
    good = [{**CHAT, "messages": [{"role": "user", "content": f"valid {i}"}], "max_tokens": 6, "temperature": 0} for i in range(6)]
    with cf.ThreadPoolExecutor(9) as pool:
        results = list(pool.map(lambda b: post(f"{base}/chat/completions", b)[:2], bad + good))
    assert [s for s, _ in results[:3]] == [400, 400, 400]
    assert all(s == 200 and b["usage"]["completion_tokens"] == 6 for s, b in results[3:])


def test_overload_is_a_fast_json_503_with_retry_after_never_a_200_with_an_error(app):
    url = app["small"]

    def call(i):
        started = time.time()
        code, raw, headers = send(f"{url}/chat/completions", json.dumps({"model": "tiny-busy", "messages": [{"role": "user", "content": f"q{i}"}],
                                                                       "max_tokens": 40, "stream": i % 2 == 0}).encode())  # fmt: skip
        return code, raw, headers, time.time() - started

    with cf.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(call, range(128)))
    codes = [r[0] for r in results]
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0
    for code, raw, headers, seconds in results:
        if code == 503:
            assert json.loads(raw)["error"]["code"] == "overloaded" and int(headers["retry-after"]) >= 1
        elif raw.startswith(b"data:"):
            assert b'"finish_reason": "error"' not in raw and b'"error"' not in raw and raw.rstrip().endswith(b"data: [DONE]")
        else:
            assert json.loads(raw)["choices"][0]["finish_reason"] in ("stop", "length")
    rejected = sorted(s for c, _, _, s in results if c == 503)
    answered = sorted(s for c, _, _, s in results if c == 200)
    # refused at once, not after waiting for a slot: a second at most, or a quarter of what an answer took on a
    # machine so busy that the 64 client threads themselves take that long to be scheduled
    assert rejected[len(rejected) // 2] < max(1.0, 0.25 * answered[len(answered) // 2]), (rejected, answered)


def test_a_disconnected_client_s_generation_stops(app):
    host, port = "127.0.0.1", app["port"]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    body = json.dumps({"model": "tiny-a", "messages": [{"role": "user", "content": "write"}], "max_tokens": 400, "temperature": 0, "stream": True})
    conn.request("POST", "/api/v1/chat/completions", body=body, headers={"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.read(600)  # a few events
    conn.close()  # the client goes away mid-stream
    deadline = time.time() + 20
    while time.time() < deadline:
        with urllib.request.urlopen(f"{app['url']}/stats", timeout=10) as r:
            stats = json.loads(r.read())["tiny-a"]
        if stats["running"] == 0 and stats["waiting"] == 0:
            break
        time.sleep(0.2)
    assert stats["running"] == 0, stats
    # a short request after it is served at once, not after the abandoned 400-token generation
    started = time.time()
    out = client(app["url"]).chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0)
    assert out.usage.completion_tokens == 2 and time.time() - started < 10


def test_a_stream_that_fails_ends_with_an_error_event_and_done(app):
    port = app["port"]
    url = start(ServeConfig(port=port, app_name="doomed", route_prefix="/doomed", models=[model("tiny-doomed")]))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"model": "tiny-doomed", "messages": [{"role": "user", "content": "write"}], "max_tokens": 400, "temperature": 0, "stream": True})
    conn.request("POST", "/doomed/v1/chat/completions", body=body, headers={"content-type": "application/json"})
    resp = conn.getresponse()
    first = resp.read(300)
    assert resp.status == 200 and first.startswith(b"data:")
    replica = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "model-tiny-doomed" in a["name"])
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=False)  # the model dies mid-stream
    rest = resp.read().decode()
    events = [line[6:] for line in (first.decode() + rest).split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and any('"error"' in e for e in events[:-1])
    serve.delete("doomed")
    assert url


def test_auth_fails_closed_and_docs_are_off_or_behind_the_key(app, tmp_path):
    port = app["port"]
    os.environ.pop("ASCLEPIUS_UNSET_KEY", None)
    with pytest.raises(ServeConfigError, match="ASCLEPIUS_UNSET_KEY"):
        start(ServeConfig(port=port, app_name="nokey", route_prefix="/nokey", api_key_env="ASCLEPIUS_UNSET_KEY", models=[model("x")]))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ServeConfigError, match="empty"):
        start(ServeConfig(port=port, app_name="nokey", route_prefix="/nokey", api_key_file=str(tmp_path / "empty"), models=[model("x")]))
    assert "nokey" not in serve.status().applications  # nothing was deployed
    for path in ("/api/docs", "/api/redoc", "/api/openapi.json"):
        assert urllib_status(f"http://127.0.0.1:{port}{path}") == 404
    os.environ["ASCLEPIUS_DOCS_KEY"] = KEY
    url = start(ServeConfig(port=port, app_name="docs", route_prefix="/docs-app", api_key_env="ASCLEPIUS_DOCS_KEY", docs=True, models=[model("tiny-d")]))
    spec = url.rsplit("/v1", 1)[0] + "/openapi.json"
    assert urllib_status(spec) == 401 and urllib_status(spec, {"authorization": f"Bearer {KEY}"}) == 200
    serve.delete("docs")


def urllib_status(url, headers=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_replica_logs_reach_ray_s_logs(app):
    client(app["url"]).chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "log me"}], max_tokens=2, temperature=0)
    logs_dir = os.path.join(ray._private.worker._global_node.get_logs_dir_path(), "serve")
    deadline, text = time.time() + 20, ""
    while time.time() < deadline:
        text = "".join(open(os.path.join(logs_dir, n), errors="replace").read() for n in os.listdir(logs_dir) if n.startswith("replica_api_"))
        if "model tiny-a ready on cpu" in text and "model=tiny-a n=1" in text and "completion_tokens=2" in text:
            break
        time.sleep(0.5)
    assert "model tiny-a ready on cpu" in text and "completion_tokens=2" in text  # the model replica's and the ingress's lines
    assert "log me" not in text  # ids, sizes and timings — never the text


def test_openai_features_through_the_official_client(app):
    c = client(app["url"])
    assert c.models.retrieve("tiny-b").id == "tiny-b"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")
    # content as a list of text parts (LangChain and most SDKs send this); logprobs and top_logprobs
    out = c.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
                                    max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)  # fmt: skip
    same = c.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "Hi there"}], max_tokens=4, temperature=0)
    assert out.choices[0].message.content == same.choices[0].message.content and out.system_fingerprint.startswith("fp_")
    lp = out.choices[0].logprobs.content
    assert len(lp) == 4 and all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == t.logprob for t in lp)  # greedy
    assert "".join(t.token for t in lp) == out.choices[0].message.content
    # usage in streams
    chunks = list(c.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "x"}], max_tokens=3, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].choices == []
    # completions: streaming, echo + logprobs, token-id prompts, several prompts
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="tiny-a", prompt="The patient", max_tokens=5, temperature=0, stream=True))
    whole = c.completions.create(model="tiny-a", prompt="The patient", max_tokens=5, temperature=0)
    assert streamed == whole.choices[0].text
    echo = c.completions.create(model="tiny-a", prompt="The patient was", max_tokens=1, temperature=0, echo=True, logprobs=1)
    lps = echo.choices[0].logprobs
    assert echo.choices[0].text.startswith("The patient was") and lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    assert all(lp <= 0 for lp in lps.token_logprobs[1:]) and all(len(t) >= 1 for t in lps.top_logprobs[1:])
    assert "".join(lps.tokens) == echo.choices[0].text and len(lps.tokens) == echo.usage.prompt_tokens + 1
    ids = c.completions.create(model="tiny-a", prompt=[1, 300, 301, 302], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 4 and ids.usage.completion_tokens == 3
    many = c.completions.create(model="tiny-a", prompt=["a", "b", "c"], max_tokens=2, n=2, temperature=0)
    assert [ch.index for ch in many.choices] == list(range(6)) and many.usage.completion_tokens == 12
    only_prompt = c.completions.create(model="tiny-a", prompt="The patient was", max_tokens=0, echo=True, logprobs=0)
    assert only_prompt.choices[0].text == "The patient was" and only_prompt.usage.completion_tokens == 0


def test_answer_shortens_a_long_note_from_its_end(app):
    note = "Admission: CHF exacerbation. " + "Vitals stable, plan unchanged. " * 200 + "END-OF-NOTE"
    status, body, headers = post(app["url"] + "/answer", {"model": "tiny-b", "note": note, "question": "What was the admission for?",
                                                          "max_tokens": 20, "echo_prompt": True})  # fmt: skip
    assert status == 200 and body["truncated_note"] and body["usage"]["note_tokens_removed"] > 0 and headers["x-asclepius-note-truncated"] == "true"
    prompt = body["prompt"]
    assert "Admission: CHF" in prompt and "END-OF-NOTE" not in prompt  # the start kept, the end cut
    assert "[Instruction Begin]" in prompt and "What was the admission for?" in prompt  # the question and header always stay
    assert body["usage"]["prompt_tokens"] + 20 <= 256


def test_current_families_and_an_adapter_are_served_as_they_answer_in_process(app):
    """Llama-3-, Qwen2- and Mistral-shaped models with their own fast tokenizers, and a LoRA adapter export that the
    replica puts on its base: /v1/answer gives what the model gives in process (greedy, the recipe's markers), and
    chat uses each family's own chat template."""
    from asclepius.console import model_answer
    from asclepius.models import load_tokenizer

    for name, source in [*FAMILY_SOURCES.items(), ("lora-llama3", None)]:
        status, body, _ = post(app["url"] + "/answer", {"model": name, "note": NOTE, "question": QUESTION, "max_tokens": 12})
        assert status == 200, body
        expected = app["adapter_answer"] if source is None else model_answer(source, NOTE, QUESTION, max_tokens=12)
        assert body["answer"] == expected.strip(), name
        messages = [{"role": "user", "content": QUESTION}]
        reply = client(app["url"]).chat.completions.create(model=name, messages=messages, max_tokens=3, temperature=0)
        tok = load_tokenizer(source or "tiny-llama3")
        assert reply.usage.prompt_tokens == len(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]), name
