"""The questions stage's pool in its actor, as the teacher actors call it: tens of requests in flight share round
trips, and the pool decides exactly what the same calls one by one would."""

import asyncio
import json
import random
from types import SimpleNamespace

import pytest
import ray

from asclepius.generate.pool import QuestionPool, QuestionPoolService
from asclepius.generate.questions import QuestionHooks

pytestmark = pytest.mark.ray

TASKS = {"Question Answering": ["What is the EF?", "Which drug was stopped?", "What was the glucose?"],
         "Summarization": ["Summarize the hospital course.", "Summarize the discharge plan.", "Summarize the findings."]}  # fmt: skip
POOL = {"tasks": TASKS, "threshold": 0.7, "seed_examples": 3, "pool_examples": 2, "seed": 0, "journal_dir": None}


def question(i: int) -> str:
    # a shared vocabulary, so some are turned down as too similar, and some repeat exactly
    words = ["the", "patient", "dose", "EF", "glucose", "discharge", "course", "drug", "stopped", "plan"]
    rng = random.Random(i % 23)
    return "What " + " ".join(rng.choice(words) for _ in range(5)) + "?"


def test_requests_in_flight_share_round_trips_and_the_pool_decides_as_one_by_one(ray_local):
    name = "test-pool-coalesced"

    class CountingPool(QuestionPoolService):
        """The pool's own service, keeping each call's list in the order the actor took it (defined here: a
        test module is not importable in a Ray worker, so the class travels by value)."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.calls = []

        def examples(self, calls):
            self.calls.append(("examples", list(calls)))
            return super().examples(calls)

        def offer(self, calls):
            self.calls.append(("offer", list(calls)))
            return super().offer(calls)

        def received(self):
            return self.calls

    actor = ray.remote(num_cpus=0, max_concurrency=1)(CountingPool).options(name=name, namespace="asclepius").remote(**POOL)
    try:
        rows = [{"note_id": f"n{i}", "task": list(TASKS)[i % 2], "note": f"Note {i}: EF 35%, glucose 542."} for i in range(60)]
        hooks = QuestionHooks(name, "{task}\n{samples}\n{note}")

        async def all_rows():
            in_flight = asyncio.Semaphore(16)  # as a teacher actor sends them (TeacherUDF)

            async def one(row, delay):
                async with in_flight:
                    sent = await hooks.before(row)
                    await asyncio.sleep(delay)  # the teacher's answer comes back some time later
                    reply = SimpleNamespace(status="ok", text=question(int(row["note_id"][1:])), finish_reason="stop")
                    return sent, await hooks.after(row, reply)

            # a teacher with a steady latency answers what was sent together at about the same time
            return await asyncio.gather(*(one(r, 0.02 + 0.01 * (i % 2)) for i, r in enumerate(rows)))

        got = asyncio.run(all_rows())
        received = ray.get(actor.received.remote())
    finally:
        ray.kill(actor)

    calls = [c for _, batch in received for c in batch]
    assert len(calls) == 2 * len(rows)  # every row asked for its examples and offered its question, once
    assert len(received) <= len(calls) // 2, [len(b) for _, b in received]  # at most half the round trips of a call each

    # the same calls, one by one, in the order the actor took them, on a pool of its own: the same plans and decisions
    alone = QuestionPool(**POOL)
    expected_plans, expected_decisions = {}, {}
    for kind, batch in received:
        for call in batch:
            if kind == "examples":
                expected_plans[call[0]] = alone.examples(*call)
            else:
                expected_decisions[call[0]] = alone.offer(*call)
    assert any(not d["accepted"] for d in expected_decisions.values()) and any(d["accepted"] for d in expected_decisions.values())
    assert any(p["pool_indices"] for p in expected_plans.values())  # later prompts drew on the pool as it grew
    for row, (sent, answered) in zip(rows, got):
        plan, decision = expected_plans[row["note_id"]], expected_decisions[row["note_id"]]
        assert sent["pool_size_at_prompt"] == plan["pool_size"] and sent["pool_examples_used"] == len(plan["pool_indices"])
        assert sent["examples"] == json.dumps(plan["examples"])  # each waiter got its own row's plan
        assert answered["question"] == question(int(row["note_id"][1:]))
        assert (answered["accepted_in_pool"], answered["max_rouge_l"]) == (decision["accepted"], decision["rouge_l"])
