"""The SQLite catalog behind the Registry: models, versions, aliases, latency profiles, API keys,
audit. No Ray.

The Registry actor is its writer; SQLite's own locking (`BEGIN IMMEDIATE`) keeps a second
process on the same file (the local CLI) from interleaving with it. Versions increase
monotonically per model and are never reused once committed, even after a delete. Every change
and its audit row commit in one transaction, so a crash leaves both or neither. A latency
profile is a measurement, not a change: it is stored (one row per version and backend, a new
measurement replacing the old) without an audit row, and goes when its version is deleted.
A catalog made before a table existed gains it on open (`CREATE TABLE IF NOT EXISTS`).
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.training.errors import KilnError, NotFoundError

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
DEFAULT_ALIAS = "production"
ACTIVE, ARCHIVED = "active", "archived"
LOCAL_ACTOR = "local"
"""The audit identity of whoever uses the catalog without a key: the local CLI user."""

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
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    salt TEXT NOT NULL,
    kdf TEXT NOT NULL,
    scopes TEXT NOT NULL,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    expires_at REAL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS profiles (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    backend TEXT NOT NULL,
    profile TEXT NOT NULL,
    measured_at REAL NOT NULL,
    PRIMARY KEY (name, version, backend),
    FOREIGN KEY (name, version) REFERENCES versions(name, version) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS key_uses (
    id TEXT PRIMARY KEY,
    last_used_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS log_policies (
    name TEXT PRIMARY KEY REFERENCES models(name),
    policy TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    key_id TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
"""
# Columns added after the first release; a catalog made by it gains them on open.
VERSION_COLUMNS_ADDED = {
    "status": f"TEXT NOT NULL DEFAULT '{ACTIVE}'",
    "creator_key": f"TEXT NOT NULL DEFAULT '{LOCAL_ACTOR}'",
    "request_id": "TEXT",
    "stored_artifacts": "TEXT NOT NULL DEFAULT '{}'",
}
VERSION_SELECT = (
    "SELECT name, version, created_at, creator, spec, metrics, lineage, artifacts, status, "
    "creator_key, stored_artifacts FROM versions"
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionRecord:
    """One registered model version, as the catalog holds it."""

    name: str
    version: int
    created_at: float
    creator: str
    """The OS user who registered it."""
    spec: dict[str, Any]
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    artifacts: dict[str, str]
    """File name -> sha256 of its bytes."""
    status: str = ACTIVE
    """active, or archived: no longer the answer to a bare name, still there by number."""
    creator_key: str = LOCAL_ACTOR
    """The API key id that registered it, or "local"."""
    stored_artifacts: dict[str, str] = field(default_factory=dict)
    """File name -> sha256 of the bytes on storage, where they differ from `artifacts`' (the
    ciphertext of an encrypted store): checked before a file is opened."""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class KeyRow:
    """A stored API key: never the secret, only its salted hash."""

    key_id: str
    hash: str
    salt: str
    kdf: str
    scopes: tuple[str, ...]
    created_at: float
    created_by: str
    expires_at: float | None
    revoked_at: float | None

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def public(self, now: float) -> dict[str, Any]:
        """What `kiln keys list` may show: everything but the hash and salt."""
        return {
            "id": self.key_id,
            "scopes": list(self.scopes),
            "status": self.status(now),
            "created_at": self.created_at,
            "created_by": self.created_by,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
        }


def validate_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise KilnError(
            f'Got "{name}" for a model name. Use lowercase letters, digits and "-", '
            "starting with a letter or digit, at most 64 characters."
        )
    return name


def validate_alias(alias: str) -> str:
    if not ALIAS_PATTERN.match(alias or ""):
        raise KilnError(
            f'Got "{alias}" for an alias. Use lowercase letters, digits and "-", '
            "starting with a letter, at most 32 characters."
        )
    return alias


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """`name`, `name@3` or `name@alias` -> (name, selector or None)."""
    name, _, selector = ref.partition("@")
    validate_name(name)
    if "@" in ref and not selector:
        raise KilnError(f'Got "{ref}". After "@" give a version number or an alias, e.g. {name}@1.')
    return name, selector or None


def parse_version_ref(ref: str) -> tuple[str, int]:
    """`name@3` -> (name, 3). Destructive commands take a number, never an alias that moves."""
    name, selector = parse_model_ref(ref)
    if selector is None or not selector.isdigit():
        raise KilnError(f'Got "{ref}". Name one version by number, e.g. {name}@3.')
    return name, int(selector)


class Catalog:
    """Typed access to the catalog's SQLite file."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self._db = sqlite3.connect(str(path), isolation_level=None, timeout=60.0)
        self._depth = 0
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # Each statement on its own: on an existing catalog they are no-ops that take no write
        # lock, so opening the file never waits behind a registration in progress.
        for statement in SCHEMA.split(";"):
            if statement.strip():
                self._db.execute(statement)
        if self._missing_columns():
            with self.transaction():
                for column in self._missing_columns():
                    decl = VERSION_COLUMNS_ADDED[column]
                    self._db.execute(f"ALTER TABLE versions ADD COLUMN {column} {decl}")
        self._db.execute(
            "CREATE UNIQUE INDEX IF NOT EXISTS versions_request_id ON versions(request_id) "
            "WHERE request_id IS NOT NULL"
        )

    def _missing_columns(self) -> list[str]:
        present = {row[1] for row in self._db.execute("PRAGMA table_info(versions)")}
        return [c for c in VERSION_COLUMNS_ADDED if c not in present]

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; nested calls join the outer one (so steps compose)."""
        if self._depth:
            self._depth += 1
            try:
                yield self._db
            finally:
                self._depth -= 1
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        finally:
            self._depth = 0

    # ------------------------------------------------------------------ audit

    def add_audit(
        self, actor: str, action: str, target: str, detail: dict[str, Any] | None = None
    ) -> None:
        self._db.execute(
            "INSERT INTO audit(at, key_id, action, target, detail) VALUES (?, ?, ?, ?, ?)",
            (time.time(), actor, action, target, json.dumps(detail or {}, default=str)),
        )

    def list_audit(self, limit: int = 100, action: str | None = None) -> list[dict[str, Any]]:
        """The newest `limit` entries, oldest first."""
        where, args = ("WHERE action = ?", [action]) if action else ("", [])
        rows = self._db.execute(
            f"SELECT id, at, key_id, action, target, detail FROM audit {where} "
            "ORDER BY id DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [
            {
                "id": i,
                "at": at,
                "key_id": key_id,
                "action": act,
                "target": target,
                "detail": json.loads(detail),
            }
            for i, at, key_id, act, target, detail in reversed(rows)
        ]

    # ------------------------------------------------------------------ version writes

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

    def insert_version(self, record: VersionRecord, request_id: str | None = None) -> None:
        self._db.execute(
            "INSERT INTO versions(name, version, created_at, creator, spec, metrics, lineage, "
            "artifacts, status, creator_key, request_id, stored_artifacts) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.name,
                record.version,
                record.created_at,
                record.creator,
                json.dumps(record.spec),
                json.dumps(record.metrics),
                json.dumps(record.lineage),
                json.dumps(record.artifacts),
                record.status,
                record.creator_key,
                request_id,
                json.dumps(record.stored_artifacts),
            ),
        )

    def find_request(self, request_id: str) -> VersionRecord | None:
        """The version an earlier attempt of the same registration committed, if any."""
        row = self._db.execute(f"{VERSION_SELECT} WHERE request_id = ?", (request_id,)).fetchone()
        return self._record(row) if row else None

    def set_alias(
        self, name: str, alias: str, version: int, actor: str = LOCAL_ACTOR
    ) -> int | None:
        """Point `alias` at `version` atomically; returns the version it pointed at before."""
        validate_alias(alias)
        with self.transaction():
            record = self.get_version(name, version)
            if record.status == ARCHIVED:
                raise KilnError(
                    f"{record.ref} is archived. Unarchive it first: "
                    f"kiln models unarchive {record.ref}."
                )
            previous = self.aliases(name).get(alias)
            self._db.execute(
                "INSERT INTO aliases VALUES (?, ?, ?, ?) ON CONFLICT(name, alias) "
                "DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
                (name, alias, version, time.time()),
            )
            self.add_audit(
                actor, "alias", f"{name}@{alias}", {"version": version, "previous": previous}
            )
        return previous

    def log_policy(self, name: str) -> dict[str, Any] | None:
        """`name`'s prediction-log policy (serving/logmask.py LogPolicy.to_dict), if it has one."""
        row = self._db.execute("SELECT policy FROM log_policies WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_log_policy(
        self, name: str, policy: dict[str, Any] | None, actor: str = LOCAL_ACTOR
    ) -> dict[str, Any] | None:
        """Replace (None: remove) `name`'s log policy, audited as "log-policy"; returns the
        policy it had before."""
        with self.transaction():
            self.require_model(name)
            previous = self.log_policy(name)
            if policy is None:
                self._db.execute("DELETE FROM log_policies WHERE name = ?", (name,))
            else:
                self._db.execute(
                    "INSERT INTO log_policies VALUES (?, ?, ?) ON CONFLICT(name) "
                    "DO UPDATE SET policy = excluded.policy, updated_at = excluded.updated_at",
                    (name, json.dumps(policy), time.time()),
                )
            self.add_audit(actor, "log-policy", name, {"policy": policy, "previous": previous})
        return previous

    def remove_alias(self, name: str, alias: str, actor: str = LOCAL_ACTOR) -> int:
        """Drop an alias; returns the version it pointed at."""
        with self.transaction():
            version = self.aliases(name).get(alias)
            if version is None:
                raise NotFoundError(f"model {name} has no alias {alias}")
            self._db.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias))
            self.add_audit(actor, "unalias", f"{name}@{alias}", {"version": version})
        return version

    def delete_version(
        self, name: str, version: int, force: bool = False, actor: str = LOCAL_ACTOR
    ) -> list[str]:
        """Remove a version's row (its files are the caller's); returns the aliases dropped."""
        with self.transaction():
            self.get_version(name, version)
            aliases = self._aliases_blocking(name, version, "delete", force)
            self._db.execute("DELETE FROM aliases WHERE name = ? AND version = ?", (name, version))
            self._db.execute("DELETE FROM versions WHERE name = ? AND version = ?", (name, version))
            self.add_audit(
                actor, "delete", f"{name}@{version}", {"force": force, "aliases": aliases}
            )
        return aliases

    def set_status(
        self, name: str, version: int, status: str, force: bool = False, actor: str = LOCAL_ACTOR
    ) -> list[str]:
        """Archive or unarchive a version; archiving an alias target needs force (drops it)."""
        with self.transaction():
            self.get_version(name, version)
            aliases: list[str] = []
            if status == ARCHIVED:
                aliases = self._aliases_blocking(name, version, "archive", force)
                self._db.execute(
                    "DELETE FROM aliases WHERE name = ? AND version = ?", (name, version)
                )
            self._db.execute(
                "UPDATE versions SET status = ? WHERE name = ? AND version = ?",
                (status, name, version),
            )
            action = "archive" if status == ARCHIVED else "unarchive"
            self.add_audit(actor, action, f"{name}@{version}", {"aliases": aliases})
        return aliases

    def set_artifacts(
        self,
        name: str,
        version: int,
        artifacts: dict[str, str],
        stored_artifacts: dict[str, str] | None = None,
    ) -> None:
        """Inside a transaction: a version's file -> sha256 map, as `add_artifact` extends it."""
        self._db.execute(
            "UPDATE versions SET artifacts = ?, stored_artifacts = ? "
            "WHERE name = ? AND version = ?",
            (json.dumps(artifacts), json.dumps(stored_artifacts or {}), name, version),
        )

    def _aliases_blocking(self, name: str, version: int, verb: str, force: bool) -> list[str]:
        aliases = self.aliases_of(name, version)
        if aliases and not force:
            raise KilnError(
                f"{name}@{version} is the target of alias(es) {', '.join(aliases)}. "
                f"Move the alias first (kiln models alias {name} VERSION {aliases[0]}), "
                f"or {verb} with --force."
            )
        return aliases

    # ------------------------------------------------------------------ version reads

    def _record(self, row: tuple) -> VersionRecord:
        name, version, created_at, creator, spec, metrics, lineage, artifacts = row[:8]
        status, key, stored = row[8:]
        return VersionRecord(
            name,
            version,
            created_at,
            creator,
            json.loads(spec),
            json.loads(metrics),
            json.loads(lineage),
            json.loads(artifacts),
            status,
            key,
            json.loads(stored or "{}"),
        )

    def require_model(self, name: str) -> None:
        if self._db.execute("SELECT 1 FROM models WHERE name = ?", (name,)).fetchone() is None:
            raise NotFoundError(f"no model named {name} is registered")

    def get_version(self, name: str, version: int) -> VersionRecord:
        row = self._db.execute(
            f"{VERSION_SELECT} WHERE name = ? AND version = ?", (name, version)
        ).fetchone()
        if row is None:
            self.require_model(name)
            raise NotFoundError(f"model {name} has no version {version}")
        return self._record(row)

    def latest_version(self, name: str) -> VersionRecord:
        """The newest active version: archived ones no longer answer to a bare name."""
        row = self._db.execute(
            f"{VERSION_SELECT} WHERE name = ? AND status = ? ORDER BY version DESC LIMIT 1",
            (name, ACTIVE),
        ).fetchone()
        if row is None:
            self.require_model(name)
            raise NotFoundError(
                f"model {name} has no active version; name an archived one by number "
                f"(e.g. {name}@1) or register a new one"
            )
        return self._record(row)

    def resolve(self, ref: str) -> VersionRecord:
        """`name` (its production alias, else its latest active version), `name@3`, `name@alias`."""
        name, selector = parse_model_ref(ref)
        if selector is None:
            version = self.aliases(name).get(DEFAULT_ALIAS)
            return self.get_version(name, version) if version else self.latest_version(name)
        if selector.isdigit():
            return self.get_version(name, int(selector))
        version = self.aliases(name).get(selector)
        if version is None:
            self.require_model(name)
            raise NotFoundError(f"model {name} has no alias {selector}")
        return self.get_version(name, version)

    def aliases_of(self, name: str, version: int) -> list[str]:
        rows = self._db.execute(
            "SELECT alias FROM aliases WHERE name = ? AND version = ? ORDER BY alias",
            (name, version),
        )
        return [r[0] for r in rows]

    def aliases(self, name: str) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias", (name,)
        )
        return {alias: version for alias, version in rows}

    def list_versions(self, name: str) -> list[VersionRecord]:
        rows = self._db.execute(
            f"{VERSION_SELECT} WHERE name = ? ORDER BY version", (name,)
        ).fetchall()
        return [self._record(r) for r in rows]

    def version_numbers(self, name: str) -> set[int]:
        rows = self._db.execute("SELECT version FROM versions WHERE name = ?", (name,))
        return {r[0] for r in rows}

    def list_models(self) -> list[dict[str, Any]]:
        rows = self._db.execute(
            f"SELECT m.name, COUNT(v.version), SUM(v.status = '{ARCHIVED}'), "
            f"MAX(CASE WHEN v.status = '{ACTIVE}' THEN v.version END) "
            "FROM models m LEFT JOIN versions v ON v.name = m.name GROUP BY m.name ORDER BY m.name"
        ).fetchall()
        return [
            {
                "name": n,
                "num_versions": count,
                "num_archived": int(archived or 0),
                "latest_version": latest,
                "aliases": self.aliases(n),
            }
            for n, count, archived, latest in rows
            if count > 0
        ]

    # ------------------------------------------------------------------ latency profiles

    def put_profile(self, name: str, version: int, backend: str, profile: dict[str, Any]) -> None:
        """Store a version's latency profile for one backend, replacing an earlier one."""
        with self.transaction():
            self.get_version(name, version)
            self._db.execute(
                "INSERT INTO profiles VALUES (?, ?, ?, ?, ?) ON CONFLICT(name, version, backend) "
                "DO UPDATE SET profile = excluded.profile, measured_at = excluded.measured_at",
                (
                    name,
                    version,
                    backend,
                    json.dumps(profile),
                    float(profile.get("measured_at") or time.time()),
                ),
            )

    def list_profiles(self, name: str, version: int | None = None) -> list[dict[str, Any]]:
        """`{"name", "version", "backend", "profile", "measured_at"}` rows of a model (or of one
        of its versions), by version then backend. A deleted version's went with it (cascade)."""
        where, args = ("AND version = ?", [version]) if version is not None else ("", [])
        rows = self._db.execute(
            "SELECT name, version, backend, profile, measured_at FROM profiles "
            f"WHERE name = ? {where} ORDER BY version, backend",
            (name, *args),
        ).fetchall()
        return [
            {"name": n, "version": v, "backend": b, "profile": json.loads(p), "measured_at": at}
            for n, v, b, p, at in rows
        ]

    # ------------------------------------------------------------------ keys

    def insert_key(self, row: KeyRow) -> None:
        with self.transaction():
            self._db.execute(
                "INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.key_id,
                    row.hash,
                    row.salt,
                    row.kdf,
                    json.dumps(list(row.scopes)),
                    row.created_at,
                    row.created_by,
                    row.expires_at,
                    row.revoked_at,
                ),
            )
            self.add_audit(
                row.created_by,
                "key.create",
                row.key_id,
                {"scopes": list(row.scopes), "expires_at": row.expires_at},
            )

    def get_key(self, key_id: str) -> KeyRow | None:
        row = self._db.execute(
            "SELECT id, hash, salt, kdf, scopes, created_at, created_by, expires_at, revoked_at "
            "FROM keys WHERE id = ?",
            (key_id,),
        ).fetchone()
        if row is None:
            return None
        key_id, hash_, salt, kdf, scopes, created_at, created_by, expires_at, revoked_at = row
        return KeyRow(
            key_id,
            hash_,
            salt,
            kdf,
            tuple(json.loads(scopes)),
            created_at,
            created_by,
            expires_at,
            revoked_at,
        )

    def list_keys(self) -> list[KeyRow]:
        ids = [r[0] for r in self._db.execute("SELECT id FROM keys ORDER BY created_at, id")]
        return [row for row in map(self.get_key, ids) if row is not None]

    def record_key_uses(self, uses: dict[str, float]) -> None:
        """Key id -> the latest time a replica saw it used; an older report never wins.
        Reported in batches by the replicas (serving/auth.py), not audited: it is no change."""
        with self.transaction():
            self._db.executemany(
                "INSERT INTO key_uses VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET "
                "last_used_at = max(last_used_at, excluded.last_used_at)",
                [(key_id, float(at)) for key_id, at in uses.items()],
            )

    def key_last_uses(self) -> dict[str, float]:
        return dict(self._db.execute("SELECT id, last_used_at FROM key_uses").fetchall())

    def rotate_key(self, old_id: str, new: KeyRow, grace_s: float, actor: str) -> KeyRow:
        """Insert `new` (the old key's scopes) and end the old key at now + grace_s (or its own
        expiry, if sooner), in one transaction and one audit row."""
        with self.transaction():
            old = self.get_key(old_id)
            if old is None:
                raise NotFoundError(f"no API key with id {old_id}")
            if old.status(time.time()) != "active":
                raise KilnError(f"API key {old_id} is {old.status(time.time())}; rotate a live key")
            ends = time.time() + grace_s
            if old.expires_at is not None:
                ends = min(ends, old.expires_at)
            self._db.execute("UPDATE keys SET expires_at = ? WHERE id = ?", (ends, old_id))
            self._db.execute(
                "INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    new.key_id,
                    new.hash,
                    new.salt,
                    new.kdf,
                    json.dumps(list(new.scopes)),
                    new.created_at,
                    new.created_by,
                    new.expires_at,
                    None,
                ),
            )
            self.add_audit(
                actor, "key.rotate", old_id, {"new_id": new.key_id, "old_expires_at": ends}
            )
            rotated = self.get_key(old_id)
        assert rotated is not None
        return rotated

    def revoke_key(self, key_id: str, actor: str = LOCAL_ACTOR) -> KeyRow:
        """Mark a key revoked (idempotent: a second revoke keeps the first time)."""
        with self.transaction():
            row = self.get_key(key_id)
            if row is None:
                raise NotFoundError(f"no API key with id {key_id}")
            if row.revoked_at is None:
                self._db.execute(
                    "UPDATE keys SET revoked_at = ? WHERE id = ?", (time.time(), key_id)
                )
                self.add_audit(actor, "key.revoke", key_id)
            revoked = self.get_key(key_id)
        assert revoked is not None
        return revoked
