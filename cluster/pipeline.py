"""Train -> evaluate -> register, the path shared by `kiln train`, `kiln demo` and the client.

Reads as its steps: get the data resident in ShardStore actors (load it, or attach to a named
dataset), reduce their statistics into a model spec, fit with Ray Train's TorchTrainer,
evaluate the best weights on the test split (or on --eval-data), and register the weights,
spec, metrics and lineage.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kiln.actors.catalog import VersionRecord
from kiln.actors.lineage import code_version
from kiln.actors.shards import (
    Dataset,
    FeatureStats,
    ShardSet,
    load_shards,
)
from kiln.convex import fit_convex, lbfgs_warning, with_pca
from kiln.profiling import profile_at_registration, warm_profiler
from kiln.references import reference_files
from kiln.requests import TrainRequest, run_record_path
from kiln.resident import resident_data
from kiln.resources import worker_cpus
from kiln.settings import Settings
from kiln.training.artifacts import model_to_files
from kiln.training.checkpoints import BEST_WEIGHTS_FILE, load_tensors
from kiln.training.config import TrainConfig
from kiln.training.convergence import minibatch_convergence
from kiln.training.data import encode_labels
from kiln.training.errors import KilnError
from kiln.training.evaluate import evaluate_model
from kiln.training.models import KilnModel, build_model, set_standardization, validate_spec
from kiln.training.tabular import Encoding, feature_scaling

if TYPE_CHECKING:  # Ray Train (1-2 s of imports) loads only for a minibatch fit
    import ray.train

logger = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]
StepFn = Callable[[str], None]


@dataclass
class TrainOutcome:
    record: VersionRecord
    test_metrics: dict[str, Any]
    epochs_run: int
    num_workers: int
    workers: list[dict[str, Any]]
    history: list[dict[str, Any]] = field(default_factory=list)
    grad_sync: str = "none"
    elapsed_s: float = 0.0
    run_name: str = ""
    solver: str = ""
    converged: bool = True
    final_rel_loss_change: float | None = None
    warning: str | None = None
    """One line for the user when an iterative run stopped before converging."""
    iterations: int = 0
    """L-BFGS iterations (0 for the other solvers)."""
    columns: dict[str, Any] = field(default_factory=dict)
    """What loading made of the table's columns (`FeatureStats.column_summary`)."""


def register_model(
    registry: Any,
    name: str,
    model: KilnModel,
    spec: dict,
    metrics: dict,
    lineage: dict,
    extra_files: dict[str, bytes] | None = None,
) -> VersionRecord:
    """Register through the Registry actor; the request id makes a retried call register once.
    `extra_files` join the model's own (an ONNX int8 variant's model.onnx).

    Then the version's latency profile is measured (a Ray task with one replica's CPUs, about
    1 s; cluster/profiling.py); a failed measurement only warns: the version stays registered.
    """
    files = {**model_to_files(model, spec), **(extra_files or {})}
    record: VersionRecord = ray.get(
        registry.register.remote(name, files, spec, metrics, lineage, request_id=uuid.uuid4().hex)
    )
    profile_at_registration(registry, record)
    return record


def make_spec(
    cfg: TrainConfig,
    shards: ShardSet,
    stats: FeatureStats | None = None,
    min_category_count: int | None = None,
) -> dict[str, Any]:
    """The model's spec from the reduce over its training shards (`stats`, default the
    shards' own): inputs and their encoding, standardisation, classes or target scale.
    `min_category_count` is the run's (default: the one the shards were loaded with)."""
    stats = stats or shards.stats
    assert stats.plan is not None
    encoding = stats.encoding(min_category_count or shards.source.min_category_count)
    mean, std = feature_scaling(encoding, stats.count, stats.numeric_m2())
    spec: dict[str, Any] = {
        "kind": cfg.model,
        "task": stats.task,
        "num_features": encoding.num_features,
        "inputs": encoding.to_list(),
        "label": {"name": stats.plan.label, "type": stats.plan.label_type},
        "mean": mean.tolist(),
        "std": std.tolist(),
    }
    if cfg.model == "mlp":
        spec["hidden"] = list(cfg.hidden)
    if stats.task == "regression":
        spec["target_mean"] = stats.label_mean
        spec["target_std"] = stats.label_std
    if stats.task == "classification":
        spec["classes"] = list(stats.labels)
        if len(spec["classes"]) < 2:
            raise KilnError(
                "the training split holds a single class; a classifier needs two or more"
            )
    validate_spec(spec)
    return spec


def storage_path(settings: Settings) -> str:
    return f"{settings.storage_uri.rstrip('/')}/runs"


def fit(
    cfg: TrainConfig,
    spec: dict[str, Any],
    data: Dataset,
    settings: Settings,
    run_name: str,
    on_epoch: ProgressFn | None = None,
    extra_loop_config: dict[str, Any] | None = None,
    datasets: dict[str, Any] | None = None,
    loop: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[ray.train.Result, list[dict[str, Any]]]:
    """Run the TorchTrainer (each worker runs `loop`, default `train_func`); returns its result
    and the per-epoch metrics of rank 0.

    Epochs stream through a Ray queue to `on_epoch` while fit() blocks in a thread. A run name
    that exists under the storage path resumes that run (Ray Train V2's restore-by-name).
    """

    from kiln.training.loop import KilnTorchTrainer, train_func

    def make_trainer(progress: Queue) -> Any:
        cpus = worker_cpus(cfg)  # each worker's CPUs, and its torch threads
        return KilnTorchTrainer(
            loop or train_func,
            train_loop_config={
                "train": {**cfg.to_dict(), "cpus_per_worker": cpus},
                "spec": spec,
                "shards": data.train.handles,
                "val_shards": data.val.handles if data.val else [],
                "num_train_rows": data.train.num_rows,
                "progress": progress,
                **(extra_loop_config or {}),
            },
            scaling_config=scaling(cfg.workers, cpus, cfg.gpu),
            run_config=run_config(settings, run_name),
            datasets=datasets,
        )

    return fit_with_progress(make_trainer, on_epoch)


def wants_gpu(gpu: str) -> bool:
    """--gpu on, or auto on a cluster that has a GPU."""
    return gpu == "on" or (gpu == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)


def scaling(workers: int, cpus: int, gpu: str) -> Any:
    """Ray Train's scaling: `workers` workers of `cpus` CPUs, and a GPU each when wanted."""
    import ray.train

    use_gpu = wants_gpu(gpu)
    return ray.train.ScalingConfig(
        num_workers=workers,
        use_gpu=use_gpu,
        resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})},
    )


def run_config(settings: Settings, run_name: str) -> Any:
    """Where a run checkpoints (a run name that exists there resumes it), up to 3 restarts."""
    import ray.train

    return ray.train.RunConfig(
        name=run_name,
        storage_path=storage_path(settings),
        failure_config=ray.train.FailureConfig(max_failures=3),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
    )


def fit_with_progress(
    make_trainer: Callable[[Queue], Any], on_report: ProgressFn | None
) -> tuple[ray.train.Result, list[dict[str, Any]]]:
    """Run the trainer `make_trainer` builds around a progress queue; returns its result and
    every report rank 0 put on the queue (each handed to `on_report` as it comes).

    The reports stream through a Ray queue while fit() blocks in a thread.
    """
    history: list[dict[str, Any]] = []

    def record(metrics: dict[str, Any]) -> None:
        history.append(metrics)
        if on_report is not None:
            on_report(metrics)

    # On the driver's node: losing another node must not take the progress stream with it.
    # Hard affinity: a soft one put this 0-CPU actor on another node 2 times in 2 (RAY_NOTES),
    # and the driver's node lives as long as the driver does.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    progress = Queue(maxsize=10_000, actor_options={"num_cpus": 0, "scheduling_strategy": here})
    trainer = make_trainer(progress)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised on the calling thread below
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="kiln-fit", daemon=True)
    thread.start()
    live = True
    while thread.is_alive():
        thread.join(timeout=0.2)
        live = live and drain(progress, record)
    if live and drain(progress, record):
        ray.kill(progress.actor)  # type: ignore[arg-type]
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"], history


def drain(progress: Queue, on_epoch: ProgressFn) -> bool:
    """Hand every queued epoch report to `on_epoch`; False once the queue is gone for good.

    Progress is a side channel: the queue actor being briefly unreachable (a node dying
    nearby, a loaded machine) must not fail the run, so that case waits for the next poll;
    a queue whose node died (on a one-machine test cluster the driver can attach to any
    node's raylet) ends the live progress, not the training.
    """
    while True:
        try:
            on_epoch(progress.get_nowait())
        except Empty:
            return True
        except ray.exceptions.ActorUnavailableError:
            logger.warning("the progress queue is unreachable for now; retrying")
            return True
        except ray.exceptions.RayActorError:
            logger.warning("the progress queue died with its node; training goes on without it")
            return False


def load_best_model(checkpoint: ray.train.Checkpoint | None, spec: dict[str, Any]) -> KilnModel:
    """The best weights (lowest validation loss, else the last epoch) of a run's or a trial's
    checkpoint."""
    if checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    model = build_model(spec)
    set_standardization(model, spec)
    with checkpoint.as_directory() as directory:
        model.load_state_dict(load_tensors(Path(directory) / BEST_WEIGHTS_FILE))
    return model.eval()


def evaluate_on(model: KilnModel, spec: dict[str, Any], test: ShardSet) -> dict[str, Any]:
    _, x_test, y_test = test.read_arrays(Encoding.from_spec(spec))
    if len(x_test) == 0:
        raise KilnError("the test split is empty; use a --test-fraction above 0 or --eval-data")
    classify = spec["task"] == "classification"
    if classify:
        unknown = set(y_test.tolist()) - set(spec["classes"])
        if unknown:
            raise KilnError(
                f"the evaluation data has labels never seen in training: {sorted(unknown)[:5]}"
            )
    labels = encode_labels(y_test, spec["classes"]) if classify else y_test
    return evaluate_model(model, spec, x_test, labels)


def load_eval_set(eval_data: str | None, train: ShardSet) -> ShardSet | None:
    """All of `--eval-data`, read with the training data's label and input columns."""
    if not eval_data:
        return None
    plan = train.stats.plan
    assert plan is not None
    eval_source = replace(
        train.source,
        uri=eval_data,
        label=plan.label,
        features=tuple(plan.names),
        categorical=tuple(plan.categorical),
        test_fraction=0.0,
        val_fraction=0.0,
    )
    return load_shards(eval_source, "all", 1)


@dataclass
class Trained:
    """A fitted model before evaluation and registration, whatever fitted it."""

    model: KilnModel
    spec: dict[str, Any]
    solver: str
    train_rows: int
    converged: bool
    final_rel_loss_change: float | None
    warning: str | None = None
    train_loss: float | None = None
    epochs_run: int = 0
    num_workers: int = 0
    workers: list[dict[str, Any]] = field(default_factory=list)
    grad_sync: str = "none"
    """How the workers averaged gradients: shm, ddp, or none (one worker, or no minibatches)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    iterations: int = 0


def train_minibatch(
    cfg: TrainConfig,
    spec: dict[str, Any],
    data: Dataset,
    settings: Settings,
    run_name: str,
    on_epoch: ProgressFn | None,
) -> Trained:
    """Ray Train over the resident shards; the best weights of the final checkpoint."""
    result, history = fit(cfg, spec, data, settings, run_name, on_epoch)
    final = result.metrics or {}
    found = minibatch_convergence(history, cfg.max_epochs)
    return Trained(
        model=load_best_model(result.checkpoint, spec),
        spec=spec,
        solver=cfg.optimizer,
        train_rows=data.train.num_rows,
        converged=found.converged,
        final_rel_loss_change=found.final_rel_loss_change,
        warning=found.warning,
        train_loss=final["train_loss"],
        epochs_run=int(final["epoch"]) + 1,
        num_workers=int(final["num_workers"]),
        workers=final["workers"],
        grad_sync=final.get("grad_sync", "none"),
        history=history,
        best_epoch=final.get("best_epoch"),
    )


def solve_convex(cfg: TrainConfig, data: Dataset, min_category_count: int | None = None) -> Trained:
    """Exact or L-BFGS on every non-test row (no early stopping needs validation rows)."""
    sets = [s for s in (data.train, data.val) if s is not None]
    stats = data.train.stats.merge(data.val.stats) if data.val is not None else data.train.stats
    spec = make_spec(cfg, data.train, stats, min_category_count)
    if cfg.pca is not None:
        spec = with_pca(spec, cfg.pca, sets)
    fit = fit_convex(cfg, spec, sets)
    return Trained(
        model=fit.model,
        spec=spec,
        solver=fit.solver,
        train_rows=sum(s.num_rows for s in sets),
        converged=fit.converged,
        final_rel_loss_change=fit.final_rel_loss_change,
        warning=lbfgs_warning(fit, cfg),
        train_loss=fit.details.get("objective"),
        iterations=fit.iterations,
    )


def spec_with_stats(spec: dict[str, Any], stats: FeatureStats) -> dict[str, Any]:
    """The spec with imputation and standardisation from `stats` (as make_spec computes them)
    and the same inputs: the categories, and so the model's shape, stay those of the spec."""
    encoding = Encoding.from_spec(spec)
    assert encoding is not None, "specs made by make_spec record their inputs"
    means = dict(zip(stats.plan.numeric if stats.plan else [], stats.mean.tolist(), strict=True))
    encoding = Encoding(
        tuple(
            replace(column, impute=means[column.name]) if column.name in means else column
            for column in encoding.inputs
        )
    )
    mean, std = feature_scaling(encoding, stats.count, stats.numeric_m2())
    found = {**spec, "inputs": encoding.to_list(), "mean": mean.tolist(), "std": std.tolist()}
    if spec["task"] == "regression":
        found.update(target_mean=stats.label_mean, target_std=stats.label_std)
    return found


def register_outcome(
    registry: Any,
    name: str,
    model: KilnModel,
    spec: dict[str, Any],
    metrics: dict[str, Any],
    data: Dataset,
    evaluated_on: ShardSet,
    lineage_extra: dict[str, Any],
) -> VersionRecord:
    """Register a fitted, evaluated model with the lineage every path records.

    `lineage_extra` holds what the caller knows beyond the data: the training config, the
    solver, the run or sweep, the rows it trained on (train, or train + validation).
    """
    source = data.train.source
    plan = data.train.stats.plan
    lineage = {
        "schema": {**plan.to_dict(), "dropped_rows": data.train.stats.dropped_rows}
        if plan
        else None,
        "dataset_uri": source.uri,
        "dataset_sha256": ray.get(data_hash(data)),
        "code_version": code_version(),
        "dataset_name": data.name,
        "test_fraction": source.test_fraction,
        "val_fraction": source.val_fraction,
        "split_seed": source.seed,
        "train_rows": data.train.num_rows,
        "test_rows": evaluated_on.num_rows,
        **lineage_extra,
    }
    extra = reference_files(data.train, model, spec)  # for drift monitoring (training/drift.py)
    return register_model(registry, name, model, spec, metrics, lineage, extra)


def release_data(data: Dataset, eval_set: ShardSet | None) -> None:
    """Free the shards a command loaded for itself (a named dataset stays resident)."""
    data.release()
    if eval_set is not None:
        eval_set.release()


def data_hash(data: Dataset) -> Any:
    """The content hash of the training source, computed beside the fit (it reads the source)
    by the test split's shard, which the fit does not use."""
    if data.content_hash is None:
        data.content_hash = (data.test.handles or data.train.handles)[0].source_sha256.remote()
    return data.content_hash


def train_and_register(
    settings: Settings,
    request: TrainRequest,
    registry: Any,
    on_epoch: ProgressFn | None = None,
    on_step: StepFn | None = None,
    lineage_extra: dict[str, Any] | None = None,
    data: Dataset | None = None,
) -> TrainOutcome:
    """The whole path from a dataset to a registered, evaluated model version.

    `lineage_extra` adds lineage fields the caller knows: `parent`, `sweep_id`, `trial_id`.
    `data`: the run's data when the caller loaded it already (`kiln.resident`); released
    at the end either way.
    """
    started = time.perf_counter()
    step = on_step or (lambda _: None)
    cfg = request.train
    record_path = run_record_path(settings, request.run_name)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(request.to_json())

    warm_profiler()  # the latency profile's imports, beside the data load
    if data is None:  # else the caller started the registry's checks and the load itself
        registry.prepare_checks.remote()  # the registry's torch import, beside the data load
        step("loading shards")
        data = resident_data(request)
    data_hash(data)  # hashing reads the whole source once: it runs beside the fit
    eval_set = load_eval_set(request.eval_data, data.train)
    try:
        if cfg.resolved_solver == "minibatch":
            cfg = cfg.planned(math.ceil(data.train.num_rows / cfg.workers))
            step(f"training ({cfg.max_epochs} epochs)")
            spec = make_spec(cfg, data.train, None, request.source.min_category_count)
            if cfg.pca is not None:  # the components of the rows the statistics came from
                spec = with_pca(spec, cfg.pca, [data.train])
            trained = train_minibatch(cfg, spec, data, settings, request.run_name, on_epoch)
        else:
            step(f"solving ({cfg.resolved_solver})")
            trained = solve_convex(cfg, data, request.source.min_category_count)
        step("evaluating")
        test_metrics = evaluate_on(trained.model, trained.spec, eval_set or data.test)
        step("registering")
        metrics = {**test_metrics, "history": strip(trained.history)}
        if trained.train_loss is not None:
            metrics["train_loss"] = trained.train_loss
        record = register_outcome(
            registry,
            request.name,
            trained.model,
            trained.spec,
            metrics,
            data,
            eval_set or data.test,
            {
                **(lineage_extra or {}),
                "eval_data": request.eval_data,
                "train_rows": trained.train_rows,
                "train_config": cfg.to_dict(),
                "solver": trained.solver,
                "converged": trained.converged,
                "run_name": request.run_name,
                "best_epoch": trained.best_epoch,
                "pca": pca_lineage(trained.spec),
            },
        )
    finally:
        release_data(data, eval_set)
    return TrainOutcome(
        record=record,
        test_metrics=test_metrics,
        epochs_run=trained.epochs_run,
        num_workers=trained.num_workers,
        workers=trained.workers,
        history=trained.history,
        grad_sync=trained.grad_sync,
        elapsed_s=time.perf_counter() - started,
        run_name=request.run_name,
        solver=trained.solver,
        converged=trained.converged,
        final_rel_loss_change=trained.final_rel_loss_change,
        warning=trained.warning,
        iterations=trained.iterations,
        columns=data.train.stats.column_summary(),
    )


def pca_lineage(spec: dict[str, Any]) -> dict[str, Any] | None:
    """What the lineage says of a model's PCA: components kept and the variance they explain
    (the components themselves are in the spec)."""
    pca = spec.get("pca")
    if pca is None:
        return None
    return {
        "requested": pca["requested"],
        "components": len(pca["components"]),
        "of_features": spec["num_features"],
        "variance_kept": pca["variance_kept"],
    }


def strip(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-epoch metrics worth keeping with a version (no timings of this machine)."""
    keep = (
        "epoch",
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "val_r2",
        "val_mse",
    )
    return [{k: m[k] for k in keep if k in m} for m in history]
