import json
import logging
import multiprocessing as mp

import pytest

from asclepius.config import ConfigError, TeacherConfig, config_from_dict
from asclepius.teacher.client import PrivacyError, TeacherConfigError, check_privacy, read_api_key
from asclepius.teacher.cost import BudgetExceeded, TokenCounter, byte_estimate, check_budget, cost_usd, estimate, price_for
from asclepius.teacher.ledger import Ledger, request_key, scan_ledger

MSG = [{"role": "user", "content": "hello"}]


# ---------------------------------------------------------------------------------------------------- ledger
def test_request_key_is_stable_and_covers_every_input():
    base = dict(endpoint="e", model="m", messages=MSG, params={"temperature": 1, "max_tokens": 5}, stage="q", sample_index=3)
    key = request_key(**base)
    assert key == request_key(**{**base, "params": {"max_tokens": 5, "temperature": 1}})  # order does not matter
    for change in ({"endpoint": "e2"}, {"model": "m2"}, {"messages": [{"role": "user", "content": "hello!"}]},
                   {"params": {"temperature": 0, "max_tokens": 5}}, {"stage": "a"}, {"sample_index": 4}):  # fmt: skip
        assert request_key(**{**base, **change}) != key


def test_ledger_final_retryable_and_torn_lines(tmp_path):
    led = Ledger(str(tmp_path), writer_id="w1")
    led.append({"key": "a", "status": "ok", "texts": ["x"]})
    led.append({"key": "b", "status": "error", "retryable": True, "error": "http 503"})
    led.append({"key": "c", "status": "error", "retryable": False, "error": "http 400"})
    led.append({"key": "b", "status": "ok", "texts": ["y"]})  # retried later and succeeded
    led.append({"key": "d", "status": "error", "retryable": True})
    led.close()
    with open(tmp_path / "part-w2.jsonl", "w") as f:  # a writer killed mid-line
        f.write(json.dumps({"key": "e", "status": "ok"}) + "\n" + '{"key": "f", "stat')
    with open(tmp_path / "part-w3.jsonl", "w") as f:  # valid JSON, but the newline (and the fsync) never came
        f.write(json.dumps({"key": "g", "status": "ok"}))
    scan = scan_ledger(str(tmp_path))
    assert set(scan.records) == {"a", "b", "c", "e"}
    assert scan.records["b"]["texts"] == ["y"] and set(scan.retryable) == {"d"}
    assert scan.torn_lines == 2 and scan.files == 3


def _writer(directory, writer, n):
    led = Ledger(directory, writer_id=f"w{writer}")
    for i in range(n):
        led.append({"key": f"{writer}-{i}", "status": "ok", "texts": [f"t{i}"]})


def test_many_processes_write_at_once(tmp_path):
    procs = [mp.get_context("spawn").Process(target=_writer, args=(str(tmp_path), w, 200)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    scan = scan_ledger(str(tmp_path))
    assert len(scan.records) == 800 and scan.torn_lines == 0


# ---------------------------------------------------------------------------------------------------- cost
def test_local_group_commit_fsyncs_once_per_group_off_the_event_loop(tmp_path, monkeypatch):
    """Answers finishing while an fsync is in flight share the next one, and the loop never waits on the disk."""
    import asyncio
    import os
    import threading

    from asclepius.storage import AppendLog

    syncs, loop_thread = [], threading.get_ident()
    real_fsync = os.fsync

    def fsync(fd):
        syncs.append(threading.get_ident())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    log = AppendLog(str(tmp_path / "ledger"), "part", writer_id="w1")

    async def one(i):
        await asyncio.sleep(i * 0.0002)
        await log.commit({"key": f"k{i}", "status": "ok"})

    async def main():
        await asyncio.gather(*(one(i) for i in range(300)))

    asyncio.run(main())
    assert 1 <= len(syncs) < 300 and loop_thread not in syncs
    scan = scan_ledger(str(tmp_path / "ledger"))
    assert len(scan.records) == 300 and scan.torn_lines == 0 and scan.files == 1


def test_prices_and_estimate():
    assert price_for("gpt-4o-2024-08-06", {}, self_hosted=False) == (2.5, 10.0)  # a snapshot costs its family's
    assert price_for("gpt-4o-mini", {}, self_hosted=False) == (0.15, 0.6)  # not gpt-4o's
    assert price_for("my-llama", {}, self_hosted=True) == (0.0, 0.0)
    assert price_for("gpt-4o", {"gpt-4o": (1.0, 2.0)}, self_hosted=False) == (1.0, 2.0)
    assert cost_usd(1_000_000, 500_000, (0.5, 1.5)) == pytest.approx(1.25)
    est = estimate([1000, 3000], [400, 400], n=1, price=(0.5, 1.5))
    assert (est.requests, est.prompt_tokens, est.completion_tokens_max) == (2, 4000, 800)
    assert est.usd_max == pytest.approx(0.0032)
    check_budget(est, budget_usd=0.01)
    with pytest.raises(BudgetExceeded, match="over the budget"):
        check_budget(est, budget_usd=0.003)
    # what a lost node would send (and the provider bill) again counts too: the in-flight requests' price
    check_budget(est, budget_usd=0.0033, already_spent_usd=0.0001)
    with pytest.raises(BudgetExceeded, match=r"\+ \$0\.00 for the requests in flight, which a lost node would send again"):
        check_budget(est, budget_usd=0.0033, already_spent_usd=0.0001, in_flight_reserve_usd=0.0016)


@pytest.mark.ray
def test_the_budget_counts_what_the_ledger_paid_and_the_requests_in_flight(ray_local, tmp_path):
    import ray

    from asclepius.config import TeacherConfig
    from asclepius.teacher.ledger import Ledger
    from asclepius.teacher.ray_data import _request, key_identity, plan_requests

    cfg = TeacherConfig(provider="openai", model="gpt-4o", num_actors=2, concurrency_per_actor=4, token_counter="bytes",
                        budget_usd=0.2, limiter_name=f"budget-{tmp_path.name}")  # fmt: skip
    import json

    rows = [{"messages": json.dumps([{"role": "user", "content": f"{i:04d}" + "x" * 3996}]), "max_tokens": 1000} for i in range(10)]
    per_request = (1000 + 6) * 2.5e-6 + 1000 * 10e-6  # gpt-4o's prices, bytes/4 token counts (+ message overhead)
    # 10 × $0.0125 = $0.13 fits $0.20 — but 8 of them may be in flight at once, and a lost node sends those again
    with pytest.raises(BudgetExceeded, match=r"up to \$0\.13 \(\+ \$0\.00 already spent, \+ \$0\.10 for the requests in flight"):
        plan_requests(ray.data.from_items(rows), cfg, "budget", str(tmp_path / "ledger"))
    # half of them already answered (and paid, $0.05 each): not sent again, but counted as spent
    ledger = Ledger(str(tmp_path / "ledger"))
    for row in rows[:5]:
        ledger.append({"key": _request(row, "budget", {}).key(key_identity(cfg), cfg.model), "status": "ok", "cost_usd": 0.05})
    ledger.close()
    cfg.budget_usd = 0.3
    with pytest.raises(BudgetExceeded, match=r"up to \$0\.06 \(\+ \$0\.25 already spent, \+ \$0\.06 for the requests in flight"):
        plan_requests(ray.data.from_items(rows), cfg, "budget", str(tmp_path / "ledger"))
    cfg.budget_usd = 0.4
    plan = plan_requests(ray.data.from_items(rows), cfg, "budget", str(tmp_path / "ledger"))
    assert plan.already_done == 5 and plan.estimate.requests == 5 and plan.estimate.usd_max == pytest.approx(5 * per_request, rel=0.01)


def test_token_counting():
    assert byte_estimate("abcd" * 10) == 10 and byte_estimate("") == 1
    counter = TokenCounter("bytes")
    assert counter.count_messages([{"role": "user", "content": "abcd" * 10}]) == 3 + 10 + 3


# ---------------------------------------------------------------------------------------------------- privacy, keys
def test_privacy_guard(caplog):
    public = TeacherConfig(provider="openai")
    with pytest.raises(PrivacyError, match="PhysioNet"):
        check_privacy(public, 1, {"mimic3", "pmc"})
    check_privacy(public, 0, {"pmc", "generic"})  # public case reports are fine
    with pytest.raises(PrivacyError, match="2 rows of credentialed provenance"):  # the flag decides, whatever the name
        check_privacy(public, 2, {"icu_notes"})
    with pytest.raises(PrivacyError, match="icu_notes"):  # a source name listed as credentialed is refused too
        check_privacy(TeacherConfig(provider="openai", credentialed_sources=["icu_notes"]), 0, {"icu_notes"})
    check_privacy(TeacherConfig(provider="azure", azure_endpoint="https://x.openai.azure.com", azure_deployment="d"), 5, {"mimic3"})
    check_privacy(TeacherConfig(provider="openai_compatible", base_url="http://127.0.0.1:8000/v1"), 5, {"mimic4"})
    with pytest.raises(PrivacyError):  # the public API reached as "compatible" is still the public API
        check_privacy(TeacherConfig(provider="openai_compatible", base_url="https://api.openai.com/v1"), 5, {"mimic4"})
    override = TeacherConfig(provider="openai", i_have_permission_to_send_credentialed_notes_to_public_openai=True)
    with caplog.at_level(logging.WARNING):
        check_privacy(override, 3, {"mimic3"})
    assert "SENDING 3 ROWS OF CREDENTIALED PROVENANCE" in caplog.text


def test_keys_never_in_config_and_read_from_env_or_file(tmp_path, monkeypatch):
    data = {"run_dir": "x", "notes": {"sources": [{"kind": "pmc", "path": "sample:pmc"}]}, "teacher": {"api_key": "sk-123"}}
    with pytest.raises(ConfigError, match="never go in the config"):
        config_from_dict(data)
    monkeypatch.setenv("MY_KEY", "sk-env")
    assert read_api_key(TeacherConfig(api_key_env="MY_KEY")) == "sk-env"
    (tmp_path / "key").write_text("sk-file\n")
    assert read_api_key(TeacherConfig(api_key_env="MY_KEY", api_key_file=str(tmp_path / "key"))) == "sk-file"
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(TeacherConfigError, match="MY_KEY"):
        read_api_key(TeacherConfig(api_key_env="MY_KEY"))
    # a self-hosted server without auth needs no key; one whose variable is named but unset is a mistake, not "no key"
    assert read_api_key(TeacherConfig(provider="openai_compatible", base_url="http://h/v1")) == "EMPTY"
    with pytest.raises(TeacherConfigError, match="MY_KEY"):
        read_api_key(TeacherConfig(provider="openai_compatible", base_url="http://h/v1", api_key_env="MY_KEY"))
    with pytest.raises(ConfigError, match="azure_endpoint and azure_deployment"):
        config_from_dict({**data, "teacher": {"provider": "azure"}})
