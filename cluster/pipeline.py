"""Train -> evaluate -> register, the path shared by `kiln train`, `kiln demo` and the client.

Reads as its steps: load the shards into actors, reduce their statistics into a model spec,
fit with Ray Train's TorchTrainer, evaluate the final checkpoint on the held-out split, and
register the weights, spec, metrics and lineage.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer
from ray.util.queue import Empty, Queue
from safetensors.torch import load_file

from actors.catalog import VersionRecord, validate_name
from actors.lineage import code_version, dataset_sha256
from actors.shards import ShardSet, load_shards
from actors.sources import SourceSpec
from cluster.settings import Settings
from training.artifacts import model_to_files
from training.config import TrainConfig
from training.data import encode_labels
from training.errors import KilnError
from training.evaluate import evaluate_model
from training.loop import WEIGHTS_FILE, train_func
from training.models import build_model, set_standardization, validate_spec

logger = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class TrainOutcome:
    record: VersionRecord
    test_metrics: dict[str, Any]
    epochs_run: int
    num_workers: int
    workers: list[dict[str, Any]]
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0


def make_spec(cfg: TrainConfig, shards: ShardSet) -> dict[str, Any]:
    stats = shards.stats
    spec: dict[str, Any] = {
        "kind": cfg.model,
        "task": stats.task,
        "num_features": int(stats.mean.shape[0]),
        "mean": stats.mean.astype(float).tolist(),
        "std": stats.std.astype(float).tolist(),
    }
    if cfg.model == "mlp":
        spec["hidden"] = list(cfg.hidden)
    if stats.task == "classification":
        spec["classes"] = list(stats.labels)
        if len(spec["classes"]) < 2:
            raise KilnError(
                "the training split holds a single class; a classifier needs two or more"
            )
    validate_spec(spec)
    return spec


def fit(
    cfg: TrainConfig,
    spec: dict[str, Any],
    shards: ShardSet,
    settings: Settings,
    run_name: str,
    on_epoch: ProgressFn | None = None,
) -> tuple[ray.train.Result, list[dict[str, Any]]]:
    """Run the TorchTrainer; returns its result and the per-epoch metrics of rank 0.

    Epochs stream through a Ray queue to `on_epoch` while fit() blocks in a thread.
    """
    history: list[dict[str, Any]] = []

    def record(metrics: dict[str, Any]) -> None:
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics)

    progress = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    use_gpu = cfg.gpu == "on" or (cfg.gpu == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "train": cfg.to_dict(),
            "spec": spec,
            "shards": shards.handles,
            "num_train_rows": shards.num_rows,
            "progress": progress,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=f"{settings.storage_uri.rstrip('/')}/runs",
            failure_config=ray.train.FailureConfig(max_failures=3),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised on the calling thread below
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="kiln-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.2)
        drain(progress, record)
    drain(progress, record)
    ray.kill(progress.actor)  # type: ignore[arg-type]
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"], history


def drain(progress: Queue, on_epoch: ProgressFn) -> None:
    while True:
        try:
            on_epoch(progress.get_nowait())
        except Empty:
            return


def load_trained_model(result: ray.train.Result, spec: dict[str, Any]):  # noqa: ANN201
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    model = build_model(spec)
    set_standardization(model, spec["mean"], spec["std"])
    with result.checkpoint.as_directory() as directory:
        model.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE)))
    return model.eval()


def train_and_register(
    settings: Settings,
    source: SourceSpec,
    cfg: TrainConfig,
    name: str,
    registry: Any,
    on_epoch: ProgressFn | None = None,
    on_step: Callable[[str], None] | None = None,
    lineage_extra: dict[str, Any] | None = None,
) -> TrainOutcome:
    """The whole path from a dataset URI to a registered, evaluated model version.

    `lineage_extra` adds lineage fields the caller knows: `parent`, `sweep_id`, `trial_id`.
    """
    validate_name(name)
    started = time.perf_counter()
    step = on_step or (lambda _: None)
    # Hashing reads the whole source once; it runs beside the training instead of before it.
    content_hash = ray.remote(num_cpus=0)(dataset_sha256).remote(source.uri)
    step("loading shards")
    train = load_shards(source, "train", cfg.workers)
    test = load_shards(source, "test", 1)
    try:
        spec = make_spec(cfg, train)
        step("training")
        run_name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        result, history = fit(cfg, spec, train, settings, run_name, on_epoch)
        step("evaluating")
        model = load_trained_model(result, spec)
        _, x_test, y_test = test.read_arrays()
        if len(x_test) == 0:
            raise KilnError("the test split is empty; use a --test-fraction above 0")
        labels = (
            encode_labels(y_test, spec["classes"]) if spec["task"] == "classification" else y_test
        )
        test_metrics = evaluate_model(model, spec, x_test, labels)
        step("registering")
        lineage = {
            **(lineage_extra or {}),
            "dataset_uri": source.uri,
            "dataset_sha256": ray.get(content_hash),
            "code_version": code_version(),
            "test_fraction": source.test_fraction,
            "split_seed": source.seed,
            "train_rows": train.num_rows,
            "test_rows": test.num_rows,
            "train_config": cfg.to_dict(),
            "run_name": run_name,
        }
        final = result.metrics or {}
        metrics = {**test_metrics, "train_loss": final["train_loss"]}
        # A request id makes the actor's automatic retry (after a restart) register it once.
        record = ray.get(
            registry.register.remote(
                name,
                model_to_files(model, spec),
                spec,
                metrics,
                lineage,
                request_id=uuid.uuid4().hex,
            )
        )
    finally:
        train.release()
        test.release()
    return TrainOutcome(
        record=record,
        test_metrics=test_metrics,
        epochs_run=int(final["epoch"]) + 1,
        num_workers=int(final["num_workers"]),
        workers=final["workers"],
        history=history,
        elapsed_s=time.perf_counter() - started,
    )
