"""A model's versions side by side: test score, parameters, bytes, latency, lineage, Pareto.

A row holds what deciding between versions takes: the test score (accuracy, or R² for a
regressor), the parameters, the bytes stored, each backend's latency profile, where the version
came from (lineage parent and compression steps) and whether it is on the Pareto front of score
against batch-1 p50 latency (its fastest backend). Parameters are counted from the weights
file's safetensors header, without torch and without reading the tensors: the network body's
tensors (a language model's: all of them), where an int8 layer's weight counts as its int8
tensor and its scales and zero points are not parameters. A language model's score is its
held-out perplexity (lower is better) beside its generation tokens/s and stored bytes.
`kiln models compare`, the SLO choice of `kiln serve` and the console's variants page
(serving/console/) read the same rows; it lives in serving/ because the console runs in the
Serve replica. Catalog and storage reads only: no Ray.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from typing import Any

import pyarrow.fs as pafs

from kiln.actors.registry import ROBUSTNESS_BACKEND, version_dir
from kiln.serving.slo import pareto_front
from kiln.training.encryption import KEY_SUFFIX, decrypt_with_env_key, is_sealed

WEIGHTS_FILE = "model.safetensors"
"""As training/artifacts.py names it (imported from there, this module would import torch)."""
BODY_PREFIX = "body."
NOT_PARAMETERS = ("_scale", "_zero_point")
"""Suffixes of an int8 layer's quantisation tensors (training/compress.py)."""

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- rows


def compare_rows(
    versions: list[dict[str, Any]], profiles: list[dict[str, Any]], storage_uri: str
) -> list[dict[str, Any]]:
    """One row per active version (`versions` as `Kiln.versions` gives them; `profiles` as
    `Registry.profiles`), its files read from `storage_uri`."""
    fs, root = filesystem(storage_uri)
    by_version: dict[int, dict[str, dict[str, Any]]] = {}
    for row in profiles:
        by_version.setdefault(int(row["version"]), {})[row["backend"]] = row["profile"]
    rows = [
        version_row(v, by_version.get(int(v["version"]), {}), fs, root)
        for v in versions
        if v.get("status", "active") == "active"
    ]
    mark_pareto(rows)
    return rows


def version_row(
    version: dict[str, Any],
    profiles: dict[str, dict[str, Any]],
    fs: pafs.FileSystem,
    root: str,
) -> dict[str, Any]:
    name, number = version["name"], int(version["version"])
    folder = f"{root}/{version_dir(name, number)}"
    robustness = profiles.get(ROBUSTNESS_BACKEND, {}).get("reports", {})
    profiles = {b: p for b, p in profiles.items() if b != ROBUSTNESS_BACKEND}
    metric = score_metric(version["spec"])
    fastest = min(profiles, key=lambda b: profiles[b]["b1_p50_ms"], default=None)
    return {
        "ref": f"{name}@{number}",
        "version": number,
        "aliases": version.get("aliases", []),
        "metric": metric,
        "score": version["metrics"].get(metric),
        "parameters": count_parameters(fs, f"{folder}/{WEIGHTS_FILE}"),
        "artifact_bytes": artifact_bytes(fs, folder, list(version["artifacts"])),
        "profiles": {b: latency_summary(p) for b, p in sorted(profiles.items())},
        "b1_p50_ms": profiles[fastest]["b1_p50_ms"] if fastest else None,
        "fastest_backend": fastest,
        "parent": version["lineage"].get("parent"),
        "compression": compression_label(version["lineage"].get("compression")),
        "pareto": None,
        "tokens_per_s": version["metrics"].get("generate_tokens_per_s"),
        "robustness": robustness_summary(robustness),
    }


def robustness_summary(reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """A version's `kiln evaluate --attack` reports, weakest attack first."""
    keep = ("attack", "epsilon", "steps", "clean_accuracy", "attacked_accuracy", "rows")
    rows = [{k: r.get(k) for k in keep} for r in reports.values()]
    return sorted(rows, key=lambda r: (r["attack"], r["epsilon"]))


def score_metric(spec: dict[str, Any]) -> str:
    """The score a version is compared by: test accuracy, R², or a language model's held-out
    perplexity (lower is better)."""
    if spec.get("kind") == "lm":
        return "perplexity"
    return "accuracy" if spec.get("task") == "classification" else "r2"


def latency_summary(profile: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "b1_p50_ms",
        "b1_p99_ms",
        "b64_p50_ms",
        "b64_p99_ms",
        "rows_per_s_b64",
        "threads",
        "cpu_model",
        "measured_at",
    )
    return {k: profile.get(k) for k in keep}


def compression_label(steps: Any) -> str | None:
    """`lineage.compression` (a list of steps, each with its method) as `distill+prune`."""
    if not steps:
        return None
    if isinstance(steps, dict):
        steps = [steps]
    if isinstance(steps, list):
        return "+".join(str(s.get("method", "?")) if isinstance(s, dict) else str(s) for s in steps)
    return str(steps)


def mark_pareto(rows: list[dict[str, Any]]) -> None:
    """`pareto` True/False for the rows with a score and a profile; None for the others."""
    measured = [r for r in rows if r["score"] is not None and r["b1_p50_ms"] is not None]
    front = pareto_front([(float(r["score"]), float(r["b1_p50_ms"])) for r in measured])
    for row, on_front in zip(measured, front, strict=True):
        row["pareto"] = on_front


# ----------------------------------------------------------------------------- storage reads


def filesystem(storage_uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and root path of the artifact storage (as ArtifactStore opens it)."""
    if "://" in storage_uri:
        fs, root = pafs.FileSystem.from_uri(storage_uri)
    else:
        fs, root = pafs.LocalFileSystem(), storage_uri
    return fs, root.rstrip("/")


def artifact_bytes(fs: pafs.FileSystem, folder: str, filenames: list[str]) -> int | None:
    """Sum of the stored files' sizes; None when one is missing."""
    infos = fs.get_file_info([f"{folder}/{f}" for f in filenames])
    if any(info.type != pafs.FileType.File for info in infos):
        return None
    return int(sum(info.size for info in infos))


def count_parameters(fs: pafs.FileSystem, path: str) -> int | None:
    """Parameters of the network body, from the safetensors header alone; None if unreadable."""
    try:
        header = safetensors_header(fs, path)
    except (OSError, ValueError) as exc:
        logger.warning("could not read the header of %s: %s", path, exc)
        return None
    return parameters_in(header)


def safetensors_header(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    """The JSON header of a safetensors file: an 8-byte little-endian length, then the JSON."""
    with fs.open_input_file(path) as source:
        first = source.read(8)
        if is_sealed(first):  # an encrypted store: the header is inside the ciphertext
            with fs.open_input_file(path + KEY_SUFFIX) as key_file:
                plain = decrypt_with_env_key(path, first + source.read(), key_file.read())
            (length,) = struct.unpack("<Q", plain[:8])
            return dict(json.loads(plain[8 : 8 + length]))
        (length,) = struct.unpack("<Q", first)
        if length > 100_000_000:
            raise ValueError(f"a header of {length} bytes is not a safetensors header")
        return dict(json.loads(source.read(length)))


def parameters_in(header: dict[str, Any]) -> int:
    """Elements of the body's tensors, quantisation scales and zero points left out. A
    language model's weights carry Hugging Face names (`model.layers.0...`, no `body.`):
    all of its tensors count, its int8 layers' `weight_scale` left out."""
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    body = any(name.startswith(BODY_PREFIX) for name in tensors)
    return sum(
        math.prod(entry["shape"])
        for name, entry in tensors.items()
        if (name.startswith(BODY_PREFIX) or not body) and not name.endswith(NOT_PARAMETERS)
    )
