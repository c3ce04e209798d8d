"""`kiln evaluate REF --attack fgsm|pgd --epsilon E`: a classifier's accuracy under attack next
to its clean accuracy, on the test split its metrics came from, stored with the version.

The split is read again the way `kiln compress` reads it (cluster/variants.py: the dataset it
was trained on if still loaded, else its source with the recorded seed and fractions); the
attack itself is training/robustness.py (ART).
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from kiln.actors.registry import read_verified_files
from kiln.settings import Settings
from kiln.training.errors import KilnError
from kiln.training.robustness import AttackRequest, check_attackable, robustness_report

__all__ = ["AttackRequest", "evaluate_robustness"]

logger = logging.getLogger(__name__)


def evaluate_robustness(
    settings: Settings, ref: str, request: AttackRequest, key: str | None = None
) -> dict[str, Any]:
    from kiln.runtime import ray_session, registry_for, unwrapped_errors

    with ray_session(settings), unwrapped_errors():
        registry = registry_for(settings)
        record = ray.get(registry.resolve.remote(ref))
        check_attackable(record.spec, record.ref)
        report = {"ref": record.ref, **attack_version(settings, record, request)}
        clean = record.metrics.get("accuracy")
        if clean is not None and abs(float(clean) - report["clean_accuracy"]) > 1e-6:
            logger.warning(
                "%s: clean accuracy %.4f differs from its registered %.4f (another split?)",
                record.ref,
                report["clean_accuracy"],
                clean,
            )
        ray.get(registry.record_robustness.remote(record.name, record.version, report, key))
    return report


def attack_version(settings: Settings, record: Any, request: AttackRequest) -> dict[str, Any]:
    from kiln.training.artifacts import model_from_files
    from kiln.training.data import encode_labels
    from kiln.training.tabular import Encoding
    from kiln.variants import lineage_data

    model, spec = model_from_files(read_verified_files(settings.storage_uri, record))
    data = lineage_data(settings, record)
    try:
        _, x, y = data.test.read_arrays(Encoding.from_spec(spec))
    finally:
        data.release()
    unknown = set(y.tolist()) - set(spec["classes"])
    if unknown:
        raise KilnError(f"the test split has labels the model never saw: {sorted(unknown)[:5]}")
    labels = encode_labels(y, spec["classes"])
    return robustness_report(model, x, labels, len(spec["classes"]), request)
