"""Key rotation with a grace period, last use and the 90-day warning, on the registry's own
code and a real SQLite catalog (no Ray)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kiln.actors.keys import UNUSED_WARNING_DAYS, parse_grace_s, with_last_use
from kiln.actors.registry import RegistryService
from kiln.training.errors import KilnError


@pytest.fixture
def registry(tmp_path: Path):
    service = RegistryService(str(tmp_path / "registry.db"), str(tmp_path / "storage"))
    yield service
    service.close()


def test_rotation_keeps_scopes_and_the_old_secret_for_the_grace(registry) -> None:
    old = registry.create_key(["predict:m", "feedback:m"])
    made = registry.rotate_key(old["id"], grace_s=3600)
    assert made["replaces"] == old["id"] and made["id"] != old["id"]
    assert made["scopes"] == ["feedback:m", "predict:m"]
    new_check, old_check = registry.verify_key(made["secret"]), registry.verify_key(old["secret"])
    assert new_check.ok and old_check.ok  # both work during the grace
    assert old_check.expires_at == pytest.approx(time.time() + 3600, abs=5)
    assert new_check.expires_at is None  # the new key keeps the old one's lifetime: never
    audit = registry.audit(action="key.rotate")
    assert audit[0]["target"] == old["id"] and audit[0]["detail"]["new_id"] == made["id"]


def test_rotation_with_no_grace_ends_the_old_secret_now(registry) -> None:
    old = registry.create_key(["predict:m"])
    made = registry.rotate_key(old["id"], grace_s=0)
    assert registry.verify_key(old["secret"]).reason == "expired"
    assert registry.verify_key(made["secret"]).ok


def test_rotation_never_extends_a_shorter_lifetime(registry) -> None:
    old = registry.create_key(["predict:m"], expires_in_s=60)
    made = registry.rotate_key(old["id"], grace_s=86_400)
    assert made["old_expires_at"] == pytest.approx(old["expires_at"])
    assert made["expires_at"] == pytest.approx(old["expires_at"])


def test_rotating_a_revoked_or_unknown_key_is_refused(registry) -> None:
    old = registry.create_key(["predict:m"])
    registry.revoke_key(old["id"])
    with pytest.raises(KilnError, match="revoked"):
        registry.rotate_key(old["id"], grace_s=60)
    with pytest.raises(LookupError):
        registry.rotate_key("0123456789ab", grace_s=60)


def test_last_use_is_the_latest_reported(registry) -> None:
    made = registry.create_key(["predict:m"])
    assert registry.list_keys()[0]["last_used_at"] is None
    now = time.time()
    registry.record_key_uses({made["id"]: now - 10})
    registry.record_key_uses({made["id"]: now - 100})  # a late report from another replica
    assert registry.list_keys()[0]["last_used_at"] == pytest.approx(now - 10)
    assert registry.list_keys()[0]["unused_warning"] is False


def test_unused_warning_after_90_days() -> None:
    now = 1e9
    day = 86_400.0
    key = {"status": "active", "created_at": now - 200 * day}
    assert with_last_use(key, None, now)["unused_warning"]  # never used, made 200 days ago
    assert with_last_use(key, now - (UNUSED_WARNING_DAYS + 1) * day, now)["unused_warning"]
    assert not with_last_use(key, now - 10 * day, now)["unused_warning"]
    revoked = {**key, "status": "revoked"}
    assert not with_last_use(revoked, None, now)["unused_warning"]  # nothing to act on


def test_grace_parsing() -> None:
    assert parse_grace_s("0") == 0.0
    assert parse_grace_s("1h") == 3600.0
    with pytest.raises(KilnError, match="--grace"):
        parse_grace_s("soon")
