"""The Registry: single writer of the SQLite catalog and of the artifact files.

`RegistryService` is every registry operation as plain Python; the `Registry` Ray actor is that
class made remote, so version numbers are allocated in one place on a cluster, and the local CLI
can run the very same code in-process on an embedded setup. Readers (serving replicas, the CLI)
resolve a model reference, then read the artifact files straight from storage and verify their
sha256 against the catalog before parsing them.

A registration is crash-consistent: the version's files are written under `models/NAME/vN/`
while the catalog's write transaction that allocated N is open, and the row is inserted and
committed only after the last byte is written. A writer killed midway leaves no row (SQLite
rolls back) and at most a partial folder that no row points at; that folder is removed before
N is handed out again, and on every start of the actor.
"""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
import json
import logging
import re
import sqlite3
import time
from typing import Any

import ray

from kiln.actors.catalog import (
    ACTIVE,
    ARCHIVED,
    LOCAL_ACTOR,
    Catalog,
    KeyRow,
    VersionRecord,
    validate_name,
)
from kiln.actors.keys import (
    ADMIN,
    KDF,
    KeyCheck,
    key_id_of,
    new_key,
    parse_scopes,
    secret_matches,
    with_last_use,
)
from kiln.actors.lineage import normalize_lineage
from kiln.actors.startup import wait_started
from kiln.actors.storage import ArtifactStore
from kiln.training.errors import KilnError, NotFoundError

REGISTRY_NAME = "kiln-registry"
NAMESPACE = "kiln"
FILENAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

logger = logging.getLogger(__name__)


ROBUSTNESS_BACKEND = "robustness"
"""The profiles row that holds a version's robustness reports, not a serving backend."""


def version_dir(name: str, version: int) -> str:
    return f"models/{name}/v{version}"


def artifact_path(name: str, version: int, filename: str) -> str:
    return f"{version_dir(name, version)}/{filename}"


def check_artifacts(files: dict[str, bytes], spec: dict[str, Any]) -> None:
    """Refuse, before anything is stored, files that Kiln could not load without pickle."""
    # Imported here: torch is heavy, and catalog-only commands (kiln models list) skip it.
    from kiln.training.artifacts import SPEC_FILE, WEIGHTS_FILE, model_from_files

    for filename, data in files.items():
        check_added_file(filename, data)
    missing = [f for f in (SPEC_FILE, WEIGHTS_FILE) if f not in files]
    if missing:
        raise KilnError(f"a model version needs {SPEC_FILE} and {WEIGHTS_FILE}; missing {missing}")
    _, stored_spec = model_from_files(files)  # parses JSON and safetensors, never unpickles
    if stored_spec != json.loads(json.dumps(spec)):
        raise KilnError(f"the spec given to register differs from the {SPEC_FILE} artifact")


def check_added_file(filename: str, data: bytes) -> None:
    """A file name Kiln can store, and for an ONNX file, bytes that parse as an ONNX model
    (protobuf: parsing runs no code)."""
    if not FILENAME_PATTERN.match(filename):
        raise KilnError(
            f'Got "{filename}" for an artifact file name. Use letters, digits, ".", "_" '
            'and "-", starting with a letter or digit.'
        )
    if filename.endswith(".onnx"):
        import onnx

        try:
            onnx.checker.check_model(onnx.load_model_from_string(data))
        except Exception as exc:  # protobuf's DecodeError, onnx's ValidationError
            raise KilnError(f"{filename} is not a valid ONNX model: {exc}") from exc


class RegistryService:
    """Every registry operation on one catalog file and one artifact store."""

    def __init__(self, db_path: str, storage_uri: str, recover: bool = True) -> None:
        self._catalog = Catalog(db_path)
        self._store = ArtifactStore(storage_uri)
        self.storage_uri = storage_uri
        self.db_path = str(db_path)
        if recover:
            self.remove_orphans()

    def close(self) -> None:
        self._catalog.close()

    def prepare_checks(self) -> None:
        """Import what `register` checks artifacts with (torch: about 3 s) ahead of time.

        A training run calls this as it starts, so the import overlaps loading the data rather
        than delaying the first registration; catalog-only commands never pay it.
        """
        import kiln.training.artifacts  # noqa: F401

    # ------------------------------------------------------------------ identity

    def _admin(self, key: str | None) -> str:
        """The audit identity of a change: "local" without a key; a key must hold admin."""
        if key is None:
            return LOCAL_ACTOR
        check = self.verify_key(key)
        if not check.ok:
            raise KilnError(f"the API key given is {check.reason}; use a valid admin key")
        if ADMIN not in check.scopes:
            raise KilnError(
                f"API key {check.key_id} lacks the admin scope this change needs "
                f"(it has {', '.join(check.scopes)})"
            )
        return str(check.key_id)

    # ------------------------------------------------------------------ versions

    def register(
        self,
        name: str,
        files: dict[str, bytes],
        spec: dict[str, Any],
        metrics: dict[str, Any],
        lineage: dict[str, Any],
        creator: str | None = None,
        key: str | None = None,
        request_id: str | None = None,
    ) -> VersionRecord:
        """Store a new version; a retry with the same `request_id` returns the first result."""
        actor = self._admin(key)
        validate_name(name)
        check_artifacts(files, spec)
        lineage = self._resolve_parent(normalize_lineage(lineage))
        with self._catalog.transaction():
            if request_id and (done := self._catalog.find_request(request_id)) is not None:
                return done
            version = self._catalog.allocate_version(name)
            folder = version_dir(name, version)
            # N was never committed: whatever is there was left by a writer killed midway.
            if self._store.delete_dir(folder):
                logger.warning("removed the leftovers of an interrupted registration in %s", folder)
            stored = {f: self._store.write(f"{folder}/{f}", data) for f, data in files.items()}
            plain = {f: hashlib.sha256(d).hexdigest() for f, d in files.items()}
            record = VersionRecord(
                name=name,
                version=version,
                created_at=time.time(),
                creator=creator or getpass.getuser(),
                spec=spec,
                metrics=metrics,
                lineage=lineage,
                artifacts=plain,
                creator_key=actor,
                stored_artifacts={f: d for f, d in stored.items() if d != plain[f]},
            )
            self._catalog.insert_version(record, request_id)
            self._catalog.add_audit(
                actor,
                "register",
                record.ref,
                {"artifacts": sorted(files), "request_id": request_id},
            )
        logger.info("registered %s", record.ref)
        return record

    def add_artifact(
        self,
        name: str,
        version: int,
        filename: str,
        data: bytes,
        detail: dict[str, Any] | None = None,
        key: str | None = None,
    ) -> VersionRecord:
        """Add a new file (an export) to an existing version; audited as "export".

        A version's existing files never change, so a name it already has is refused. The
        bytes are written while the catalog's write transaction is open and the version's
        checksums are updated in that transaction: a writer killed midway leaves the version
        as it was, plus at most a file no checksum names, which is never read and which a retry
        writes over.
        """
        actor = self._admin(key)
        validate_name(name)
        check_added_file(filename, data)
        with self._catalog.transaction():
            record = self._catalog.get_version(name, int(version))
            if filename in record.artifacts:
                raise KilnError(
                    f"{record.ref} already has {filename} (sha256 "
                    f"{record.artifacts[filename]}); a version's existing files never change"
                )
            digest = hashlib.sha256(data).hexdigest()
            stored = self._store.write(artifact_path(name, record.version, filename), data)
            artifacts = {**record.artifacts, filename: digest}
            stored_artifacts = dict(record.stored_artifacts)
            if stored != digest:
                stored_artifacts[filename] = stored
            self._catalog.set_artifacts(name, record.version, artifacts, stored_artifacts)
            self._catalog.add_audit(
                actor,
                "export",
                record.ref,
                {**(detail or {}), "file": filename, "sha256": digest, "bytes": len(data)},
            )
        logger.info("added %s to %s", filename, record.ref)
        return dataclasses.replace(record, artifacts=artifacts, stored_artifacts=stored_artifacts)

    def _resolve_parent(self, lineage: dict[str, Any]) -> dict[str, Any]:
        """A parent given as name, name@alias or name@N is stored as the exact name@N."""
        if lineage.get("parent"):
            lineage["parent"] = self._catalog.resolve(lineage["parent"]).ref
        return lineage

    def resolve(self, ref: str) -> VersionRecord:
        return self._catalog.resolve(ref)

    def list_models(self) -> list[dict[str, Any]]:
        return self._catalog.list_models()

    def aliases(self, name: str) -> dict[str, int]:
        return self._catalog.aliases(name)

    def list_versions(self, name: str) -> list[VersionRecord]:
        validate_name(name)
        self._catalog.require_model(name)
        return self._catalog.list_versions(name)

    def set_alias(
        self, name: str, alias: str, version: int, key: str | None = None
    ) -> dict[str, Any]:
        previous = self._catalog.set_alias(name, alias, version, self._admin(key))
        return {"name": name, "alias": alias, "version": version, "previous": previous}

    def remove_alias(self, name: str, alias: str, key: str | None = None) -> dict[str, Any]:
        version = self._catalog.remove_alias(name, alias, self._admin(key))
        return {"name": name, "alias": alias, "version": version}

    def log_policy(self, name: str) -> dict[str, Any] | None:
        """`kiln models log-policy NAME`: what the prediction log masks and drops of NAME."""
        validate_name(name)
        self._catalog.require_model(name)
        return self._catalog.log_policy(name)

    def log_policies(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """The policies of those of `names` that have one (a replica, at every reconfigure)."""
        found = {name: self._catalog.log_policy(name) for name in names}
        return {name: policy for name, policy in found.items() if policy is not None}

    def set_log_policy(
        self,
        name: str,
        mask: list[str] | None = None,
        drop: list[str] | None = None,
        mask_text: bool = False,
        key: str | None = None,
    ) -> dict[str, Any]:
        """Replace NAME's prediction-log policy (an empty one removes it); admin only, as every
        change to a model, and audited. Every field must be an input of one of NAME's active
        versions; a field both masked and dropped is refused."""
        from kiln.serving.logmask import LogPolicy, check_fields, input_fields

        actor = self._admin(key)
        validate_name(name)
        self._catalog.require_model(name)
        policy = LogPolicy(frozenset(mask or ()), frozenset(drop or ()), bool(mask_text))
        both = policy.mask & policy.drop
        if both:
            raise KilnError(
                f"{', '.join(sorted(both))}: give a field to --mask or --drop, not both"
            )
        versions = [v for v in self._catalog.list_versions(name) if v.status == ACTIVE]
        known = {v.ref: input_fields(v.spec) for v in versions}
        check_fields(sorted(policy.mask), known, "--mask")
        check_fields(sorted(policy.drop), known, "--drop")
        stored = policy.to_dict() if policy.active else None
        previous = self._catalog.set_log_policy(name, stored, actor)
        return {"name": name, "log_policy": stored, "previous": previous}

    def delete_version(
        self, name: str, version: int, force: bool = False, key: str | None = None
    ) -> dict[str, Any]:
        """Drop the row, then the files: a crash in between leaves only an orphan folder."""
        aliases = self._catalog.delete_version(name, version, force, self._admin(key))
        self._store.delete_dir(version_dir(name, version))
        return {"ref": f"{name}@{version}", "deleted": True, "aliases_removed": aliases}

    def archive_version(
        self, name: str, version: int, force: bool = False, key: str | None = None
    ) -> dict[str, Any]:
        aliases = self._catalog.set_status(name, version, ARCHIVED, force, self._admin(key))
        return {"ref": f"{name}@{version}", "status": ARCHIVED, "aliases_removed": aliases}

    def unarchive_version(self, name: str, version: int, key: str | None = None) -> dict[str, Any]:
        self._catalog.set_status(name, version, ACTIVE, actor=self._admin(key))
        return {"ref": f"{name}@{version}", "status": ACTIVE, "aliases_removed": []}

    def record_profile(
        self,
        name: str,
        version: int,
        backend: str,
        profile: dict[str, Any],
        key: str | None = None,
    ) -> dict[str, Any]:
        """Store a version's latency profile for `backend` (replacing an earlier one)."""
        self._admin(key)
        self._catalog.put_profile(name, int(version), backend, profile)
        return {"ref": f"{name}@{version}", "backend": backend, "profile": profile}

    def record_robustness(
        self, name: str, version: int, report: dict[str, Any], key: str | None = None
    ) -> dict[str, Any]:
        """Store a robustness report (`kiln evaluate --attack`) with the version: kept beside
        its latency profiles as the ROBUSTNESS_BACKEND row, one report per attack and epsilon
        (a new measurement of the same pair replaces the old)."""
        self._admin(key)
        version = int(version)
        found = self._catalog.list_profiles(name, version)
        reports: dict[str, Any] = next(
            (p["profile"].get("reports", {}) for p in found if p["backend"] == ROBUSTNESS_BACKEND),
            {},
        )
        reports[f"{report['attack']}@{report['epsilon']:g}"] = report
        profile = {"reports": reports, "measured_at": time.time()}
        self._catalog.put_profile(name, version, ROBUSTNESS_BACKEND, profile)
        return {"ref": f"{name}@{version}", "reports": reports}

    def profiles(self, name: str, version: int | None = None) -> list[dict[str, Any]]:
        """The latency profiles of a model's versions (or of one version), one per backend."""
        validate_name(name)
        self._catalog.require_model(name)
        return self._catalog.list_profiles(name, version)

    def remove_orphans(self) -> list[str]:
        """Delete version folders that no catalog row points at; returns their paths.

        Runs under the catalog's write lock, so no registration (in this or another process)
        can be between writing its files and committing its row.
        """
        removed: list[str] = []
        try:
            with self._catalog.transaction():
                for name in self._store.list_dirs("models"):
                    known = self._catalog.version_numbers(name)
                    for folder in self._store.list_dirs(f"models/{name}"):
                        number = folder[1:]
                        if folder.startswith("v") and number.isdigit() and int(number) not in known:
                            self._store.delete_dir(f"models/{name}/{folder}")
                            removed.append(f"models/{name}/{folder}")
        except sqlite3.OperationalError as exc:  # another writer held the lock too long
            logger.warning("skipped the orphan sweep: %s", exc)
        if removed:
            logger.warning("removed %d orphan version folder(s): %s", len(removed), removed)
        return removed

    # ------------------------------------------------------------------ keys and audit

    def create_key(
        self, scopes: list[str], expires_in_s: float | None = None, key: str | None = None
    ) -> dict[str, Any]:
        """A new key; the returned secret exists nowhere else (only its hash is stored)."""
        actor = self._admin(key)
        parsed = parse_scopes(scopes)
        if expires_in_s is not None and expires_in_s <= 0:
            raise KilnError(f'Got "{expires_in_s}" for the key lifetime. Use a positive duration.')
        made = new_key()
        now = time.time()
        row = KeyRow(
            key_id=made.key_id,
            hash=made.hash,
            salt=made.salt,
            kdf=KDF,
            scopes=tuple(parsed),
            created_at=now,
            created_by=actor,
            expires_at=now + expires_in_s if expires_in_s is not None else None,
            revoked_at=None,
        )
        self._catalog.insert_key(row)
        return {
            "id": made.key_id,
            "secret": made.secret,
            "scopes": parsed,
            "expires_at": row.expires_at,
        }

    def verify_key(self, secret: str) -> KeyCheck:
        """Whether `secret` is a live key, and its scopes. Never raises for a bad secret."""
        key_id = key_id_of(secret)
        if key_id is None:
            return KeyCheck(ok=False, reason="malformed")
        row = self._catalog.get_key(key_id)
        # Key ids are public (listed, audited): saying one is unknown leaks nothing, and
        # skipping scrypt for it keeps junk tokens from tying up the single registry actor.
        if row is None:
            return KeyCheck(ok=False, reason="unknown", key_id=key_id)
        if row.kdf != KDF or not secret_matches(secret, row.salt, row.hash):
            return KeyCheck(ok=False, reason="invalid", key_id=key_id)
        status = row.status(time.time())
        return KeyCheck(
            ok=status == "active",
            reason="ok" if status == "active" else status,
            key_id=key_id,
            scopes=row.scopes,
            expires_at=row.expires_at,
        )

    def list_keys(self, key: str | None = None) -> list[dict[str, Any]]:
        self._admin(key)
        now = time.time()
        last_uses = self._catalog.key_last_uses()
        return [
            with_last_use(row.public(now), last_uses.get(row.key_id), now)
            for row in self._catalog.list_keys()
        ]

    def revoke_key(self, key_id: str, key: str | None = None) -> dict[str, Any]:
        return self._catalog.revoke_key(key_id, self._admin(key)).public(time.time())

    def rotate_key(
        self, key_id: str, grace_s: float = 3600.0, key: str | None = None
    ) -> dict[str, Any]:
        """A new secret with `key_id`'s scopes and expiry; the old secret stays valid for
        `grace_s` (0: ends now), so callers can switch without a gap."""
        actor = self._admin(key)
        if grace_s < 0:
            raise KilnError(f'Got "{grace_s}" for --grace. Use 0 or a duration such as 1h.')
        old = self._catalog.get_key(key_id)
        if old is None:
            raise NotFoundError(f"no API key with id {key_id}")
        made = new_key()
        row = KeyRow(
            key_id=made.key_id,
            hash=made.hash,
            salt=made.salt,
            kdf=KDF,
            scopes=old.scopes,
            created_at=time.time(),
            created_by=actor,
            expires_at=old.expires_at,
            revoked_at=None,
        )
        ended = self._catalog.rotate_key(key_id, row, grace_s, actor)
        return {
            "id": made.key_id,
            "secret": made.secret,
            "scopes": list(row.scopes),
            "expires_at": row.expires_at,
            "replaces": key_id,
            "old_expires_at": ended.expires_at,
        }

    def record_key_uses(self, uses: dict[str, float]) -> None:
        """Last-use times reported by the replicas' key caches, a batch at a time."""
        if uses:
            self._catalog.record_key_uses(uses)

    def audit(
        self, limit: int = 100, action: str | None = None, key: str | None = None
    ) -> list[dict[str, Any]]:
        self._admin(key)
        return self._catalog.list_audit(limit, action)

    def record_event(
        self, action: str, target: str, detail: dict[str, Any] | None = None, key: str | None = None
    ) -> None:
        """An admin action that happens outside the catalog (e.g. deploy), for the audit."""
        actor = self._admin(key)
        with self._catalog.transaction():
            self._catalog.add_audit(actor, action, target, detail)

    # ------------------------------------------------------------------ where things live

    def get_storage_uri(self) -> str:
        return self.storage_uri

    def get_db_path(self) -> str:
        return self.db_path


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class Registry(RegistryService):
    """The registry as one Ray actor: one method at a time, so one writer per cluster."""


def start_registry(db_path: str, storage_uri: str, detached: bool = False) -> Any:
    """The named Registry actor, created on the head node if it does not exist yet."""
    options: dict[str, Any] = {
        "name": REGISTRY_NAME,
        "namespace": NAMESPACE,
        "get_if_exists": True,
        # The SQLite file lives on the head node's disk: keep its only writer there.
        "resources": {"node:__internal_head__": 0.001},
    }
    if detached:
        options["lifetime"] = "detached"
    try:
        return ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
    except ValueError:
        pass  # none yet: created here, and its first start is waited for
    registry = Registry.options(**options).remote(db_path, storage_uri)  # type: ignore[attr-defined]
    # A registry that cannot start (its class does not import on the worker, the database
    # cannot be opened) ends the command with one line, not retried calls forever.
    wait_started([registry], "get_db_path")
    return registry


def read_verified_files(storage_uri: str, record: VersionRecord) -> dict[str, bytes]:
    """Every artifact of a version, each checked against its catalog sha256: the bytes on
    storage first (the ciphertext, on an encrypted store), then the plaintext."""
    from kiln.training.artifacts import verify_files

    store = ArtifactStore(storage_uri)
    files = {}
    for name in record.artifacts:
        path = artifact_path(record.name, record.version, name)
        expected = record.stored_artifacts.get(name)
        files[name] = store.read_checked(path, expected_sha256=expected)[0]
    verify_files(files, record.artifacts)
    return files
