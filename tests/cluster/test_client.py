"""The Python client: in-process on a catalog file, and through the session's Registry actor."""

import pytest

from kiln.client import Kiln
from kiln.training.errors import KilnError, NotFoundError
from tests.conftest import TINY_SPEC, tiny_model_files


@pytest.fixture
def local(tmp_path):
    with Kiln(home=tmp_path / "home", use_ray=False) as client:
        yield client


def test_the_registry_round_trip_in_process(local):
    assert not local.uses_ray
    for seed in range(3):
        local.register("m", tiny_model_files(seed), TINY_SPEC, {"seed": seed}, {})
    assert local.alias("m", 2, "production") == {
        "name": "m",
        "alias": "production",
        "version": 2,
        "previous": None,
    }
    shown = local.show("m")
    assert (shown["version"], shown["aliases"]) == (2, ["production"])
    assert local.resolve("m@production").version == 2
    local.archive("m@3")
    assert [(v["version"], v["status"]) for v in local.versions("m")] == [
        (1, "active"),
        (2, "active"),
        (3, "archived"),
    ]
    with pytest.raises(KilnError, match="--force"):
        local.delete("m@2")
    assert local.delete("m@2", force=True)["aliases_removed"] == ["production"]
    assert local.resolve("m").version == 1  # no production alias, v3 archived
    assert local.models()[0]["num_versions"] == 2


def test_keys_and_audit_in_process(local):
    made = local.create_key(["predict:m"], expires="30d")
    assert set(made) == {"id", "secret", "scopes", "expires"}
    assert made["expires"].endswith("+00:00")
    listed = local.keys()
    assert [k["id"] for k in listed] == [made["id"]] and "secret" not in listed[0]
    assert local.revoke_key(made["id"])["status"] == "revoked"
    assert [(e["key_id"], e["action"]) for e in local.audit()] == [
        ("local", "key.create"),
        ("local", "key.revoke"),
    ]
    with pytest.raises(KilnError, match='Got "7x" for --expires'):
        local.create_key(["admin"], expires="7x")


def test_an_error_naming_a_flag_tells_a_python_caller_it_is_a_keyword(local):
    with pytest.raises(KilnError) as raised:
        local.audit(limit=0)
    assert str(raised.value) == 'Got "0" for --limit. --limit must be at least 1.'
    assert raised.value.__notes__ == [
        "From Python: --limit is the kiln command's name for the matching keyword argument "
        "of this call."
    ]
    local.register("m", tiny_model_files(), TINY_SPEC, {}, {})
    local.alias("m", 1, "production")
    with pytest.raises(KilnError, match="--force") as raised:
        local.delete("m@1")
    assert len(raised.value.__notes__) == 1 and "--force is the kiln" in raised.value.__notes__[0]
    with pytest.raises(NotFoundError) as missing:
        local.resolve("ghost")
    assert not getattr(missing.value, "__notes__", None)  # no flag named, nothing to add


def test_a_client_key_acts_as_that_key(tmp_path):
    home = tmp_path / "home"
    with Kiln(home=home, use_ray=False) as owner:
        owner.register("m", tiny_model_files(), TINY_SPEC, {}, {})
        admin = owner.create_key(["admin"])
        reader = owner.create_key(["predict:m"])
    with Kiln(home=home, key=reader["secret"], use_ray=False) as client:
        with pytest.raises(KilnError, match="lacks the admin scope"):
            client.alias("m", 1, "production")
    with Kiln(home=home, key=admin["secret"], use_ray=False) as client:
        client.alias("m", 1, "production")
        assert client.audit(limit=1)[0]["key_id"] == admin["id"]


def test_through_the_registry_actor_errors_arrive_unwrapped(settings_session, registry_session):
    with Kiln(home=settings_session.kiln_home) as client:
        assert client.uses_ray
        record = client.register("client-tiny", tiny_model_files(), TINY_SPEC, {}, {})
        assert client.resolve(f"client-tiny@{record.version}") == record
        with pytest.raises(NotFoundError, match="no model named ghost"):
            client.resolve("ghost")


def test_a_home_the_running_registry_does_not_own_is_refused(registry_session, tmp_path):
    with pytest.raises(KilnError, match="Registry actor on this Ray uses"):
        Kiln(home=tmp_path / "elsewhere", use_ray=True)
