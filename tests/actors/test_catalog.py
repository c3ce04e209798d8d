"""The SQLite catalog: versions, aliases, references and names. Pure sqlite3, no Ray."""

import pytest

from kiln.actors.catalog import Catalog, VersionRecord
from kiln.training.errors import KilnError


def register(catalog: Catalog, name: str) -> int:
    with catalog.transaction():
        version = catalog.allocate_version(name)
        catalog.insert_version(
            VersionRecord(name, version, 0.0, "me", {}, {"accuracy": 0.9}, {}, {"f": "0" * 64})
        )
    return version


@pytest.fixture
def catalog(tmp_path):
    c = Catalog(tmp_path / "registry.db")
    yield c
    c.close()


def test_versions_increase_and_are_never_reused(catalog):
    assert [register(catalog, "m") for _ in range(3)] == [1, 2, 3]
    catalog.delete_version("m", 3)
    assert register(catalog, "m") == 4
    assert [r.version for r in catalog.list_versions("m")] == [1, 2, 4]


def test_a_failed_registration_leaves_nothing(catalog):
    register(catalog, "m")
    with pytest.raises(RuntimeError), catalog.transaction():
        catalog.allocate_version("m")
        raise RuntimeError("crash between allocate and insert")
    assert register(catalog, "m") == 2


def test_references_resolve_by_number_alias_and_default(catalog):
    for _ in range(3):
        register(catalog, "m")
    assert catalog.resolve("m").version == 3  # no production alias: the latest
    catalog.set_alias("m", "production", 2)
    assert catalog.resolve("m").version == 2
    assert catalog.resolve("m@1").version == 1
    catalog.set_alias("m", "canary", 3)
    assert catalog.resolve("m@canary").version == 3
    with pytest.raises(LookupError):
        catalog.resolve("m@staging")
    with pytest.raises(LookupError):
        catalog.resolve("m@9")


def test_deleting_an_alias_target_needs_force(catalog):
    register(catalog, "m")
    catalog.set_alias("m", "production", 1)
    with pytest.raises(KilnError, match="--force"):
        catalog.delete_version("m", 1)
    catalog.delete_version("m", 1, force=True)
    assert catalog.list_versions("m") == []


@pytest.mark.parametrize("name", ["../etc", "a/b", "Digits", "has space", "", "x" * 65, "-lead"])
def test_unsafe_names_are_refused(catalog, name):
    with pytest.raises(KilnError, match="model name"):
        register(catalog, name)


def test_archived_versions_answer_only_by_number(catalog):
    for _ in range(3):
        register(catalog, "m")
    catalog.set_status("m", 3, "archived")
    assert catalog.resolve("m").version == 2  # the latest *active* version
    assert catalog.resolve("m@3").status == "archived"
    with pytest.raises(KilnError, match="archived"):
        catalog.set_alias("m", "canary", 3)
    catalog.set_status("m", 3, "active")
    assert catalog.resolve("m").version == 3


def test_archiving_an_alias_target_needs_force_and_drops_the_alias(catalog):
    register(catalog, "m")
    register(catalog, "m")
    catalog.set_alias("m", "production", 1)
    with pytest.raises(KilnError, match="--force"):
        catalog.set_status("m", 1, "archived")
    assert catalog.set_status("m", 1, "archived", force=True) == ["production"]
    assert catalog.aliases("m") == {}
    assert catalog.resolve("m").version == 2


def test_with_every_version_archived_a_bare_name_explains(catalog):
    register(catalog, "m")
    catalog.set_status("m", 1, "archived")
    with pytest.raises(LookupError, match="no active version"):
        catalog.resolve("m")


def test_moving_an_alias_returns_the_previous_target(catalog):
    for _ in range(2):
        register(catalog, "m")
    assert catalog.set_alias("m", "production", 1) is None
    assert catalog.set_alias("m", "production", 2) == 1
    assert catalog.resolve("m@production").version == 2


def test_every_change_is_audited_with_its_actor(catalog):
    register(catalog, "m")
    register(catalog, "m")
    catalog.set_alias("m", "production", 2, actor="k1")
    catalog.set_status("m", 1, "archived", actor="k1")
    catalog.remove_alias("m", "production")
    catalog.delete_version("m", 2)
    rows = [(e["key_id"], e["action"], e["target"]) for e in catalog.list_audit()]
    assert rows == [
        ("k1", "alias", "m@production"),
        ("k1", "archive", "m@1"),
        ("local", "unalias", "m@production"),
        ("local", "delete", "m@2"),
    ]
    assert [e["action"] for e in catalog.list_audit(limit=1)] == ["delete"]
    assert [e["target"] for e in catalog.list_audit(action="archive")] == ["m@1"]


def test_a_refused_change_leaves_no_audit_row(catalog):
    register(catalog, "m")
    catalog.set_alias("m", "production", 1)
    with pytest.raises(KilnError):
        catalog.delete_version("m", 1)
    assert [e["action"] for e in catalog.list_audit()] == ["alias"]


def test_nested_transactions_join_the_outer_one(catalog):
    with pytest.raises(RuntimeError), catalog.transaction():
        register(catalog, "m")  # opens its own transaction inside
        raise RuntimeError("the outer step fails")
    assert catalog.list_models() == []


def test_a_catalog_from_the_first_release_gains_the_new_columns(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE models (name TEXT PRIMARY KEY, created_at REAL NOT NULL, "
        "next_version INTEGER NOT NULL DEFAULT 1);"
        "CREATE TABLE versions (name TEXT NOT NULL, version INTEGER NOT NULL, created_at REAL, "
        "creator TEXT, spec TEXT, metrics TEXT, lineage TEXT, artifacts TEXT, "
        "PRIMARY KEY (name, version));"
        "INSERT INTO models VALUES ('old', 0, 2);"
        "INSERT INTO versions VALUES ('old', 1, 0, 'me', '{}', '{}', '{}', '{}');"
    )
    db.commit()
    db.close()
    catalog = Catalog(path)
    record = catalog.resolve("old")
    assert (record.version, record.status, record.creator_key) == (1, "active", "local")
    assert register(catalog, "old") == 2
    catalog.close()


def test_opening_and_reading_never_wait_behind_a_writer(tmp_path):
    import sqlite3
    import time

    path = tmp_path / "registry.db"
    writer = Catalog(path)
    register(writer, "m")
    with writer.transaction():  # e.g. a registration writing large artifacts
        writer.allocate_version("m")
        started = time.perf_counter()
        reader = Catalog(path)
        assert reader.resolve("m").version == 1
        assert time.perf_counter() - started < 1.0
        reader.close()
    with writer.transaction():
        other = sqlite3.connect(path, timeout=0.1, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")  # a second writer does wait (here, gives up)
        other.close()
    writer.close()
