"""`kiln retrain NAME`: the served version, trained further on what production labelled.

Reads as its steps: find the version that serves NAME (or NAME's latest), read the labelled
predictions of the window from the prediction log, hold out a part of them (whole requests, by
a hash of the request id), bring the version's training data back from its lineage, put the
rest of the feedback beside it in `RowBatches` actors (repeated `--feedback-weight` times),
train through Ray Train warm-started from the served weights, evaluate on the original test
split and on the held-out feedback (the served version too, for comparison), register the new
version with `lineage.parent` and `lineage.feedback`, and deploy it as a canary.

A linear, ridge or logistic version (fitted exactly or by L-BFGS) is warm-started with Adam
from its optimum: the combined data moves the optimum, and a few epochs from the old one get
there (an exact re-solve on data plus feedback would need the feedback in the shards' reduce).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from kiln.actors.catalog import VersionRecord, validate_name
from kiln.actors.feedback import read_window
from kiln.actors.lineage import code_version
from kiln.actors.monitor import parse_window, quality
from kiln.actors.registry import read_verified_files
from kiln.actors.shards import Dataset, RowBatches
from kiln.pipeline import ProgressFn, StepFn, evaluate_on, fit, load_best_model, register_model
from kiln.references import reference_files
from kiln.requests import unique_name
from kiln.settings import Settings
from kiln.training.artifacts import WEIGHTS_FILE, model_from_files
from kiln.training.config import TrainConfig
from kiln.training.data import inputs_to_batch
from kiln.training.errors import KilnError, check_options
from kiln.training.evaluate import outputs_to_predictions, predict_outputs
from kiln.training.models import num_inputs
from kiln.training.tabular import Encoding
from kiln.variants import LINEAGE_DATA_FIELDS, lineage_data

logger = logging.getLogger(__name__)

CONVEX_KINDS = ("linear", "ridge", "logistic")


@dataclass(kw_only=True)
class RetrainRequest:
    """One `kiln retrain`; every field is the option of the same name."""

    name: str
    since: str = "24h"
    feedback_weight: float = 1.0
    canary_weight: int = 10
    deploy: bool = True
    epochs: int = 5
    holdout: float = 0.3
    min_feedback: int = 20
    workers: int = 1
    seed: int = 0
    key: str | None = None
    since_s: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        validate_name(self.name)
        try:
            self.since_s = parse_window(self.since)
        except ValueError as exc:
            raise KilnError(f"Got {exc} for --since. Use a duration like 30m, 24h or 7d.") from None
        checks = [
            (
                0 < self.feedback_weight <= 100,
                "--feedback-weight",
                self.feedback_weight,
                "a number above 0, at most 100",
            ),
            (0 <= self.canary_weight <= 100, "--canary-weight", self.canary_weight, "0 to 100"),
            (1 <= self.epochs <= 1000, "--epochs", self.epochs, "1 to 1000"),
            (0 < self.holdout < 1, "--holdout", self.holdout, "a fraction between 0 and 1"),
            (self.min_feedback >= 2, "--min-feedback", self.min_feedback, "at least 2"),
            (self.workers >= 1, "--workers", self.workers, "at least 1"),
        ]
        check_options(checks)


@dataclass
class Feedback:
    """Labelled production rows: raw inputs, original labels, and the held-out mask."""

    x: np.ndarray  # (N, num_inputs) float32
    labels: list[Any]
    label_texts: list[str]
    holdout: np.ndarray  # (N,) bool
    since_ts: float

    @property
    def train_rows(self) -> int:
        return int((~self.holdout).sum())


def served_ref(name: str) -> str | None:
    """The ref that answers NAME's bare-name traffic now, if a Kiln app serves NAME."""
    from kiln.serving_control import current_args, served_stable_refs

    try:
        args = current_args()
    except KilnError:
        return None
    if not any(ref.partition("@")[0] == name for ref in args["models"]):
        return None
    return served_stable_refs().get(name)


def heldout_mask(request_ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """Whole requests held out by a hash of their id: the same rows each time for a seed."""
    cut = int(fraction * 10_000)
    return np.array([zlib.crc32(f"{seed}:{r}".encode()) % 10_000 < cut for r in request_ids])


def read_feedback(
    storage_uri: str, parent: VersionRecord, request: RetrainRequest, now: float | None = None
) -> Feedback:
    """The window's labelled predictions of the model whose inputs fit the parent's."""
    since = (now or time.time()) - request.since_s
    table = read_window(storage_uri, parent.name, since)
    ok = pa.array(table.column("status").to_numpy() == 200)
    table = table.filter(ok).filter(table.filter(ok).column("label").is_valid())
    width = num_inputs(parent.spec)
    if table.num_rows:
        lengths = table.column("inputs").combine_chunks().value_lengths().to_numpy()
        table = table.filter(pa.array(lengths == width))
    if table.num_rows < request.min_feedback:
        raise KilnError(
            f"{parent.name} has {table.num_rows} labelled predictions in the last "
            f"{request.since}; retraining needs at least {request.min_feedback} "
            "(send labels with POST :feedback, or widen --since)"
        )
    flat = table.column("inputs").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    texts = table.column("label").to_pylist()
    mask = heldout_mask(table.column("request_id").to_pylist(), request.holdout, request.seed)
    if mask.all() or not mask.any():  # too few requests to split: hold out every 3rd row
        mask = np.arange(len(texts)) % 3 == 0
    return Feedback(
        x=flat.reshape(-1, width).astype(np.float32),
        labels=[json.loads(t) for t in texts],
        label_texts=texts,
        holdout=mask,
        since_ts=since,
    )


def feedback_shards(
    feedback: Feedback, spec: dict[str, Any], weight: float, workers: int, seed: int
) -> tuple[list[Any], list[int]]:
    """RowBatches actors (one per worker) holding the training part of the feedback, each row
    `weight` times (whole repeats, then a seeded sample for the fraction)."""
    keep = np.flatnonzero(~feedback.holdout)
    whole, part = int(weight), weight - int(weight)
    extra = np.random.default_rng(seed).random(len(keep)) < part
    rows = np.concatenate([np.tile(keep, whole), keep[extra]]).astype(np.int64)
    encoding = Encoding.from_spec(spec)
    handles, sizes = [], []
    for w, chunk in enumerate(np.array_split(rows, workers)):
        labels = [feedback.labels[i] for i in chunk.tolist()]
        batch = inputs_to_batch(
            feedback.x[chunk], labels, encoding, first_row_id=-(10**9) * (w + 1)
        )
        handles.append(RowBatches.remote([batch], num_inputs(spec)))  # type: ignore[attr-defined]
        sizes.append(len(chunk))
    ray.get([h.ready.remote() for h in handles])
    return handles, sizes


def with_feedback(data: Dataset, handles: list[Any], rows_per_shard: list[int]) -> Dataset:
    train = dataclasses.replace(
        data.train,
        handles=[*data.train.handles, *handles],
        rows_per_shard=[*data.train.rows_per_shard, *rows_per_shard],
    )
    return dataclasses.replace(data, train=train)


def retrain_config(parent: VersionRecord, request: RetrainRequest) -> TrainConfig:
    """The parent's own training settings, for `--epochs`; a convex model switches to Adam."""
    base = dict(parent.lineage.get("train_config") or {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in base.items() if k in known and k != "resume"})
    changes: dict[str, Any] = {
        "epochs": request.epochs,
        "workers": request.workers,
        "patience": 0,
        "gpu": "off",
        "pca": None,
    }
    if parent.spec["kind"] in CONVEX_KINDS:
        changes["solver"] = "adam"
    return dataclasses.replace(cfg, **changes)


def heldout_quality(model: Any, spec: dict[str, Any], feedback: Feedback) -> dict[str, Any]:
    rows = np.flatnonzero(feedback.holdout)
    outputs = predict_outputs(model, feedback.x[rows])
    predictions = outputs_to_predictions(outputs, spec)
    found = quality(spec, predictions, [feedback.label_texts[i] for i in rows.tolist()])
    found.pop("confusion", None)
    return found


def retrain_and_register(
    settings: Settings,
    request: RetrainRequest,
    registry: Any,
    on_epoch: ProgressFn | None = None,
    on_step: StepFn | None = None,
) -> dict[str, Any]:
    """The whole of `kiln retrain` (see the module docstring); returns its summary."""
    started = time.perf_counter()
    step = on_step or (lambda _: None)
    ref = served_ref(request.name) or request.name
    parent: VersionRecord = ray.get(registry.resolve.remote(ref))
    if parent.spec.get("quantization"):
        raise KilnError(
            f"{parent.ref} is an int8 variant; retrain its fp32 parent "
            f"({parent.lineage.get('parent')}) and compress the result"
        )
    feedback = read_feedback(settings.storage_uri, parent, request)
    files = read_verified_files(settings.storage_uri, parent)
    parent_model, spec = model_from_files(files)
    step("loading shards")
    data = lineage_data(settings, parent, None, request.workers)
    handles: list[Any] = []
    try:
        handles, sizes = feedback_shards(
            feedback, spec, request.feedback_weight, request.workers, request.seed
        )
        fed_rows = sum(sizes)
        combined = with_feedback(data, handles, sizes)
        cfg = retrain_config(parent, request)
        step("training")
        result, history = fit(
            cfg,
            spec,
            combined,
            settings,
            unique_name("retrain"),
            on_epoch,
            extra_loop_config={"init_weights": files[WEIGHTS_FILE]},
        )
        model = load_best_model(result.checkpoint, spec)
        step("evaluating")
        metrics = evaluate_on(model, spec, data.test)
        before = heldout_quality(parent_model, spec, feedback)
        after = heldout_quality(model, spec, feedback)
        metrics["feedback_heldout"] = after
        lineage = {
            **{k: parent.lineage.get(k) for k in LINEAGE_DATA_FIELDS},
            "code_version": code_version(),
            "parent": parent.ref,
            "train_config": cfg.to_dict(),
            "train_rows": data.train.num_rows + fed_rows,
            "test_rows": data.test.num_rows,
            "feedback": {
                "since": request.since,
                "since_ts": feedback.since_ts,
                "rows": len(feedback.labels),
                "train_rows": feedback.train_rows,
                "heldout_rows": int(feedback.holdout.sum()),
                "weight": request.feedback_weight,
            },
        }
        step("registering")
        extra = reference_files(combined.train, model, spec)
        record = register_model(registry, parent.name, model, spec, metrics, lineage, extra)
    finally:
        data.release()
        for handle in handles:
            ray.kill(handle)
    deployed = None
    if request.deploy and served_ref(parent.name) is not None:
        from kiln.serving_control import deploy_canary

        step("deploying the canary")
        deploy_canary(settings, parent.name, record.version, request.canary_weight, request.key)
        deployed = {"ref": record.ref, "weight": request.canary_weight}
    return {
        "model": record.name,
        "version": record.version,
        "parent": parent.ref,
        "feedback_rows": len(feedback.labels),
        "feedback_train_rows": feedback.train_rows,
        "feedback_heldout_rows": int(feedback.holdout.sum()),
        "heldout_before": before,
        "heldout_after": after,
        "test_metrics": {k: v for k, v in metrics.items() if k != "feedback_heldout"},
        "parent_test_metrics": {k: v for k, v in parent.metrics.items() if k != "history"},
        "epochs_run": len(history),
        "canary": deployed,
        "elapsed_s": time.perf_counter() - started,
    }
