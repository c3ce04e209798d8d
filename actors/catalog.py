"""The SQLite catalog behind the Registry actor: models, versions and aliases. No Ray here.

The Registry actor is its only writer. Versions increase monotonically per model and are never
reused, even after a delete; a registration is one transaction, so a crash leaves the version
either fully recorded or absent.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from training.errors import KilnError

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
DEFAULT_ALIAS = "production"

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    next_version INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL REFERENCES models(name),
    version INTEGER NOT NULL,
    created_at REAL NOT NULL,
    creator TEXT NOT NULL,
    spec TEXT NOT NULL,
    metrics TEXT NOT NULL,
    lineage TEXT NOT NULL,
    artifacts TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    version INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (name, alias)
);
"""


@dataclass(frozen=True)
class VersionRecord:
    """One registered model version, as the catalog holds it."""

    name: str
    version: int
    created_at: float
    creator: str
    spec: dict[str, Any]
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    artifacts: dict[str, str]
    """File name -> sha256 of its bytes."""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise KilnError(
            f'Got "{name}" for a model name. Use lowercase letters, digits and "-", '
            "starting with a letter or digit, at most 64 characters."
        )
    return name


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """`name`, `name@3` or `name@alias` -> (name, selector or None)."""
    name, _, selector = ref.partition("@")
    validate_name(name)
    if "@" in ref and not selector:
        raise KilnError(f'Got "{ref}". After "@" give a version number or an alias, e.g. {name}@1.')
    return name, selector or None


class Catalog:
    """Thin typed access to the catalog's SQLite file."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ------------------------------------------------------------------ writes

    def allocate_version(self, name: str) -> int:
        """Inside a transaction: the next version number of `name` (creating the model)."""
        validate_name(name)
        self._db.execute(
            "INSERT OR IGNORE INTO models(name, created_at) VALUES (?, ?)", (name, time.time())
        )
        (version,) = self._db.execute(
            "SELECT next_version FROM models WHERE name = ?", (name,)
        ).fetchone()
        self._db.execute("UPDATE models SET next_version = ? WHERE name = ?", (version + 1, name))
        return int(version)

    def insert_version(self, record: VersionRecord) -> None:
        self._db.execute(
            "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.name,
                record.version,
                record.created_at,
                record.creator,
                json.dumps(record.spec),
                json.dumps(record.metrics),
                json.dumps(record.lineage),
                json.dumps(record.artifacts),
            ),
        )

    def set_alias(self, name: str, alias: str, version: int) -> None:
        if not ALIAS_PATTERN.match(alias):
            raise KilnError(
                f'Got "{alias}" for an alias. Use lowercase letters, digits and "-", '
                "starting with a letter, at most 32 characters."
            )
        self.get_version(name, version)
        self._db.execute(
            "INSERT INTO aliases VALUES (?, ?, ?, ?) ON CONFLICT(name, alias) "
            "DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
            (name, alias, version, time.time()),
        )

    def delete_version(self, name: str, version: int, force: bool = False) -> None:
        self.get_version(name, version)
        aliases = self.aliases_of(name, version)
        if aliases and not force:
            raise KilnError(
                f"{name}@{version} is the target of alias(es) {', '.join(aliases)}. "
                "Move the alias first, or delete with --force."
            )
        with self.transaction():
            self._db.execute("DELETE FROM aliases WHERE name = ? AND version = ?", (name, version))
            self._db.execute("DELETE FROM versions WHERE name = ? AND version = ?", (name, version))

    # ------------------------------------------------------------------ reads

    def _record(self, row: tuple) -> VersionRecord:
        name, version, created_at, creator, spec, metrics, lineage, artifacts = row
        return VersionRecord(
            name,
            version,
            created_at,
            creator,
            json.loads(spec),
            json.loads(metrics),
            json.loads(lineage),
            json.loads(artifacts),
        )

    def get_version(self, name: str, version: int) -> VersionRecord:
        row = self._db.execute(
            "SELECT * FROM versions WHERE name = ? AND version = ?", (name, version)
        ).fetchone()
        if row is None:
            raise LookupError(f"model {name} has no version {version}")
        return self._record(row)

    def latest_version(self, name: str) -> VersionRecord:
        row = self._db.execute(
            "SELECT * FROM versions WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
        ).fetchone()
        if row is None:
            raise LookupError(f"no model named {name} is registered")
        return self._record(row)

    def resolve(self, ref: str) -> VersionRecord:
        """`name` (its production alias, else its latest version), `name@3` or `name@alias`."""
        name, selector = parse_model_ref(ref)
        if selector is None:
            row = self._db.execute(
                "SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, DEFAULT_ALIAS)
            ).fetchone()
            return self.get_version(name, row[0]) if row else self.latest_version(name)
        if selector.isdigit():
            return self.get_version(name, int(selector))
        row = self._db.execute(
            "SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, selector)
        ).fetchone()
        if row is None:
            raise LookupError(f"model {name} has no alias {selector}")
        return self.get_version(name, row[0])

    def aliases_of(self, name: str, version: int) -> list[str]:
        rows = self._db.execute(
            "SELECT alias FROM aliases WHERE name = ? AND version = ? ORDER BY alias",
            (name, version),
        )
        return [r[0] for r in rows]

    def aliases(self, name: str) -> dict[str, int]:
        rows = self._db.execute("SELECT alias, version FROM aliases WHERE name = ?", (name,))
        return {alias: version for alias, version in rows}

    def list_versions(self, name: str) -> list[VersionRecord]:
        rows = self._db.execute(
            "SELECT * FROM versions WHERE name = ? ORDER BY version", (name,)
        ).fetchall()
        return [self._record(r) for r in rows]

    def list_models(self) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT m.name, COUNT(v.version), MAX(v.version) FROM models m "
            "LEFT JOIN versions v ON v.name = m.name GROUP BY m.name ORDER BY m.name"
        ).fetchall()
        return [
            {"name": n, "num_versions": c, "latest_version": latest, "aliases": self.aliases(n)}
            for n, c, latest in rows
            if c > 0
        ]
