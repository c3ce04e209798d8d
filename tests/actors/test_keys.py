"""API key primitives: secret format, salted hashes, scopes and lifetimes. No Ray, no SQLite."""

import pytest

from kiln.actors.keys import (
    hash_secret,
    key_id_of,
    new_key,
    parse_duration_s,
    parse_scopes,
    scope_allows,
    secret_matches,
)
from kiln.training.errors import KilnError


def test_a_new_key_carries_its_id_and_only_its_hash_is_derived():
    key = new_key()
    assert key.secret.startswith(f"kiln_{key.key_id}_")
    assert key_id_of(key.secret) == key.key_id
    assert key.secret not in key.hash and key.secret.split("_", 2)[2] not in key.hash
    assert secret_matches(key.secret, key.salt, key.hash)
    assert not secret_matches(
        key.secret[:-1] + ("A" if key.secret[-1] != "A" else "B"), key.salt, key.hash
    )


def test_the_same_secret_hashes_differently_under_another_salt():
    a, b = new_key(), new_key()
    assert a.key_id != b.key_id and a.salt != b.salt
    assert hash_secret(a.secret, a.salt) != hash_secret(a.secret, b.salt)


@pytest.mark.parametrize(
    "token",
    ["", "Bearer x", "kiln_", "kiln_zzzzzzzzzzzz_abc", "kiln_0123456789ab", "other_0123456789ab_x"],
)
def test_malformed_secrets_have_no_id(token):
    assert key_id_of(token) is None


def test_scopes_are_parsed_sorted_and_deduplicated():
    assert parse_scopes(["predict:m", "admin", "predict:m", "feedback:*"]) == [
        "admin",
        "feedback:*",
        "predict:m",
    ]


@pytest.mark.parametrize("scope", ["read", "predict", "predict:", "predict:Bad/Name", "admin:x"])
def test_bad_scopes_name_the_value_and_the_forms(scope):
    with pytest.raises(KilnError, match=f'Got "{scope}" for --scope.*predict:<model'):
        parse_scopes([scope])


def test_no_scope_is_refused():
    with pytest.raises(KilnError, match="at least one"):
        parse_scopes([])


def test_scope_rules():
    assert scope_allows(["predict:m"], "predict", "m")
    assert not scope_allows(["predict:m"], "predict", "other")
    assert not scope_allows(["feedback:m"], "predict", "m")
    assert scope_allows(["predict:*"], "predict", "anything")
    assert scope_allows(["admin"], "feedback", "m")


@pytest.mark.parametrize("text,seconds", [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400)])
def test_durations(text, seconds):
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize("text", ["7x", "30", "d", "-1d", "0h", "1.5h", "99999d", ""])
def test_bad_durations_say_how_to_fix(text):
    with pytest.raises(KilnError, match=f'Got "{text}" for --expires'):
        parse_duration_s(text)
