"""One rate limiter for the whole cluster: requests/min and tokens/min, smooth, exact over any 60 s window.

`RateLimiter` is plain Python with an injectable clock (unit-tested without Ray); `RateLimiterActor` is the same
object behind ONE named Ray actor, so every worker of every job that talks to the same endpoint and model shares
it. How a request is scheduled:

1. Pacing (GCRA, "virtual scheduling"): each dimension has a theoretical arrival time that advances by
   cost / rate for every grant, so requests leave evenly spaced — sub-second, never in bursts (Azure enforces RPM
   over 1–10 s windows). A small tolerance lets a request go up to `burst_s` early.
2. The 60 s window, exactly: a log of granted (time, requests, tokens) makes sure no 60 s window ever holds more
   than `safety` × the limit, counting reservations at their worst case until their usage is known.
3. Accounting, as the provider counts (`accounting`):
   - `reserved` (the default, and the safe one): a request counts prompt + max_tokens for its whole window, used
     or not. OpenAI and Azure OpenAI reserve prompt + max_tokens when a request arrives (Azure documents that the
     reservation is held at least until the request finishes), so refunding unused tokens overshoots their
     window and draws 429s. The response's usage can only raise the count (a longer prompt than we estimated).
   - `reserved_then_trued_up`: reserved until the response, then counted at its actual usage.
   - `usage`: counted at what it is expected to use (the completions seen so far), then at its actual usage —
     for servers that count used tokens only.
4. Feedback: `x-ratelimit-remaining-*` headers calibrate our view at run time when the server counts more than we
   do (its own accounting, other clients on the quota); `retry-after` pauses everyone; a 429 lowers the rate
   (× `backoff_factor`) and each success creeps it back up.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections import deque
from dataclasses import dataclass, field

import ray

WINDOW_S = 60.0
ACCOUNTING = ("reserved", "reserved_then_trued_up", "usage")


@dataclass
class _Grant:
    at: float
    requests: int
    tokens: int
    in_log: bool = True


@dataclass
class LimiterStats:
    granted: int = 0
    settled: int = 0
    finished: int = 0  # requests done (answered or failed for good), whatever their attempts
    failed: int = 0
    tokens_reserved: int = 0
    tokens_used: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rate_limited: int = 0  # 429s seen
    retries: int = 0
    pauses: int = 0
    cost_usd: float = 0.0
    started_at: float = field(default_factory=time.time)


class RateLimiter:
    def __init__(
        self,
        requests_per_minute: float,
        tokens_per_minute: float,
        *,
        safety: float = 0.99,
        burst_s: float = 0.25,
        backoff_factor: float = 0.8,
        min_rate_factor: float = 0.1,
        recovery_per_success: float = 0.01,
        window_s: float = WINDOW_S,
        accounting: str = "reserved",
        clock=time.monotonic,
    ):
        if accounting not in ACCOUNTING:
            raise ValueError(f"accounting must be one of {ACCOUNTING}")
        self.accounting = accounting
        self._completion_ratio = 1.0  # used / max_tokens of completions seen (for `usage` accounting)
        if requests_per_minute <= 0 or tokens_per_minute <= 0:
            raise ValueError("rate limits must be positive")
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self.safety = safety
        self.burst_s = burst_s
        self.backoff_factor = backoff_factor
        self.min_rate_factor = min_rate_factor
        self.recovery_per_success = recovery_per_success
        self.clock = clock
        self.window_s = window_s
        self.rate_factor = 1.0
        self._typical_tokens = 0.0  # moving average of reservations (see _rates)
        self._tat_requests = 0.0  # theoretical arrival times (GCRA)
        self._tat_tokens = 0.0
        self._last_start = 0.0
        self._paused_until = 0.0
        self._grants: deque[_Grant] = deque()  # in order of start time
        self._log_requests = 0  # running sums over self._grants
        self._log_tokens = 0
        self._open: dict[int, _Grant] = {}
        self._ids = itertools.count(1)
        self.stats = LimiterStats()

    # ------------------------------------------------------------------------------------------- scheduling
    def _cap_requests(self) -> float:
        return self.rpm * self.safety

    def _cap_tokens(self) -> float:
        return self.tpm * self.safety

    def reserve(self, tokens: int, completion_tokens: int | None = None) -> tuple[int, float]:
        """Reserve one request of up to `tokens` tokens (prompt + max_tokens, of which `completion_tokens` are
        max_tokens); returns (ticket, seconds to wait before sending)."""
        if self.accounting == "usage" and completion_tokens:
            # count what such requests are seen to use; their actual usage replaces it when they are answered
            tokens -= int(completion_tokens * (1 - min(1.0, 1.2 * self._completion_ratio)))
        if tokens > self._cap_tokens():
            raise ValueError(f"a request of {tokens} tokens can never fit a limit of {self.tpm:.0f} tokens/min")
        now = self.clock()
        self._typical_tokens = tokens if not self._typical_tokens else 0.95 * self._typical_tokens + 0.05 * tokens
        req_rate, tok_rate = self._rates()
        start = max(
            now,
            self._paused_until,
            self._last_start,  # grants leave in order, so the window log stays sorted
            self._tat_requests - self.burst_s,
            self._tat_tokens - self.burst_s,
        )
        start = self._fit_window(start, tokens)
        self._tat_requests = max(self._tat_requests, start) + 1.0 / req_rate
        self._tat_tokens = max(self._tat_tokens, start) + tokens / tok_rate
        self._last_start = start
        grant = self._log(_Grant(start, 1, tokens))
        ticket = next(self._ids)
        self._open[ticket] = grant
        self.stats.granted += 1
        self.stats.tokens_reserved += tokens
        return ticket, start - now

    def _rates(self) -> tuple[float, float]:
        """Pacing rates (per second). A request is admitted only if the window has room for it, so a smooth flow
        can hold at most (cap − one request) in any window; pacing a typical request below the cap keeps the window
        check from binding, which would turn smooth pacing into stop-and-go."""
        req = max(1.0, self._cap_requests() - 1) * self.rate_factor / self.window_s
        tok = max(1.0, self._cap_tokens() - self._typical_tokens) * self.rate_factor / self.window_s
        return req, tok

    def _log(self, grant: _Grant) -> _Grant:
        self._grants.append(grant)
        self._log_requests += grant.requests
        self._log_tokens += grant.tokens
        return grant

    def _insert(self, grant: _Grant) -> None:
        """Log a grant at its time, keeping the log sorted (grants from `reserve` always come last)."""
        if not self._grants or self._grants[-1].at <= grant.at:
            self._log(grant)
            return
        items = list(self._grants)
        index = next(i for i, g in enumerate(items) if g.at > grant.at)
        items.insert(index, grant)
        self._grants = deque(items)
        self._log_requests += grant.requests
        self._log_tokens += grant.tokens

    def _prune(self, horizon: float) -> None:
        while self._grants and self._grants[0].at <= horizon:
            old = self._grants.popleft()
            old.in_log = False
            self._log_requests -= old.requests
            self._log_tokens -= old.tokens

    def _in_window_now(self, now: float) -> dict[str, int]:
        """Requests and tokens granted in the window ending now, from the running sums: the log is pruned to it,
        and only grants scheduled after now (at its end) are taken off. (A sum over the whole log for every
        response's headers grew with the rate: 30,000 grants a window at 500 requests a second.)"""
        self._prune(now - self.window_s)
        requests, tokens = self._log_requests, self._log_tokens
        for g in reversed(self._grants):
            if g.at <= now:
                break
            requests -= g.requests
            tokens -= g.tokens
        return {"requests": requests, "tokens": tokens}

    def _fit_window(self, start: float, tokens: int) -> float:
        """The earliest time ≥ start at which the 60 s window ending then has room for this request.

        Every logged grant starts at or before `start` (grants are issued in order). The log is pruned only up to
        now − 60 s — a grant that has left the window of a future `start` still counts in the provider's window
        now (the progress line reads tokens/min from it) — so the grants between are skipped here."""
        self._prune(self.clock() - self.window_s)
        while True:
            requests, tokens_in, first = self._log_requests, self._log_tokens, None
            for g in self._grants:
                if g.at > start - self.window_s:
                    first = g
                    break
                requests -= g.requests
                tokens_in -= g.tokens
            if requests + 1 <= self._cap_requests() and tokens_in + tokens <= self._cap_tokens():
                return start
            start = first.at + self.window_s + 1e-6  # wait for the oldest grant still in the window to leave it

    def settle(self, ticket: int, prompt_tokens: int | None, completion_tokens: int | None, cost_usd: float = 0.0,
               max_tokens: int | None = None) -> None:  # fmt: skip
        """The response's usage is known: count the request as the provider does (see `accounting`)."""
        grant = self._open.pop(ticket, None)
        if grant is None:
            return
        self.stats.settled += 1
        if prompt_tokens is None or completion_tokens is None:
            self.stats.tokens_used += grant.tokens  # unknown usage: keep the worst case counted
            return
        used = prompt_tokens + completion_tokens
        if max_tokens:
            self._completion_ratio = 0.9 * self._completion_ratio + 0.1 * min(1.0, completion_tokens / max_tokens)
        # reserved: prompt + max_tokens stay counted (the prompt as the server counted it); else the actual usage
        counted = prompt_tokens + (max_tokens or completion_tokens) if self.accounting == "reserved" else used
        change = counted - grant.tokens
        if self.accounting == "reserved":
            change = max(0, change)  # only ever up: the provider keeps what it reserved
        grant.tokens += change
        if grant.in_log:
            self._log_tokens += change
        tok_rate = self._rates()[1]
        self._tat_tokens = max(self.clock(), self._tat_tokens + change / tok_rate)
        self.stats.tokens_used += used
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        self.stats.cost_usd += cost_usd

    def release(self, ticket: int) -> None:
        """The request was never answered (connection error, timeout): keep it counted at its worst case, since
        the server may have counted it too, and close the ticket."""
        if self._open.pop(ticket, None) is not None:
            self.stats.settled += 1

    # ------------------------------------------------------------------------------------------- feedback
    def observe_headers(self, headers: dict[str, str]) -> None:
        """Correct our view with the server's `x-ratelimit-remaining-*`: when the server has counted more in its
        window than we granted (other clients share the quota), book the difference now; it leaves in 60 s."""
        h = {k.lower(): v for k, v in headers.items()}
        now = self.clock()
        for dim, limit in (("requests", self.rpm), ("tokens", self.tpm)):
            try:
                remaining = float(h[f"x-ratelimit-remaining-{dim}"])
            except (KeyError, ValueError):
                continue
            ours = self._in_window_now(now)[dim]
            missing = (limit - remaining) - ours
            reset = parse_reset(h.get(f"x-ratelimit-reset-{dim}"))
            if missing > max(2.0, 0.02 * limit):
                # Booked so that it leaves our window when the server says its own resets (else in a window).
                phantom = _Grant(now - self.window_s + min(reset, self.window_s) if reset else now, 0, 0)
                setattr(phantom, dim, int(math.ceil(missing)))
                self._insert(phantom)
            if remaining <= 0 and reset:
                self.pause(reset)  # the server's quota is spent until its window resets

    def pause(self, seconds: float) -> None:
        """`retry-after`: no one on the cluster sends until then."""
        until = self.clock() + max(0.0, seconds)
        if until > self._paused_until:
            self._paused_until = until
            self.stats.pauses += 1

    def on_rate_limited(self) -> None:
        self.stats.rate_limited += 1
        self.rate_factor = max(self.min_rate_factor, self.rate_factor * self.backoff_factor)

    def on_success(self) -> None:
        self.rate_factor = min(1.0, self.rate_factor + self.recovery_per_success)

    def on_retry(self) -> None:
        self.stats.retries += 1

    def finished(self, ok: bool) -> None:
        """One request is done (answered, or failed for good): rows, not attempts, for progress."""
        self.stats.finished += 1
        self.stats.failed += not ok

    def feedback(self, status: int | None, headers: dict[str, str] | None, retrying: bool) -> None:
        """Everything one response teaches: headers, 429 slow-down, retry-after pause, success creep."""
        if headers:
            self.observe_headers(headers)
        if status == 429:
            self.on_rate_limited()
        elif status is not None and status < 400:
            self.on_success()
        pause = retry_after_seconds(headers or {})
        if pause:
            self.pause(pause)
        if retrying:
            self.on_retry()

    def snapshot(self) -> dict:
        window = self._in_window_now(self.clock())
        s = self.stats
        return {
            "granted": s.granted,
            "settled": s.settled,
            "finished": s.finished,
            "failed": s.failed,
            "in_flight": len(self._open),
            "requests_last_60s": window["requests"],
            "tokens_last_60s": window["tokens"],
            "rpm_limit": self.rpm,
            "tpm_limit": self.tpm,
            "rate_factor": round(self.rate_factor, 3),
            "rate_limited": s.rate_limited,
            "retries": s.retries,
            "pauses": s.pauses,
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "cost_usd": round(s.cost_usd, 6),
        }


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_reset(value: str | None) -> float | None:
    """OpenAI's `x-ratelimit-reset-*` format: '1s', '6m0s', '20ms', '1h2m3.5s' → seconds."""
    if not value:
        return None
    parts = _DURATION.findall(value.strip())
    if not parts:
        try:
            return float(value)
        except ValueError:
            return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


def retry_after_seconds(headers: dict[str, str]) -> float | None:
    """`retry-after-ms` (OpenAI/Azure) takes precedence over `retry-after` (seconds)."""
    h = {k.lower(): v for k, v in headers.items()}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        if h.get(name):
            try:
                return max(0.0, float(h[name]) * scale)
            except ValueError:
                continue
    return None


# ----------------------------------------------------------------------------------------------- Ray actor
@ray.remote(num_cpus=0, max_concurrency=1)
class RateLimiterActor:
    """A RateLimiter behind one named actor; its calls run one at a time, so its state needs no locks."""

    def __init__(self, rpm, tpm, safety, window_s, accounting="reserved"):
        self.limiter = RateLimiter(rpm, tpm, safety=safety, window_s=window_s, accounting=accounting)

    def reconfigure(self, rpm, tpm, safety, window_s, accounting="reserved"):
        lim = self.limiter
        lim.rpm, lim.tpm, lim.safety, lim.window_s, lim.accounting = rpm, tpm, safety, window_s, accounting

    def reserve(self, tokens, completion_tokens=None):
        return self.limiter.reserve(tokens, completion_tokens)

    def reserve_many(self, requests: list[tuple[int, int | None]]) -> list[tuple[int, float]]:
        """Several reservations in one call, in order (asclepius.teacher.client.ActorLimiter coalesces them)."""
        return [self.limiter.reserve(tokens, completion) for tokens, completion in requests]

    REPORTS = ("settle", "release", "finished", "feedback")

    def apply(self, reports: list[tuple[str, tuple]]) -> list[str | None]:
        """Several reports (settle, release, finished, feedback), applied in order in one call; for each, None or
        the error it raised (one bad report does not fail the others sent with it)."""
        errors = []
        for name, args in reports:
            try:
                if name not in self.REPORTS:
                    raise ValueError(f"unknown limiter report {name!r}")
                getattr(self.limiter, name)(*args)
                errors.append(None)
            except Exception as err:  # noqa: BLE001 — returned to the one caller it concerns
                errors.append(f"{type(err).__name__}: {err}")
        return errors

    def settle(self, ticket, prompt_tokens, completion_tokens, cost_usd=0.0, max_tokens=None):
        self.limiter.settle(ticket, prompt_tokens, completion_tokens, cost_usd, max_tokens)

    def release(self, ticket):
        self.limiter.release(ticket)

    def finished(self, ok):
        self.limiter.finished(ok)

    def feedback(self, status, headers, retrying):
        self.limiter.feedback(status, headers, retrying)

    def snapshot(self):
        return self.limiter.snapshot()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def head_node_strategy():
    """Schedule on the head node: it is never scaled away (workers of an autoscaling cluster are), and a detached
    actor on a worker node would keep that node from ever scaling down. Hard affinity: with soft affinity Ray placed
    the limiter on a worker node as soon as one existed (seen on a cluster scaling from zero, head CPU 0), which then
    stayed up, idle, for good. The limiter needs no CPU, so the head (CPU 0) takes it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = next((n["NodeID"] for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {})), None)
    return NodeAffinitySchedulingStrategy(node_id=head, soft=False) if head else "DEFAULT"


def limiter_actor(name: str, requests_per_minute: float, tokens_per_minute: float, safety: float,
                  window_s: float = WINDOW_S, namespace: str = "asclepius", accounting: str = "reserved"):  # fmt: skip
    """The cluster's one limiter for `name` (get-if-exists); detached, so every job on the cluster — and a
    resubmitted one — shares the same view of the quota. It lives on the head node and is restarted if it dies
    (its window log starts empty; the server's rate-limit headers calibrate it again)."""
    actor = RateLimiterActor.options(
        name=name, namespace=namespace, get_if_exists=True, lifetime="detached", max_restarts=-1,
        scheduling_strategy=head_node_strategy(),
    ).remote(requests_per_minute, tokens_per_minute, safety, window_s, accounting)  # fmt: skip
    # An existing actor keeps its state (its window log) but takes the current limits.
    ray.get(actor.reconfigure.remote(requests_per_minute, tokens_per_minute, safety, window_s, accounting))
    return actor
