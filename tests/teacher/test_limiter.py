import random

import pytest

from asclepius.teacher.limiter import RateLimiter, parse_reset, retry_after_seconds


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def max_window(events, window):
    """events: (time, requests, tokens) → the most any window of `window` seconds held."""
    events = sorted(events)
    best_r = best_t = 0
    for i, (t, _, _) in enumerate(events):
        inside = [e for e in events[: i + 1] if e[0] > t - window]
        best_r = max(best_r, sum(e[1] for e in inside))
        best_t = max(best_t, sum(e[2] for e in inside))
    return best_r, best_t


def test_requests_are_paced_evenly_not_in_bursts():
    clock = Clock()
    lim = RateLimiter(121, 1e9, safety=1.0, burst_s=0.0, clock=clock)
    starts = [clock.t + lim.reserve(10)[1] for _ in range(10)]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps == pytest.approx([0.5] * 9)  # 121/min → 120 spaced evenly + room for the next: one every 0.5 s


def test_tokens_pace_by_size():
    clock = Clock()
    lim = RateLimiter(1e6, 6100, safety=1.0, burst_s=0.0, clock=clock)
    lim._typical_tokens = 100.0  # pacing rate (6100 - 100) / 60 = 100 tokens/s
    lim.reserve(100)
    clock.t += 100
    d1 = lim.reserve(1000)[1]
    d2 = lim.reserve(500)[1]
    assert d1 == 0 and d2 == pytest.approx(1000 / lim._rates()[1], rel=0.01)  # ~10 s: the first request's tokens


@pytest.mark.parametrize("seed, refunds", [(0, False), (1, True), (2, True)])
def test_never_above_the_limits_in_any_window(seed, refunds):
    rng = random.Random(seed)
    clock = Clock()
    lim = RateLimiter(300, 20000, safety=0.99, clock=clock)
    events = []
    for _ in range(600):
        tokens = rng.randint(50, 1500)
        ticket, delay = lim.reserve(tokens)
        start = clock.t + delay
        used = rng.randint(tokens // 3, tokens) if refunds else tokens
        events.append((start, 1, used))
        clock.t += rng.random() * 0.05  # callers arrive faster than the limit allows
        lim.settle(ticket, used // 2, used - used // 2)
    r, t = max_window(events, 60.0)
    assert r <= 300 * 0.99 and t <= 20000 * 0.99
    span = max(e[0] for e in events) - min(e[0] for e in events)
    # ...and the limit is used, not wasted. With refunds, admission still needs room for a request's worst case
    # (as the server's does), so less of what was reserved ends up used.
    # The best any smooth pacing can do is (cap - one request) per window: here 0.99 - 775..1500/20000 = 0.92-0.95.
    assert sum(e[2] for e in events) / span * 60 > (0.9 if refunds else 0.92) * 20000


def test_refund_lets_the_next_request_go_sooner():
    clock = Clock()
    lim = RateLimiter(1e6, 6000, safety=1.0, burst_s=0.0, clock=clock)
    ticket, _ = lim.reserve(1000)
    rate = lim._rates()[1]
    lim.settle(ticket, 100, 100)  # used 200 of 1000
    assert lim.reserve(10)[1] == pytest.approx(200 / rate, rel=0.01)
    assert lim.snapshot()["prompt_tokens"] == 100 and lim.stats.tokens_used == 200


def test_unknown_usage_keeps_the_worst_case_counted():
    clock = Clock()
    lim = RateLimiter(1e6, 6000, safety=1.0, burst_s=0.0, clock=clock)
    t1, _ = lim.reserve(1000)
    rate = lim._rates()[1]
    lim.release(t1)
    assert lim.reserve(10)[1] == pytest.approx(1000 / rate, rel=0.01)


def test_retry_after_pauses_everyone_and_429_slows_down():
    clock = Clock()
    lim = RateLimiter(600, 1e9, safety=1.0, clock=clock)
    lim.feedback(429, {"retry-after-ms": "2500"}, retrying=True)
    assert lim.reserve(1)[1] == pytest.approx(2.5)
    assert lim.rate_factor == pytest.approx(0.8) and lim.stats.rate_limited == 1 and lim.stats.retries == 1
    for _ in range(10):
        lim.feedback(200, {}, retrying=False)
    assert lim.rate_factor == pytest.approx(0.9)
    for _ in range(100):
        lim.feedback(200, {}, retrying=False)
    assert lim.rate_factor == 1.0


def test_server_headers_book_usage_we_did_not_see():
    clock = Clock()
    lim = RateLimiter(1e6, 6000, safety=1.0, burst_s=0.0, clock=clock)
    lim.reserve(100)
    # the server says only 1000 of 6000 tokens remain: someone else used ~4900
    lim.observe_headers({"x-ratelimit-remaining-tokens": "1000", "x-ratelimit-remaining-requests": "999999"})
    assert lim.snapshot()["tokens_last_60s"] == 5000
    _, delay = lim.reserve(2000)
    assert delay >= 59.0  # does not fit until the booked usage leaves the window


def test_a_request_larger_than_the_limit_is_an_error():
    with pytest.raises(ValueError, match="can never fit"):
        RateLimiter(10, 1000).reserve(5000)


def test_header_formats():
    assert parse_reset("6m0s") == 360 and parse_reset("20ms") == pytest.approx(0.02) and parse_reset("1.5s") == 1.5
    assert parse_reset("1h2m3s") == 3723 and parse_reset(None) is None and parse_reset("7") == 7
    assert retry_after_seconds({"Retry-After": "3"}) == 3 and retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({}) is None


def test_an_exhausted_quota_pauses_until_the_servers_reset():
    clock = Clock()
    lim = RateLimiter(1e6, 6000, safety=1.0, burst_s=0.0, clock=clock)
    lim.observe_headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"})
    assert lim.reserve(10)[1] == pytest.approx(1.5) and lim.stats.pauses == 1
