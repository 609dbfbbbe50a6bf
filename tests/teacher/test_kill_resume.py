"""Exactly-once across a kill -9: nothing finished is sent again, nothing finished is lost."""

import os
import signal
import subprocess
import sys
import textwrap
import time

from asclepius.teacher.ledger import scan_ledger
from asclepius.testing.server_process import openai_test_server

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from asclepius.config import TeacherConfig
    from asclepius.teacher.client import ChatRequest, LocalLimiter, TeacherClient
    from asclepius.teacher.ledger import Ledger
    from asclepius.teacher.limiter import RateLimiter

    base_url, ledger_dir = sys.argv[1], sys.argv[2]
    cfg = TeacherConfig(provider="openai_compatible", base_url=base_url, model="m", requests_per_minute=100000, tokens_per_minute=1e8)
    client = TeacherClient(cfg, LocalLimiter(RateLimiter(1e5, 1e8)), ledger=Ledger(ledger_dir))
    gate = asyncio.Semaphore(4)

    async def one(i):
        async with gate:
            return await client.complete(ChatRequest([{"role": "user", "content": f"note {i}"}], 10, stage="answers", sample_index=i))

    async def main():
        outs = await asyncio.gather(*(one(i) for i in range(40)))
        await client.aclose()
        print(sum(o.cached for o in outs), "cached", flush=True)

    asyncio.run(main())
    """
)


def test_sigkill_midway_then_rerun(tmp_path):
    ledger = tmp_path / "ledger"
    with openai_test_server(rpm=100000, tpm=10**8, latency_s=0.25) as srv:
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT, srv.base_url, str(ledger)], stdout=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while len(scan_ledger(str(ledger)).records) < 12:
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        finished_before = set(scan_ledger(str(ledger)).records)
        sent_before = len(srv.stats()["requests"])
        assert 12 <= len(finished_before) < 40

        rerun = subprocess.run([sys.executable, "-c", SCRIPT, srv.base_url, str(ledger)], capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert rerun.stdout.strip() == f"{len(finished_before)} cached"

        scan = scan_ledger(str(ledger))
        assert len(scan.records) == 40 and all(r["status"] == "ok" for r in scan.records.values())  # the union is complete
        after = [r["key"] for r in srv.stats()["requests"][sent_before:]]
        assert not set(after) & finished_before  # nothing finished was paid for twice
        assert len(after) == len(set(after)) == 40 - len(finished_before)  # and each missing one went out once
