"""`kiln export`: a registered version as ONNX, checked against torch on its test rows, stored.

Reads as its steps: resolve the version and check the request against it (before any data
loads), rebuild the torch model from its verified artifacts, export it, bring the version's
dataset back from its lineage (the same source, split seed and fractions: the test rows its
metrics came from), quantise the export to int8 when asked, run ONNX Runtime against torch on
those rows, store the file only when it meets its bar (training/export.py), then measure the
ONNX Runtime latency profile of the version that holds it (cluster/profiling.py), as every
registration measures its torch one.

- fp32: model.onnx joins the version's own artifacts (`RegistryService.add_artifact`): the
  version's answers do not change, only what can run it.
- int8: the int8 model answers differently (its accuracy is its own), so it becomes a new
  version of the same model: the parent's spec.json (plus `"onnx_quantized": "int8"`) and
  model.safetensors, the int8 model.onnx, its own test metrics computed by ONNX Runtime, and
  lineage `parent` and `compression` as `kiln compress` records them. Only ONNX Runtime serves
  it (`kiln serve --backend onnxruntime|auto`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from kiln.actors.catalog import VersionRecord
from kiln.runtime import unwrapped_errors
from kiln.settings import Settings
from kiln.training.data import encode_labels
from kiln.training.errors import KilnError
from kiln.training.export import (
    ONNX_FILE,
    ONNX_INT8,
    ONNX_INT8_METHOD,
    ONNXRUNTIME,
    check_onnx,
    int8_export,
    onnx_bytes,
    onnx_metrics,
    onnxruntime_version,
)
from kiln.training.tabular import Encoding

FORMATS = ("onnx",)
QUANTIZE_CHOICES = (ONNX_INT8,)

logger = logging.getLogger(__name__)

StepFn = Callable[[str], None]


@dataclass(kw_only=True)
class ExportRequest:
    """One `kiln export`; every field is the option of the same name."""

    ref: str
    format: str = "onnx"
    quantize: str | None = None
    data: str | None = None
    """Where the check's rows come from (default: the dataset in the version's lineage)."""
    key: str | None = None
    """An admin API key to act as (the fp32 export is an audited change to a version)."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise KilnError(f'Got "{self.format}" for --format. Kiln exports onnx.')
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise KilnError(f'Got "{self.quantize}" for --quantize. Choose one of: int8.')

    def check_against(self, record: VersionRecord) -> None:
        """What the version rules out, said before the model or any data loads."""
        spec, ref = record.spec, record.ref
        parent = record.lineage.get("parent") or "its parent"
        if spec.get("onnx_quantized"):
            raise KilnError(
                f"{ref} is already an ONNX {spec['onnx_quantized']} export (its model.onnx "
                f"sha256 {record.artifacts.get(ONNX_FILE, '?')}); export {parent} instead"
            )
        if spec.get("quantization"):
            raise KilnError(
                f"{ref} is a torch int8 variant (kiln compress --quantize int8), which ONNX "
                f"cannot express; export {parent} instead, with --quantize int8 for ONNX "
                "Runtime's int8"
            )
        if self.quantize is None and ONNX_FILE in record.artifacts:
            raise KilnError(
                f"{ref} is already exported: its {ONNX_FILE} has sha256 "
                f"{record.artifacts[ONNX_FILE]} (a version's files never change). Serve it "
                f"with kiln serve {ref} --backend onnxruntime"
            )


@dataclass
class Exported:
    """What an export stored, and how the file compared with torch on the test rows."""

    record: VersionRecord
    """The version holding the new model.onnx: the exported one (fp32) or a new variant."""
    parent: VersionRecord
    """The version that was exported."""
    quantize: str | None
    check: dict[str, Any]
    metrics: dict[str, Any] | None
    """The int8 variant's own test metrics (None for fp32: the version's are unchanged)."""
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The `kiln export --json` line."""
        return {
            "model": self.record.name,
            "version": self.record.version,
            "ref": self.record.ref,
            "exported": self.parent.ref,
            "format": "onnx",
            "quantize": self.quantize,
            "file": ONNX_FILE,
            "sha256": self.record.artifacts[ONNX_FILE],
            "check": self.check,
            "metrics": self.metrics,
            "parent_metrics": {k: v for k, v in self.parent.metrics.items() if k != "history"},
            "elapsed_s": round(self.elapsed_s, 3),
        }


def resolve_version(registry: Any, ref: str) -> VersionRecord:
    """The version `ref` names, through the Registry actor (its KilnError, unwrapped)."""
    with unwrapped_errors():
        return ray.get(registry.resolve.remote(ref))


def read_test_rows(data: Any, spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The test split's raw inputs and labels (class indices, or values)."""
    _, x, y = data.test.read_arrays(Encoding.from_spec(spec))
    if spec["task"] == "classification":
        return x, encode_labels(y, spec["classes"])
    return x, y


def export_version(
    settings: Settings, request: ExportRequest, registry: Any, on_step: StepFn | None = None
) -> Exported:
    """The whole of `kiln export` (see the module docstring)."""
    # Imported here: torch is heavy, and `kiln export` checks its request before Ray starts.
    from kiln.actors.registry import read_verified_files
    from kiln.profiling import profile_at_registration
    from kiln.training.artifacts import model_from_files
    from kiln.variants import lineage_data

    started = time.perf_counter()
    step = on_step or (lambda _: None)
    record = resolve_version(registry, request.ref)
    request.check_against(record)
    model, spec = model_from_files(read_verified_files(settings.storage_uri, record))
    step("exporting")
    data = onnx_bytes(model, spec)
    step("loading test rows")
    dataset = lineage_data(settings, record, request.data)
    try:
        x, labels = read_test_rows(dataset, spec)
        if request.quantize:
            step("quantising and checking")
            data, check = int8_export(model, spec, data, x)
        else:
            step("checking")
            check = check_onnx(model, spec, data, x)
        step("registering")
        if request.quantize is None:
            stored = store_fp32(registry, record, data, check, request.key)
            metrics = None
        else:
            metrics = onnx_metrics(data, spec, x, labels)
            stored = register_int8(registry, record, model, spec, data, check, metrics, dataset)
    finally:
        dataset.release()
    step("profiling")
    profile_at_registration(registry, stored, ONNXRUNTIME)  # warns, never fails, when it cannot
    logger.info("exported %s as %s (%s)", record.ref, stored.ref, request.quantize or "fp32")
    return Exported(
        record=stored,
        parent=record,
        quantize=request.quantize,
        check=check,
        metrics=metrics,
        elapsed_s=time.perf_counter() - started,
    )


def store_fp32(
    registry: Any, record: VersionRecord, data: bytes, check: dict[str, Any], key: str | None
) -> VersionRecord:
    """model.onnx joins the version's artifacts (audited as "export")."""
    detail = {
        "format": "onnx",
        "quantize": None,
        "library": f"torch.onnx (dynamo), checked with onnxruntime {onnxruntime_version()}",
        "check": check,
    }
    with unwrapped_errors():
        return ray.get(
            registry.add_artifact.remote(
                record.name, record.version, ONNX_FILE, data, detail, key=key
            )
        )


def register_int8(
    registry: Any,
    parent: VersionRecord,
    model: Any,
    spec: dict[str, Any],
    data: bytes,
    check: dict[str, Any],
    metrics: dict[str, Any],
    dataset: Any,
) -> VersionRecord:
    """The int8 export as a new version of the parent's model (see the module docstring)."""
    from kiln.pipeline import register_model
    from kiln.training.artifacts import sha256_hex
    from kiln.training.compress import count_parameters
    from kiln.variants import variant_lineage

    headline = {f"test_{k}": metrics[k] for k in ("accuracy", "r2") if k in metrics}
    compression = {
        "method": ONNX_INT8_METHOD,
        "library": f"onnxruntime {onnxruntime_version()}",
        "weights": "int8, 7 bits per output channel (MatMul, Gemm and Conv)",
        "first_layer": check["first_layer"],
        "activations": "uint8, quantised per batch at run time",
        "agreement": check["agreement"],
        "onnx_sha256": sha256_hex(data),
        "parameters": count_parameters(model),
        **headline,
    }
    from kiln.references import reference_files

    lineage = variant_lineage(parent, [compression], dataset)
    variant_spec = {**spec, "onnx_quantized": ONNX_INT8}
    # The drift reference of the data it was trained on (the torch model's predictions).
    extra = {ONNX_FILE: data, **reference_files(dataset.train, model, spec)}
    return register_model(
        registry, parent.name, model, variant_spec, metrics, lineage, extra_files=extra
    )
