"""Per-key token buckets: `rate_per_s` sustained, `burst` at once; 429 with Retry-After past it.

Each Serve replica keeps its own buckets (a shared store would add a hop per request), so with
N replicas a key may reach N x the rate: size `rate_per_s` per replica.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    rate_per_s: float
    burst: float
    tokens: float = -1.0
    updated_s: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst

    def take(self, now_s: float | None = None) -> float:
        """0 when a request may go now, else the seconds until one token is back."""
        now = time.monotonic() if now_s is None else now_s
        self.tokens = min(self.burst, self.tokens + (now - self.updated_s) * self.rate_per_s)
        self.updated_s = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


class RateLimiter:
    """One bucket per key id; `rate_per_s <= 0` turns limiting off. `clock` gives seconds."""

    def __init__(
        self, rate_per_s: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate_per_s, self.burst = rate_per_s, max(burst, 1.0)
        self.clock = clock
        self.buckets: dict[str, TokenBucket] = {}

    def wait_s(self, key_id: str, now_s: float | None = None) -> float:
        if self.rate_per_s <= 0:
            return 0.0
        now = self.clock() if now_s is None else now_s
        bucket = self.buckets.get(key_id)
        if bucket is None:
            bucket = self.buckets[key_id] = TokenBucket(self.rate_per_s, self.burst, updated_s=now)
        return bucket.take(now)
