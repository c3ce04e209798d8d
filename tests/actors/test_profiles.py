"""Latency profiles in the catalog and through the registry's code: real SQLite, no Ray."""

import sqlite3

import pytest

from kiln.actors.catalog import Catalog, VersionRecord
from kiln.actors.registry import RegistryService
from kiln.training.errors import KilnError, NotFoundError


def register(catalog: Catalog, name: str = "m") -> int:
    with catalog.transaction():
        version = catalog.allocate_version(name)
        catalog.insert_version(VersionRecord(name, version, 0.0, "me", {}, {}, {}, {}))
    return version


def measured(b1_p50_ms: float, at: float = 1000.0) -> dict:
    return {"b1_p50_ms": b1_p50_ms, "measured_at": at, "threads": 1}


@pytest.fixture
def catalog(tmp_path):
    c = Catalog(tmp_path / "registry.db")
    yield c
    c.close()


def test_a_profile_per_backend_and_a_new_measurement_replaces_the_old(catalog):
    register(catalog)
    register(catalog)
    catalog.put_profile("m", 1, "torch", measured(2.0, at=1000.0))
    catalog.put_profile("m", 1, "onnxruntime", measured(1.0, at=1001.0))
    catalog.put_profile("m", 2, "torch", measured(0.5, at=1002.0))
    catalog.put_profile("m", 1, "torch", measured(1.8, at=1003.0))  # re-measured

    rows = catalog.list_profiles("m")
    assert [(r["version"], r["backend"], r["profile"]["b1_p50_ms"]) for r in rows] == [
        (1, "onnxruntime", 1.0),
        (1, "torch", 1.8),
        (2, "torch", 0.5),
    ]
    assert rows[1]["measured_at"] == 1003.0
    assert [r["backend"] for r in catalog.list_profiles("m", version=2)] == ["torch"]


def test_profiles_go_with_their_version(catalog):
    register(catalog)
    register(catalog)
    catalog.put_profile("m", 1, "torch", measured(2.0))
    catalog.put_profile("m", 2, "torch", measured(1.0))
    catalog.delete_version("m", 1)
    assert [r["version"] for r in catalog.list_profiles("m")] == [2]
    (count,) = catalog._db.execute("SELECT COUNT(*) FROM profiles WHERE version = 1").fetchone()
    assert count == 0


def test_a_profile_of_a_version_that_does_not_exist_is_refused(catalog):
    register(catalog)
    with pytest.raises(NotFoundError, match="model m has no version 7"):
        catalog.put_profile("m", 7, "torch", measured(1.0))
    assert catalog.list_profiles("m") == []


def test_a_catalog_made_before_profiles_gains_the_table_on_open(tmp_path):
    path = tmp_path / "old.db"
    old = Catalog(path)
    register(old)
    old._db.execute("DROP TABLE profiles")  # the file as the release before profiles left it
    old.close()
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "profiles" not in tables

    reopened = Catalog(path)
    try:
        reopened.put_profile("m", 1, "torch", measured(2.0))
        assert [r["version"] for r in reopened.list_profiles("m")] == [1]
    finally:
        reopened.close()


def test_the_registry_records_and_lists_profiles_and_a_key_needs_admin(tmp_path):
    from tests.conftest import TINY_SPEC, tiny_model_files

    service = RegistryService(str(tmp_path / "registry.db"), str(tmp_path / "storage"))
    try:
        record = service.register("m", tiny_model_files(), TINY_SPEC, {}, {})
        done = service.record_profile("m", record.version, "torch", measured(0.3))
        assert done == {"ref": "m@1", "backend": "torch", "profile": measured(0.3)}
        assert [r["profile"] for r in service.profiles("m")] == [measured(0.3)]

        reader = service.create_key(["predict:m"])["secret"]
        with pytest.raises(KilnError, match="lacks the admin scope"):
            service.record_profile("m", 1, "torch", measured(9.9), key=reader)
        assert [r["profile"] for r in service.profiles("m", 1)] == [measured(0.3)]
        with pytest.raises(NotFoundError, match="no model named nosuch"):
            service.profiles("nosuch")
    finally:
        service.close()
