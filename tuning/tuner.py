"""A sweep: Ray Tune's Tuner over the trial trainable, with a scheduler and a search algorithm.

`SweepConfig` is validated once, up front. `run_tuner` starts (or, for a sweep whose driver
died, restores) the Tuner with concurrency sized to the cluster, and streams every trial result
to a callback for the live table. `summarise` turns the ResultGrid into plain rows for the
reports and picks the best trial.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import ray
import ray.train
from ray import tune
from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    HyperBandScheduler,
    PopulationBasedTraining,
    TrialScheduler,
)

from kiln.training.errors import KilnError
from kiln.tuning.asha import PromotingASHA
from kiln.tuning.config import SweepConfig
from kiln.tuning.space import (
    decode_l2,
    grid_configs,
    param_space,
    pbt_mutations,
)
from kiln.tuning.trainable import TrialContext, run_trial

logger = logging.getLogger(__name__)

ResultFn = Callable[[str, dict[str, Any], dict[str, Any]], None]
"""(trial_id, trial config, one reported result) -> None"""


def make_trial_scheduler(cfg: SweepConfig) -> TrialScheduler:
    """Epochs are Tune's time unit: one report per epoch is one training_iteration."""
    if cfg.scheduler == "asha":
        # A grace period of an eighth of the budget: early epochs rank learning rates by speed,
        # not by where they end, so judging after one epoch would keep the fast-but-poor ones.
        grace = max(1, cfg.max_epochs // 8)
        if pauses_trials(cfg):
            return PromotingASHA(
                max_t=cfg.max_epochs,
                grace_period=grace,
                reduction_factor=3,
                num_trials=cfg.planned_trials,
            )
        # A multi-worker trial keeps its checkpoints in its own Train run, not in Tune, so it
        # cannot be paused and resumed at a rung: Ray's stopping ASHA judges it instead.
        return ASHAScheduler(max_t=cfg.max_epochs, grace_period=grace, reduction_factor=3)
    if cfg.scheduler == "hyperband":
        return HyperBandScheduler(max_t=cfg.max_epochs, reduction_factor=3)
    if cfg.scheduler == "pbt":
        return PopulationBasedTraining(
            perturbation_interval=max(1, cfg.max_epochs // 5),
            hyperparam_mutations=pbt_mutations(cfg.space),
        )
    return FIFOScheduler()


CHECKPOINT_EVERY = 5
"""Epochs between the checkpoints of a trial no scheduler pauses or clones: what a sweep
whose driver was killed re-runs at most per unfinished trial."""


def checkpoint_plan(scheduler: TrialScheduler) -> tuple[int, list[int]]:
    """(every k epochs, and at these training iterations) a one-worker trial checkpoints.

    Each checkpoint is a file write and a copy to the sweep's storage. Trials checkpoint at
    their last epoch whatever the plan (the best trial's weights come from there), at
    PromotingASHA's rungs (a paused trial resumes from its last report's checkpoint), and
    every CHECKPOINT_EVERY epochs for a killed sweep's resume. PBT clones any trial at its
    perturbation steps and HyperBand pauses at its own brackets' milestones: every epoch.
    """
    if isinstance(scheduler, PromotingASHA):
        return CHECKPOINT_EVERY, list(scheduler.milestones)
    if type(scheduler) is FIFOScheduler:
        return CHECKPOINT_EVERY, []
    return 1, []


def make_search(cfg: SweepConfig) -> Any:
    if cfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.seed)
    from ray.tune.search import BasicVariantGenerator

    if cfg.search == "grid":
        points = grid_configs(cfg.space, cfg.grid_points, cfg.seed)
        return BasicVariantGenerator(points_to_evaluate=points, random_state=cfg.seed)
    return BasicVariantGenerator(random_state=cfg.seed)


def searcher_concurrency(cfg: SweepConfig, concurrent: int) -> int | None:
    """Tune's cap on live trials, or None to let the trials' resources alone cap them.

    Tune counts a paused trial as live: under PromotingASHA, a cap would let paused trials
    hold every slot while no new trial may start. One-worker trials ask a whole CPU each, so
    the cluster's CPUs already bound how many run at once.
    """
    return None if pauses_trials(cfg) else concurrent


def pauses_trials(cfg: SweepConfig) -> bool:
    """ASHA over one-worker trials promotes (PromotingASHA), pausing trials at its rungs."""
    return cfg.scheduler == "asha" and cfg.workers_per_trial == 1


def trial_resources(workers_per_trial: int) -> tuple[dict[str, float], int]:
    """Per-trial resources and how many trials fit the cluster at once.

    A one-worker trial trains in its own process: one CPU, and a share of the GPUs when the
    cluster has any. A multi-worker trial's driver only waits on its TorchTrainer, whose workers
    take the CPUs: it asks a sliver of CPU (0 is refused), and concurrency counts the workers.
    """
    resources = ray.cluster_resources()
    cpus = int(resources.get("CPU", 1))
    gpus = float(resources.get("GPU", 0))
    concurrent = max(1, cpus // workers_per_trial)
    if workers_per_trial == 1:
        # A trial is one process training on one thread: on one node, more of them than its
        # cores add no speed, only processes to start (each imports Ray Tune and torch, ~4.5 s
        # of CPU) and memory. Kiln's embedded Ray declares at least 4 CPUs on any machine;
        # on 2 cores, 2 trials at once ran the default grid of benchmarks/tune_efficiency.py
        # in 21-22 s against 28-32 s for 4. Each trial asks its share of the CPUs, so the
        # resources alone bound how many run (a paused trial holds none).
        concurrent = max(1, min(cpus, machine_cores()))
        ask: dict[str, float] = {"cpu": cpus / concurrent}
        if gpus > 0:
            ask["gpu"] = round(min(1.0, gpus / concurrent), 3)
        return ask, concurrent
    # The trial driver holds a sliver of CPU, so W workers per trial plus drivers must fit.
    concurrent = max(1, int((cpus - 0.05 * concurrent) // workers_per_trial))
    return {"cpu": 0.01}, concurrent


def machine_cores() -> int:
    """The cores one-worker trials can use at once: this machine's, when the cluster is this
    one node (the embedded Ray, a one-machine cluster); unbounded on several nodes, whose
    declared CPUs are what Ray knows of them."""
    alive = [n for n in ray.nodes() if n["Alive"]]
    here = ray.get_runtime_context().get_node_id()
    if len(alive) == 1 and alive[0]["NodeID"] == here:
        return os.cpu_count() or 1
    return 1 << 30


def run_tuner(
    cfg: SweepConfig,
    context: TrialContext,
    storage_path: str,
    sweep_id: str,
    resume: bool = False,
    on_result: ResultFn | None = None,
) -> tune.ResultGrid:
    """Run (or restore and finish) the sweep; blocks until every trial is done."""
    # A killed driver loses at most this many seconds of sweep state (default: adaptive).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    resources, concurrent = trial_resources(cfg.workers_per_trial)
    scheduler = make_trial_scheduler(cfg)
    context.checkpoint_every, context.checkpoint_at = checkpoint_plan(scheduler)
    context.use_gpu = "gpu" in resources or (
        cfg.workers_per_trial > 1 and ray.cluster_resources().get("GPU", 0) >= 1
    )
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), resources)
    params = param_space(cfg.space, cfg.search, cfg.grid_points)
    path = f"{storage_path.rstrip('/')}/{sweep_id}"
    if resume:
        if not tune.Tuner.can_restore(path):
            raise KilnError(f'Got "{sweep_id}" for --resume, but {path} holds no sweep state.')
        tuner = tune.Tuner.restore(
            path, trainable, resume_unfinished=True, resume_errored=True, param_space=params
        )
        return prune_checkpoints(tuner.fit())
    logger.info(
        "sweep %s: %d trials, %d at once, %s", sweep_id, cfg.planned_trials, concurrent, resources
    )
    tuner = tune.Tuner(
        trainable,
        param_space=params,
        tune_config=tune.TuneConfig(
            metric=cfg.metric,
            mode=cfg.mode,
            scheduler=scheduler,
            search_alg=make_search(cfg),
            num_samples=cfg.planned_trials,
            max_concurrent_trials=searcher_concurrency(cfg, concurrent),
            # A trial started (or resumed after a pause) on a finished trial's process skips
            # the new process, its imports and its shard reads (tuning/trainable.py caches
            # them): on the digits grid of benchmarks/tune_efficiency.py that start-up cost
            # more than the epochs ASHA saved.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=sweep_id,
            storage_path=storage_path,
            verbose=0,
            callbacks=[ProgressCallback(on_result)] if on_result else [],
            # Every checkpoint is kept while the sweep runs: Tune deletes a superseded one
            # before its next experiment snapshot, so a driver killed in between left a
            # snapshot naming a deleted checkpoint and the resumed trial failed to restore
            # (seen in CI). `prune_checkpoints` keeps only each trial's last one at the end.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            failure_config=tune.FailureConfig(max_failures=1),
        ),
    )
    return prune_checkpoints(tuner.fit())


def prune_checkpoints(grid: tune.ResultGrid) -> tune.ResultGrid:
    """Delete each finished trial's checkpoints except its latest (the one results point at)."""
    from pyarrow import fs as pafs

    for result in cast(Any, grid):
        if result.checkpoint is None:
            continue
        keep = result.checkpoint.path.rstrip("/")
        store = result.filesystem
        for info in store.get_file_info(pafs.FileSelector(result.path)):
            name = info.path.rstrip("/").rsplit("/", 1)[-1]
            if (
                info.type == pafs.FileType.Directory
                and name.startswith("checkpoint_")
                and info.path.rstrip("/") != keep
            ):
                store.delete_dir(info.path)
    return grid


class ProgressCallback(tune.Callback):
    """Forwards each trial result to the driver's live table (runs in the driver process)."""

    def __init__(self, on_result: ResultFn | None) -> None:
        self.on_result = on_result

    def __getstate__(self) -> dict[str, Any]:
        # Tune saves its run config (callbacks included) for restore; a live display holds
        # locks and cannot be pickled, and a restored sweep is handed a fresh callback anyway.
        return {"on_result": None}

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **_: Any
    ) -> None:
        if self.on_result is not None:
            self.on_result(trial.trial_id, dict(trial.config), result)


# ----------------------------------------------------------------------------- results


@dataclass(kw_only=True)
class TrialSummary:
    """One trial as the reports and the registry see it."""

    trial_id: str
    config: dict[str, Any]
    """The trial's hyperparameters, λ decoded (lr, l2, and any tuned choices)."""
    metrics: dict[str, Any]
    """The last reported metrics."""
    best: float
    """The best value of the sweep metric over the trial's epochs."""
    epochs: int
    history: list[dict[str, Any]]
    status: str
    checkpoint: Any = None
    path: str = ""


def trial_hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    shown = {"lr": float(config["lr"]), "l2": decode_l2(config)}
    for key in ("batch_size", "hidden_width", "depth", "optimizer"):
        if key in config:
            shown[key] = config[key]
    return shown


def summarise(grid: tune.ResultGrid, metric: str, mode: str) -> list[TrialSummary]:
    """Every trial with its config, history and best metric (errored trials included)."""
    rows = []
    for result in cast(Any, grid):  # ResultGrid iterates over its Results
        frame = result.metrics_dataframe
        history = frame.to_dict("records") if frame is not None else []
        values = [h[metric] for h in history if h.get(metric) is not None]
        best = (min(values) if mode == "min" else max(values)) if values else float("nan")
        metrics = result.metrics or {}
        checkpoint = result.checkpoint
        if checkpoint is None and metrics.get("checkpoint_path"):
            # A multi-worker trial: TuneReportCallback forwards the Train run's checkpoint path.
            checkpoint = ray.train.Checkpoint(metrics["checkpoint_path"])
        rows.append(
            TrialSummary(
                trial_id=str(metrics.get("trial_id") or result.path.rsplit("/", 1)[-1]),
                config=trial_hyperparameters(result.config or {}),
                metrics=metrics,
                best=float(best),
                epochs=int(metrics.get("training_iteration", len(history))),
                history=history,
                status="ERROR" if result.error else "TERMINATED",
                checkpoint=checkpoint,
                path=result.path,
            )
        )
    return rows


def best_trial(trials: list[TrialSummary], mode: str) -> TrialSummary:
    scored = [t for t in trials if t.best == t.best and t.checkpoint is not None]
    if not scored:
        raise KilnError("no trial of the sweep reported a metric; rerun with --debug to see why")
    return min(scored, key=lambda t: t.best if mode == "min" else -t.best)
