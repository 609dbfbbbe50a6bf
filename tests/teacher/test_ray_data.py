"""The teacher on Ray Data: async actors sharing one limiter and the ledger."""

import json
import logging

import pytest
import ray

from asclepius.config import TeacherConfig
from asclepius.teacher.cost import BudgetExceeded
from asclepius.teacher.ledger import scan_ledger
from asclepius.teacher.ray_data import Progress, plan_requests, run_requests

pytestmark = pytest.mark.ray


def rows(n, faults=()):
    out = []
    for i in range(n):
        marker = faults[i % len(faults)] if faults and i % 5 == 0 else ""
        out.append({"note_id": f"n{i}", "messages": json.dumps([{"role": "user", "content": f"note {i} {marker}"}]), "max_tokens": 16, "sample_index": i})
    return out


def cfg_for(server, **kw):
    base = dict(provider="openai_compatible", base_url=server.base_url, model="m", num_actors=2, concurrency_per_actor=8,
                requests_per_minute=100000, tokens_per_minute=10**8, max_attempts=2, backoff_base_s=0.01, timeout_s=5,
                limiter_name=f"test-limiter-{id(kw)}", progress_every_s=0.5)  # fmt: skip
    return TeacherConfig(**{**base, **kw})


def test_dataset_in_responses_out_and_resubmit_is_free(ray_local, server, tmp_path, caplog):
    server.reset()
    cfg = cfg_for(server)
    ds = ray.data.from_items(rows(40, faults=["[[fault:context_length]]", "[[fault:500-once]]"]))
    ledger_dir = str(tmp_path / "ledger")
    plan = plan_requests(ds, cfg, "questions", ledger_dir)
    assert plan.estimate.requests == 40 and plan.already_done == 0
    with caplog.at_level(logging.INFO, logger="asclepius.teacher"), Progress(cfg, "questions", plan) as progress:
        out = run_requests(ds, cfg, "questions", plan).to_pandas().sort_values("sample_index")
    out["sample_index"] = out.sample_index.astype(int)
    assert list(out.note_id) == [f"n{i}" for i in range(40)]  # every row comes back, in its own row
    bad = out[out.sample_index % 10 == 0]  # context_length fault: recorded, not retried
    assert set(bad.status) == {"error"} and set(bad.http_status) == {400} and set(bad.attempts) == {1}
    flaky = out[out.sample_index % 10 == 5]  # 500 once, then fine
    assert set(flaky.status) == {"ok"} and set(flaky.attempts) == {2}
    good = out[out.sample_index % 5 != 0]
    assert set(good.status) == {"ok"} and good.response.str.startswith("Answer ").all() and (good.completion_tokens == 16).all()
    assert progress.last["settled"] >= 40 and "teacher questions: " in caplog.text
    assert "note 3" not in caplog.text  # no prompt text in logs

    scan = scan_ledger(ledger_dir)
    # one part per actor that took rows: 2 actors, though on a loaded machine the first can take them all
    assert len(scan.records) == 40 and scan.files in (1, 2)

    sent = len(server.stats()["requests"])
    plan2 = plan_requests(ds, cfg, "questions", ledger_dir)
    assert plan2.already_done == 40 and plan2.estimate.requests == 0
    again = run_requests(ds, cfg, "questions", plan2).to_pandas()
    assert again.cached.all() and len(server.stats()["requests"]) == sent


def test_budget_stops_before_any_request(ray_local, server, tmp_path):
    server.reset()
    cfg = cfg_for(server, prices={"m": {"prompt_per_1m": 1000.0, "completion_per_1m": 1000.0}}, budget_usd=0.01)
    ds = ray.data.from_items(rows(20))
    with pytest.raises(BudgetExceeded, match="budget"):
        plan_requests(ds, cfg, "answers", str(tmp_path / "ledger"))
    assert server.stats()["requests"] == []
