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


def test_a_stream_of_rows_comes_back_in_order_a_block_at_a_time_and_a_rerun_pays_nothing(ray_local, server, tmp_path):
    """TeacherStream (the answers stage's path): chunks in, request files spread over the actors, the answered rows
    back in the given order, no batch over the block size, the totals summed, the working files gone."""
    import pandas as pd
    import pyarrow.fs as pafs

    from asclepius.teacher.ray_data import TeacherStream

    server.reset()
    cfg = cfg_for(server)
    given = rows(90, faults=["[[fault:context_length]]"])
    chunks = [pd.DataFrame(given[:40]), pd.DataFrame(given[40:])]
    fs, ledger, work = pafs.LocalFileSystem(), str(tmp_path / "ledger"), str(tmp_path / "work")

    stream = TeacherStream(cfg, "answers", ledger, work, fs, expected_rows=90)
    assert stream.block_rows == 12  # 90 rows over 2 actors × 4 blocks each
    batches = list(stream.answers(iter(chunks)))
    files = fs.get_file_info(pafs.FileSelector(work))
    assert len(files) == 9  # 40 → 12+12+12+4, 50 → 12+12+12+12+2: every actor has blocks to take
    assert max(len(b) for b in batches) <= 12
    out = pd.concat(batches, ignore_index=True)
    out["sample_index"] = out.sample_index.astype(int)
    assert list(out.note_id) == [r["note_id"] for r in given]  # in order, whatever order the answers came in
    refused = out[out.sample_index % 5 == 0]  # the teacher refuses every fifth (context_length): recorded, not retried
    assert set(refused.status) == {"error"} and (out[out.sample_index % 5 != 0].status == "ok").all()
    totals = stream.totals()
    assert totals["requests"] == 90 and totals["ok"] == 72 and sum(totals["errors"].values()) == 18
    assert totals["completion_tokens"] == 72 * 16 and totals["from_ledger"] == 0
    assert totals["plan"]["to_send"] == 90 and totals["plan"]["in_ledger"] == 0
    # each actor that took blocks writes its own ledger part: 2 actors, though the first can take every block while
    # the second still starts (seen in CI once requests got cheaper); never one part per block or per request
    assert scan_ledger(ledger).files in (1, 2)
    stream.cleanup()
    assert fs.get_file_info(work).type == pafs.FileType.NotFound

    sent = len(server.stats()["requests"])
    again = TeacherStream(cfg, "answers", ledger, work, fs, expected_rows=90)
    out2 = pd.concat(list(again.answers(iter(chunks))), ignore_index=True)
    assert len(server.stats()["requests"]) == sent and out2.cached.all()
    assert list(out2.note_id) == list(out.note_id) and list(out2.response) == list(out.response)
    assert again.totals()["plan"]["in_ledger"] == 90 and again.totals()["from_ledger"] == 90


def test_a_stream_in_batch_mode_is_one_batch_and_comes_back_in_order(ray_local, server, tmp_path):
    """`teacher.mode: batch` through TeacherStream: the request files become one Batch API job; the rows come back in
    the given order, in blocks, with the batch price in the plan."""
    import pandas as pd
    import pyarrow.fs as pafs

    from asclepius.teacher.ray_data import TeacherStream

    server.reset()
    cfg = cfg_for(server, mode="batch", batch_poll_s=0.1)
    given = rows(30)
    created = server.stats().get("batches_created", 0)
    stream = TeacherStream(cfg, "answers", str(tmp_path / "ledger"), str(tmp_path / "work"), pafs.LocalFileSystem(), expected_rows=30)
    batches = list(stream.answers(iter([pd.DataFrame(given)])))
    assert server.stats()["batches_created"] == created + 1
    assert max(len(b) for b in batches) <= stream.block_rows < 30
    out = pd.concat(batches, ignore_index=True)
    assert list(out.note_id) == [r["note_id"] for r in given] and (out.status == "ok").all()
    totals = stream.totals()
    assert totals["requests"] == 30 and totals["plan"]["mode"] == "batch"
