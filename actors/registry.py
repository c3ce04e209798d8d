"""The Registry actor: single writer of the SQLite catalog and of the artifact files.

Registrations go through this one actor so version numbers are allocated in one place. Readers
(serving replicas, the CLI) ask it to resolve a model reference, then read the artifact files
straight from storage and verify their sha256 against the catalog before parsing them.
"""

from __future__ import annotations

import getpass
import logging
import time
from typing import Any

import ray

from actors.catalog import Catalog, VersionRecord
from actors.storage import ArtifactStore
from training.artifacts import sha256_hex, verify_files

REGISTRY_NAME = "kiln-registry"
NAMESPACE = "kiln"

logger = logging.getLogger(__name__)


def artifact_path(name: str, version: int, filename: str) -> str:
    return f"models/{name}/v{version}/{filename}"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class Registry:
    """Owns the catalog file; every method is one catalog operation."""

    def __init__(self, db_path: str, storage_uri: str) -> None:
        self._catalog = Catalog(db_path)
        self._store = ArtifactStore(storage_uri)
        self.storage_uri = storage_uri

    def register(
        self,
        name: str,
        files: dict[str, bytes],
        spec: dict[str, Any],
        metrics: dict[str, Any],
        lineage: dict[str, Any],
        creator: str | None = None,
    ) -> VersionRecord:
        with self._catalog.transaction():
            version = self._catalog.allocate_version(name)
            for filename, data in files.items():
                self._store.write(artifact_path(name, version, filename), data)
            record = VersionRecord(
                name=name,
                version=version,
                created_at=time.time(),
                creator=creator or getpass.getuser(),
                spec=spec,
                metrics=metrics,
                lineage=lineage,
                artifacts={f: sha256_hex(d) for f, d in files.items()},
            )
            self._catalog.insert_version(record)
        logger.info("registered %s", record.ref)
        return record

    def resolve(self, ref: str) -> VersionRecord:
        return self._catalog.resolve(ref)

    def list_models(self) -> list[dict[str, Any]]:
        return self._catalog.list_models()

    def list_versions(self, name: str) -> list[VersionRecord]:
        return self._catalog.list_versions(name)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self._catalog.set_alias(name, alias, version)

    def delete_version(self, name: str, version: int, force: bool = False) -> None:
        self._catalog.delete_version(name, version, force)

    def get_storage_uri(self) -> str:
        return self.storage_uri


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
    return Registry.options(**options).remote(db_path, storage_uri)  # type: ignore[attr-defined]


def read_verified_files(storage_uri: str, record: VersionRecord) -> dict[str, bytes]:
    """Every artifact of a version, each checked against its catalog sha256."""
    store = ArtifactStore(storage_uri)
    files = {f: store.read(artifact_path(record.name, record.version, f)) for f in record.artifacts}
    verify_files(files, record.artifacts)
    return files
