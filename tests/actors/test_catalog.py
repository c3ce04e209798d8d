"""The SQLite catalog: versions, aliases, references and names. Pure sqlite3, no Ray."""

import pytest

from actors.catalog import Catalog, VersionRecord
from training.errors import KilnError


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
