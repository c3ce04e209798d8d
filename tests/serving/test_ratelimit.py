"""Per-key token buckets on an injected clock: burst, refill, Retry-After. No Ray, no sleep."""

import pytest

from kiln.serving.ratelimit import RateLimiter, TokenBucket


class Clock:
    def __init__(self, now_s: float = 100.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def test_a_burst_passes_then_the_wait_is_the_time_to_one_token():
    clock = Clock()
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=clock)
    assert [limiter.wait_s("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.wait_s("k") == pytest.approx(0.5)  # one token at 2/s
    clock.now_s += 0.25
    assert limiter.wait_s("k") == pytest.approx(0.25)  # half a token came back
    clock.now_s += 0.25
    assert limiter.wait_s("k") == 0.0
    assert limiter.wait_s("k") == pytest.approx(0.5)


def test_an_idle_key_saves_up_no_more_than_the_burst():
    clock = Clock()
    limiter = RateLimiter(rate_per_s=10.0, burst=2, clock=clock)
    limiter.wait_s("k")
    clock.now_s += 3600
    assert [limiter.wait_s("k") > 0 for _ in range(3)] == [False, False, True]


def test_keys_have_their_own_buckets():
    limiter = RateLimiter(rate_per_s=1.0, burst=1, clock=Clock())
    assert limiter.wait_s("a") == 0.0 and limiter.wait_s("a") == pytest.approx(1.0)
    assert limiter.wait_s("b") == 0.0


def test_rate_zero_means_no_limit_and_a_burst_below_one_still_lets_one_through():
    clock = Clock()
    assert all(RateLimiter(0.0, 1, clock=clock).wait_s("k") == 0.0 for _ in range(1000))
    tight = RateLimiter(rate_per_s=4.0, burst=0.1, clock=clock)
    assert tight.wait_s("k") == 0.0 and tight.wait_s("k") == pytest.approx(0.25)


def test_an_explicit_time_overrides_the_clock():
    limiter = RateLimiter(rate_per_s=1.0, burst=1, clock=Clock(50.0))
    assert limiter.wait_s("k", now_s=50.0) == 0.0
    assert limiter.wait_s("k", now_s=50.4) == pytest.approx(0.6)
    bucket = TokenBucket(rate_per_s=1.0, burst=2, updated_s=0.0)
    assert [bucket.take(now_s=0.0), bucket.take(now_s=0.0)] == [0.0, 0.0]
    assert bucket.take(now_s=0.5) == pytest.approx(0.5)
