"""Lineage of a model version: the data, configuration and code that made it. No Ray here.

Every version carries the same lineage fields, so `kiln models show` and the client can answer
"what was this trained on, with which code, from which parent?" for any version. The dataset's
content hash is taken from its source, independent of how it was split or sharded: two versions
with equal hashes saw the same bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import subprocess
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from kiln.training.errors import KilnError

LINEAGE_FIELDS = (
    "dataset_uri",
    "dataset_sha256",
    "train_config",
    "code_version",
    "parent",
    "sweep_id",
    "trial_id",
)
PACKAGE = "kiln-maas"
CHUNK_BYTES = 8 * 1024 * 1024
GIT_TIMEOUT_S = 5.0

logger = logging.getLogger(__name__)


@functools.cache
def code_version() -> str:
    """`git:<commit>` (with `-dirty` for local changes) of this checkout, else the package."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = _git(root, "rev-parse", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
        return f"git:{commit}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"{PACKAGE}=={metadata.version(PACKAGE)}"
    except metadata.PackageNotFoundError:
        return "unknown"


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(root), *args],
        capture_output=True,
        text=True,
        timeout=GIT_TIMEOUT_S,
        check=True,
    )
    return done.stdout.strip()


def dataset_sha256(uri: str) -> str:
    """sha256 of a dataset's content: file bytes, a built-in table, or synthetic parameters."""
    from kiln.actors.sources import load_sklearn, parse_synthetic

    hasher = hashlib.sha256()
    if uri.startswith("synthetic:"):
        # The rows are a pure function of these parameters (and of the code version).
        hasher.update(json.dumps(asdict(parse_synthetic(uri)), sort_keys=True).encode())
    elif uri.startswith("sklearn:"):
        hash_table(load_sklearn(uri.split(":", 1)[1]), hasher)
    else:
        hash_files(uri, hasher)
    return hasher.hexdigest()


def hash_table(table: pa.Table, hasher: Any) -> None:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    hasher.update(sink.getvalue().to_pybytes())


def hash_files(uri: str, hasher: Any) -> None:
    """Each file's relative path and bytes, in path order, streamed in chunks."""
    filesystem, root = (
        pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
    )
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.File:
        paths = [info.path]
    else:
        selector = pafs.FileSelector(root, recursive=True)
        found = filesystem.get_file_info(selector)
        paths = sorted(i.path for i in found if i.type == pafs.FileType.File)
    for path in paths:
        hasher.update(path[len(info.path) :].encode() + b"\0")
        with filesystem.open_input_stream(path) as src:
            while chunk := src.read(CHUNK_BYTES):
                hasher.update(chunk)


def normalize_lineage(raw: dict[str, Any] | None) -> dict[str, Any]:
    """Every lineage field present (None when unknown), plus whatever else the caller added."""
    lineage: dict[str, Any] = {name: None for name in LINEAGE_FIELDS}
    lineage.update(raw or {})
    if lineage["dataset_uri"] is None and isinstance(lineage.get("dataset"), str):
        lineage["dataset_uri"] = lineage.pop("dataset")  # the slice's name for it
    if lineage["train_config"] is None:
        lineage["train_config"] = {}
    if lineage["code_version"] is None:
        lineage["code_version"] = code_version()
    for name in ("dataset_uri", "dataset_sha256", "code_version", "parent", "sweep_id", "trial_id"):
        if lineage[name] is not None and not isinstance(lineage[name], str):
            raise KilnError(f'Got "{lineage[name]!r}" for lineage {name}. Give a string or None.')
    if not isinstance(lineage["train_config"], dict):
        raise KilnError("lineage train_config must be a mapping of option -> value.")
    return lineage
