"""A real client no one here wrote: EleutherAI's lm-evaluation-harness against our served model, offline.

`local-completions` scores multiple choice by loglikelihood (echo + logprobs over token-id prompts);
`local-chat-completions` runs a generation task through chat completions. The tasks' data ship with the test (the
harness's medical tasks download from a hub at run time; README says how to run pubmedqa/medqa/medmcqa)."""

import json
import os

import pytest
import torch
from ray import serve

from asclepius.config import ServeConfig
from asclepius.models import load_model, load_tokenizer, resolve_model_source
from asclepius.serve.app import start
from asclepius.testing.server_process import free_port

pytestmark = pytest.mark.ray

QUESTIONS = [
    ("Which organ does hepatitis affect?", ["liver", "kidney", "lung", "heart"], 0),
    ("Which drug is a loop diuretic?", ["metoprolol", "furosemide", "lisinopril", "warfarin"], 1),
    ("What does EF stand for in cardiology?", ["early failure", "ejection fraction", "end flow", "extra fluid"], 1),
    ("Which test measures long-term glucose control?", ["troponin", "creatinine", "HbA1c", "lactate"], 2),
    ("Which vessel is grafted most often in CABG?", ["LIMA", "aorta", "vena cava", "carotid"], 0),
    ("What does DKA stand for?", ["diabetic ketoacidosis", "dry kidney acidosis", "drug kinetic assay", "dual kinase activity"], 0),
]


def write_tasks(tmp_path):
    data = tmp_path / "mini_mc.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": a}) for q, c, a in QUESTIONS) + "\n")
    (tmp_path / "asclepius_mini_mc.yaml").write_text(f"""task: asclepius_mini_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (tmp_path / "asclepius_mini_gen.yaml").write_text(f"""task: asclepius_mini_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
""")
    return tmp_path


@pytest.fixture(scope="module")
def served(ray_local):
    url = start(ServeConfig(port=free_port(), app_name="lmeval", route_prefix="/lmeval", models=[{"name": "tiny-lm", "source": "tiny", "num_cpus": 0}]))
    yield url
    serve.delete("lmeval")


def evaluate(url, tmp_path, model, model_args, task, **kw):
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = {"model": "tiny-lm", "base_url": url, "num_concurrent": 2, "max_retries": 1, **model_args}
    return lm_eval.simple_evaluate(model=model, model_args=args, tasks=[task], task_manager=TaskManager(include_path=str(write_tasks(tmp_path))),
                                   log_samples=True, **kw)  # fmt: skip


def test_loglikelihood_multiple_choice_through_local_completions(served, tmp_path):
    tokenizer = resolve_model_source("tiny")
    out = evaluate(f"{served}/completions", tmp_path, "local-completions", {"tokenizer": tokenizer, "tokenizer_backend": "huggingface"}, "asclepius_mini_mc")
    acc = out["results"]["asclepius_mini_mc"]["acc,none"]
    samples = out["samples"]["asclepius_mini_mc"]
    assert len(samples) == len(QUESTIONS) and 0 <= acc <= 1
    # every loglikelihood the harness got from our server equals the model's own, computed here
    tok, model = load_tokenizer("tiny"), load_model("tiny")
    correct = 0
    for s in samples:
        context = s["arguments"][0][0]  # (context, continuation) pairs, one per choice
        ours = []
        for choice in s["doc"]["choices"]:
            whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            ctx_len = len(tok(context, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
            ours.append(sum(float(lp[i - 1, whole[i]]) for i in range(ctx_len, len(whole))))
        theirs = [r[0][0] for r in s["resps"]]
        assert theirs == pytest.approx(ours, abs=2e-3)
        correct += int(max(range(len(ours)), key=ours.__getitem__) == s["doc"]["answer"])
    assert acc == pytest.approx(correct / len(samples))


def test_generation_through_local_chat_completions(served, tmp_path):
    import openai

    out = evaluate(f"{served}/chat/completions", tmp_path, "local-chat-completions", {}, "asclepius_mini_gen", apply_chat_template=True)
    samples = out["samples"]["asclepius_mini_gen"]
    assert len(samples) == len(QUESTIONS) and "exact_match,none" in out["results"]["asclepius_mini_gen"]
    direct = openai.OpenAI(base_url=served, api_key="x", max_retries=0)
    for s in samples[:2]:  # what the harness got is what the API answers the same request
        messages = json.loads(s["arguments"][0][0][0])  # the chat-templated request: [{"role": "user", ...}]
        reply = direct.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=6, stop=["\n"], temperature=0, seed=1234)
        assert s["resps"][0][0] == reply.choices[0].message.content
