"""The replica-side key cache and the 401/403 decision, with a stand-in registry. No Ray."""

import asyncio

import pytest
from fastapi import HTTPException

from kiln.actors.keys import KeyCheck
from kiln.serving.auth import BearerAuth, KeyCache

SECRET = "kiln_0123456789ab_abcdefghijklmnop"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingRegistry:
    """Answers like Registry.verify_key and counts how often it was asked."""

    def __init__(self, check: KeyCheck) -> None:
        self.check = check
        self.calls = 0

    async def __call__(self, secret: str) -> KeyCheck:
        self.calls += 1
        return self.check


def live(scopes=("predict:m",), expires_at=None) -> KeyCheck:
    return KeyCheck(
        ok=True, reason="ok", key_id="0123456789ab", scopes=scopes, expires_at=expires_at
    )


def refused(auth: BearerAuth, secret, kind="predict", model="m") -> HTTPException:
    with pytest.raises(HTTPException) as info:
        asyncio.run(auth.authorize(secret, kind, model))
    return info.value


def test_missing_and_malformed_keys_are_401_without_asking_the_registry():
    registry = CountingRegistry(live())
    auth = BearerAuth(registry)
    missing = refused(auth, None)
    assert missing.status_code == 401 and "missing API key" in missing.detail
    assert missing.headers == {"WWW-Authenticate": 'Bearer realm="kiln"'}
    assert refused(auth, "garbage").status_code == 401
    assert registry.calls == 0


def test_a_key_without_the_scope_is_403_naming_it():
    auth = BearerAuth(CountingRegistry(live(scopes=("predict:other",))))
    error = refused(auth, SECRET, model="m")
    assert error.status_code == 403
    assert "lacks scope predict:m" in error.detail and "predict:other" in error.detail


@pytest.mark.parametrize(
    "reason,fragment",
    [("revoked", "was revoked"), ("expired", "expired at"), ("invalid", "invalid")],
)
def test_refused_keys_are_401_saying_why(reason, fragment):
    check = KeyCheck(ok=False, reason=reason, key_id="0123456789ab", expires_at=5.0)
    error = refused(BearerAuth(CountingRegistry(check)), SECRET)
    assert error.status_code == 401 and fragment in error.detail


def test_answers_are_cached_for_the_ttl_then_asked_again():
    clock = Clock()
    registry = CountingRegistry(live())
    auth = BearerAuth(registry, KeyCache(ttl_s=5.0, clock=clock))
    for _ in range(10):
        asyncio.run(auth.authorize(SECRET, "predict", "m"))
    assert registry.calls == 1
    registry.check = KeyCheck(ok=False, reason="revoked", key_id="0123456789ab")
    clock.now += 4.9
    asyncio.run(auth.authorize(SECRET, "predict", "m"))  # still the cached answer
    clock.now += 0.2
    assert refused(auth, SECRET).status_code == 401  # revocation seen after the TTL
    assert registry.calls == 2


def test_a_cached_key_is_not_trusted_past_its_expiry():
    clock = Clock()
    registry = CountingRegistry(live(expires_at=clock.now + 1.0))
    auth = BearerAuth(registry, KeyCache(ttl_s=60.0, clock=clock))
    asyncio.run(auth.authorize(SECRET, "predict", "m"))
    clock.now += 1.5
    registry.check = KeyCheck(ok=False, reason="expired", key_id="0123456789ab", expires_at=1.0)
    assert refused(auth, SECRET).status_code == 401
    assert registry.calls == 2


def test_the_cache_keeps_no_plaintext_secret_and_stays_bounded():
    cache = KeyCache(max_entries=3)
    for i in range(5):
        cache.put(f"{SECRET}{i}", live())
    assert len(cache._entries) == 3
    assert all(SECRET not in slot for slot in cache._entries)
    assert cache.get(f"{SECRET}0") is None and cache.get(f"{SECRET}4") is not None


def test_concurrent_misses_for_one_key_ask_the_registry_once():
    """Requests in flight when a busy key's entry expires share one registry question."""

    class SlowRegistry(CountingRegistry):
        async def __call__(self, secret: str) -> KeyCheck:
            self.calls += 1
            await asyncio.sleep(0.01)
            return self.check

    registry = SlowRegistry(live())
    auth = BearerAuth(registry)

    async def many() -> list[KeyCheck]:
        return await asyncio.gather(*(auth.authorize(SECRET, "predict", "m") for _ in range(64)))

    checks = asyncio.run(many())
    assert registry.calls == 1 and all(c.ok for c in checks)
    assert not auth._asking


def test_a_failed_registry_question_reaches_every_waiter_and_is_asked_again():
    class FailingRegistry(CountingRegistry):
        async def __call__(self, secret: str) -> KeyCheck:
            self.calls += 1
            await asyncio.sleep(0.01)
            raise HTTPException(503, "the key registry is restarting")

    registry = FailingRegistry(live())
    auth = BearerAuth(registry)

    async def many() -> list[object]:
        calls = (auth.authorize(SECRET, "predict", "m") for _ in range(8))
        return await asyncio.gather(*calls, return_exceptions=True)

    errors = asyncio.run(many())
    assert registry.calls == 1
    assert all(isinstance(e, HTTPException) and e.status_code == 503 for e in errors)
    asyncio.run(many())
    assert registry.calls == 2  # a failure is not cached


class Reports:
    def __init__(self, fail: bool = False) -> None:
        self.batches: list[dict[str, float]] = []
        self.fail = fail

    async def __call__(self, uses: dict[str, float]) -> None:
        if self.fail:
            raise ConnectionError("registry restarting")
        self.batches.append(dict(uses))


def test_uses_are_reported_in_one_batch_per_period():
    clock = Clock()
    reports = Reports()
    auth = BearerAuth(
        CountingRegistry(live()), KeyCache(clock=clock), report=reports, report_interval_s=0.05
    )

    async def scenario() -> None:
        for step in range(100):
            clock.now = 1000.0 + step
            await auth.authorize(SECRET, "predict", "m")
        assert reports.batches == []  # nothing per request
        for _ in range(100):
            await asyncio.sleep(0.02)
            if reports.batches:
                break

    asyncio.run(scenario())
    assert reports.batches == [{"0123456789ab": 1099.0}]


def test_a_failed_report_keeps_the_uses_for_the_next():
    reports = Reports(fail=True)
    auth = BearerAuth(CountingRegistry(live()), report=reports)
    auth.uses = {"0123456789ab": 5.0}
    asyncio.run(auth.report_uses())
    assert auth.uses == {"0123456789ab": 5.0}
    reports.fail = False
    asyncio.run(auth.report_uses())
    assert reports.batches == [{"0123456789ab": 5.0}] and auth.uses == {}


def test_refused_keys_are_not_noted_as_used():
    reports = Reports()
    auth = BearerAuth(CountingRegistry(KeyCheck(ok=False, reason="revoked")), report=reports)
    refused(auth, SECRET)
    assert auth.uses == {}


def test_the_cached_fast_path_allows_only_what_authorize_would_and_notes_the_use():
    """`cached_allow` (the lean path's first try) answers without a coroutine for a cached
    live key with the scope, and leaves every other case to `authorize`."""
    clock = Clock()
    registry = CountingRegistry(live())
    auth = BearerAuth(registry, KeyCache(ttl_s=5.0, clock=clock))
    assert auth.cached_allow(SECRET, "predict", "m") is None  # a miss: not decided here
    assert auth.cached_allow(None, "predict", "m") is None
    asyncio.run(auth.authorize(SECRET, "predict", "m"))  # asks the registry, caches
    auth.uses.clear()
    clock.now += 1.0
    check = auth.cached_allow(SECRET, "predict", "m")
    assert check is not None and check.key_id == "0123456789ab"
    assert auth.uses == {"0123456789ab": clock.now} and registry.calls == 1
    assert auth.cached_allow(SECRET, "predict", "other") is None  # authorize answers 403
    assert refused(auth, SECRET, model="other").status_code == 403
    clock.now += 5.0  # past the TTL: a miss again
    assert auth.cached_allow(SECRET, "predict", "m") is None
