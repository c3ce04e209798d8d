"""Sweep -> evaluate -> register: the path behind `kiln tune` (`Kiln.submit_tune` runs it as a job).

Reads as its steps: make the dataset resident once (load it, or attach to a named one), build
the model spec from its statistics, run the Tune sweep with every trial reading those same
ShardStore actors, write the CSV and PNG reports, take the best trial's best weights (or, with
--refit, train its configuration again on train + validation rows), evaluate that model on
the test split (or --eval-data), register it with the sweep's lineage, and publish the sweep's
JSON summary to shared storage (actors/sweeps.py) for the web console. The request is saved
under KILN_HOME/sweeps before Ray Tune starts, so `kiln tune --resume SWEEP` can finish a sweep
whose driver died.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
from safetensors.torch import load as load_safetensors

from kiln.actors.catalog import VersionRecord
from kiln.actors.shards import Dataset, attach_dataset, load_dataset, looks_like_dataset_name
from kiln.actors.sweeps import publish_sweep
from kiln.lambda_sweep import (
    NOT_SEARCHED,
    logistic_path_trials,
    ridge_path_trials,
    with_l2,
)
from kiln.pipeline import (
    StepFn,
    data_hash,
    evaluate_on,
    load_best_model,
    load_eval_set,
    make_spec,
    register_outcome,
    release_data,
    spec_with_stats,
)
from kiln.requests import SweepRequest, sweeps_folder
from kiln.settings import Settings
from kiln.training.config import TrainConfig
from kiln.training.convergence import minibatch_convergence
from kiln.training.errors import KilnError
from kiln.training.models import KilnModel, build_model, set_standardization
from kiln.tuning.config import SweepConfig
from kiln.tuning.report import json_safe, sweep_summary, write_path_reports, write_reports
from kiln.tuning.trainable import TrialContext, refit_weights, trial_spec, trial_train_config
from kiln.tuning.tuner import ResultFn, TrialSummary, best_trial, run_tuner, summarise

logger = logging.getLogger(__name__)


@dataclass
class SweepOutcome:
    sweep_id: str
    record: VersionRecord
    best: TrialSummary
    test_metrics: dict[str, Any]
    trials: list[TrialSummary]
    artifacts: dict[str, str]
    elapsed_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def trial_epochs(self) -> int:
        return sum(t.epochs for t in self.trials)


def sweep_storage_path(settings: Settings) -> str:
    return f"{settings.storage_uri.rstrip('/')}/sweeps"


def sweep_data(request: SweepRequest) -> Dataset:
    """The named dataset if there is one (shared, never reloaded), else load the URI once."""
    if looks_like_dataset_name(request.data):
        attached = attach_dataset(request.data)
        if attached is not None:
            if attached.val is None:
                raise KilnError(
                    f'Dataset "{request.data}" has no validation split, which a sweep ranks '
                    f"trials on. Reload it with --val-fraction 0.1 or more."
                )
            return attached
    return load_dataset(request.source, max(request.sweep.workers_per_trial, 1))


def trial_context(request: SweepRequest, data: Dataset, settings: Settings) -> TrialContext:
    if data.val is None or data.val.num_rows == 0:
        raise KilnError("a sweep needs validation rows to rank trials: use --val-fraction 0.1")
    return TrialContext(
        train=request.train.to_dict(),
        spec=make_spec(request.train, data.train, None, request.source.min_category_count),
        shards=data.train.handles,
        val_shards=data.val.handles,
        num_train_rows=data.train.num_rows,
        workers_per_trial=request.sweep.workers_per_trial,
        storage_path=f"{sweep_storage_path(settings)}/{request.sweep_id}-train",
    )


def tune_and_register(
    settings: Settings,
    request: SweepRequest,
    registry: Any,
    resume: bool = False,
    on_result: ResultFn | None = None,
    on_step: StepFn | None = None,
) -> SweepOutcome:
    """The whole sweep, from a dataset to the best configuration's registered model version.

    Minibatch models (mlp, cnn, or a convex model with --solver sgd|adam|adamw) run Ray Tune
    trials; the convex models with their own solvers walk the λ path (cluster/lambda_sweep.py).
    """
    started = time.perf_counter()
    step = on_step or (lambda _: None)
    record_path = sweeps_folder(settings) / f"{request.sweep_id}.json"
    record_path.parent.mkdir(parents=True, exist_ok=True)
    if not resume:
        record_path.write_text(request.to_json())

    registry.prepare_checks.remote()  # the registry's torch import, beside the data load
    step("loading shards")
    data = sweep_data(request)
    data_hash(data)  # hashing reads the whole source once: it runs beside the sweep
    eval_set = load_eval_set(request.eval_data, data.train)
    try:
        if request.train.resolved_solver == "minibatch":
            found = run_trials(settings, request, data, resume, on_result, step)
        else:
            found = run_lambda_path(request, data, step)
        sweep = request.sweep
        step("reporting")
        artifacts = write_found_reports(found, sweep, record_path.with_suffix(""))
        step("evaluating")
        test_metrics = evaluate_on(found.model, found.spec, eval_set or data.test)
        step("registering")
        metrics = {
            **test_metrics,
            f"best_{found.metric}": found.best.best,
            "trial_epochs": found.best.epochs,
        }
        record = register_outcome(
            registry,
            request.name,
            found.model,
            found.spec,
            metrics,
            data,
            eval_set or data.test,
            {
                "sweep_id": request.sweep_id,
                "trial_id": found.best.trial_id,
                "trial_config": found.best.config,
                "sweep": {
                    "scheduler": found.scheduler,
                    "search": found.search,
                    "metric": found.metric,
                    "num_trials": len(found.trials),
                    "space": sweep.space.to_dict(),
                },
                "eval_data": request.eval_data,
                "train_rows": found.train_rows,
                "train_config": found.train_config.to_dict(),
                "solver": found.solver,
                "converged": found.converged,
                "best_epoch": found.best.metrics.get("best_epoch"),
                "refit": found.refit,
            },
        )
    finally:
        release_data(data, eval_set)
    elapsed_s = time.perf_counter() - started
    # Part of the sweep's record, like the registered version: a failed write fails the sweep.
    publish_sweep(
        settings.storage_uri,
        found_summary(request, found, record, test_metrics, elapsed_s),
    )
    return SweepOutcome(
        sweep_id=request.sweep_id,
        record=record,
        best=found.best,
        test_metrics=test_metrics,
        trials=found.trials,
        artifacts=artifacts,
        elapsed_s=elapsed_s,
        extra=found.summary(),
    )


@dataclass
class SweepFound:
    """What a sweep chose, before evaluation and registration."""

    trials: list[TrialSummary]
    best: TrialSummary
    model: KilnModel
    spec: dict[str, Any]
    train_config: TrainConfig
    metric: str
    mode: str
    train_rows: int
    solver: str
    scheduler: str
    search: str
    converged: bool
    final_rel_loss_change: float | None
    refit: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    searched: list[str] = field(default_factory=list)
    selection: str = ""
    """How the best configuration was chosen."""

    def summary(self) -> dict[str, Any]:
        """What `kiln tune --json` adds to the sweep's keys."""
        return {
            "solver": self.solver,
            "searched": self.searched,
            "selection": self.selection,
            "converged": self.converged,
            "final_rel_loss_change": self.final_rel_loss_change,
            "notes": self.notes,
        }


def run_trials(
    settings: Settings,
    request: SweepRequest,
    data: Dataset,
    resume: bool,
    on_result: ResultFn | None,
    step: StepFn,
) -> SweepFound:
    """Ray Tune trials over the resident shards; the best configuration refitted (or its
    trial's best weights)."""
    context = trial_context(request, data, settings)
    step("tuning")
    sweep = request.sweep
    grid = run_tuner(
        sweep,
        context,
        sweep_storage_path(settings),
        request.sweep_id,
        resume=resume,
        on_result=on_result,
    )
    trials = summarise(grid, sweep.metric, sweep.mode)
    best = best_trial(trials, sweep.mode)
    best_cfg = trial_train_config(request.train.to_dict(), best_config_of(grid, best))
    spec = trial_spec(context.spec, best_cfg)
    refit: dict[str, Any] | None = None
    if request.refit:
        step("refitting")
        model, spec, refit = refit_best(best_cfg, spec, best, data, context.use_gpu)
    else:
        model = load_best_model(best.checkpoint, spec)
    found = minibatch_convergence(
        [h for h in best.history if "val_loss" in h] or [best.metrics], sweep.max_epochs
    )
    return SweepFound(
        trials=trials,
        best=best,
        model=model,
        spec=spec,
        train_config=best_cfg,
        metric=sweep.metric,
        mode=sweep.mode,
        train_rows=refit["rows"] if refit else data.train.num_rows,
        solver="minibatch",
        scheduler=sweep.scheduler,
        search=sweep.search,
        converged=found.converged,
        final_rel_loss_change=found.final_rel_loss_change,
        refit=refit,
        notes=[found.warning] if found.warning else [],
        searched=sorted(k for k in best.config),
        selection=f"best {sweep.metric} of the trials ({sweep.scheduler}, {sweep.search})"
        + (", then refitted on train + validation" if refit else ", the best trial's weights"),
    )


def run_lambda_path(request: SweepRequest, data: Dataset, step: StepFn) -> SweepFound:
    """The convex models: every λ of the path, no Tune trials (cluster/lambda_sweep.py)."""
    cfg = request.train
    solver = cfg.resolved_solver
    step(f"λ path ({solver})")
    if solver == "exact":
        trials, spec, fit = ridge_path_trials(cfg, data, request.sweep.space.l2)
        metric, selection = "loo_mse", "exact leave-one-out on train + validation rows"
    else:
        if data.val is None or data.val.num_rows == 0:
            raise KilnError("a sweep needs validation rows to rank λ: use --val-fraction 0.15")
        trials, spec, fit = logistic_path_trials(cfg, data, request.sweep.space.l2)
        metric, selection = "val_loss", "validation log-loss, then refitted on train + validation"
    best = min((t for t in trials if t.best == t.best), key=lambda t: t.best)
    sets = [s for s in (data.train, data.val) if s is not None]
    return SweepFound(
        trials=trials,
        best=best,
        model=fit.model,
        spec=spec,
        train_config=with_l2(cfg, best.config["l2"]),
        metric=metric,
        mode="min",
        train_rows=sum(s.num_rows for s in sets),
        solver=solver,
        scheduler="none",
        search="path",
        converged=fit.converged,
        final_rel_loss_change=fit.final_rel_loss_change,
        notes=[NOT_SEARCHED.format(solver=solver)],
        searched=["l2"],
        selection=selection,
    )


def write_found_reports(found: SweepFound, sweep: SweepConfig, folder: Path) -> dict[str, str]:
    if found.solver == "minibatch":
        return write_reports(found.trials, sweep.metric, sweep.mode, folder)
    return write_path_reports(found.trials, found.metric, folder)


def found_summary(
    request: SweepRequest,
    found: SweepFound,
    record: VersionRecord,
    test_metrics: dict[str, Any],
    elapsed_s: float,
) -> dict[str, Any]:
    """The JSON summary of a registered sweep (its schema: actors/sweeps.py): what the sweep
    chose and registered, with tuning/report.py's trials and heatmap or λ path."""
    path = found.solver != "minibatch"
    return {
        "sweep_id": request.sweep_id,
        "name": request.name,
        "created_at": time.time(),
        "registered": record.ref,
        "best_trial_id": found.best.trial_id,
        "solver": found.solver,
        "scheduler": found.scheduler,
        "search": found.search,
        "selection": found.selection,
        "searched": list(found.searched),
        "notes": list(found.notes),
        "test_metrics": json_safe(test_metrics),
        "elapsed_s": round(elapsed_s, 3),
        **sweep_summary(found.trials, found.metric, found.mode, path=path),
    }


def refit_best(
    cfg: TrainConfig, spec: dict[str, Any], best: TrialSummary, data: Dataset, use_gpu: bool
) -> tuple[KilnModel, dict[str, Any], dict[str, Any]]:
    """The best configuration trained again on train + validation rows (no row held out).

    The sweep fitted every trial on the training rows alone, holding validation rows back to
    rank them; with the configuration chosen those rows are worth training on. The refit runs
    as many epochs as the best trial took to its best validation loss, standardises with the
    statistics of all the rows it trains on, and runs as a Ray task on the cluster (reading
    the same resident shards). Returns the model, its spec and what the lineage records.
    """
    assert data.val is not None  # a sweep always has validation rows (trial_context)
    epochs = int(best.metrics.get("best_epoch", cfg.max_epochs - 1)) + 1
    rows = data.train.num_rows + data.val.num_rows
    refit_spec = spec_with_stats(spec, data.train.stats.merge(data.val.stats))
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(refit_weights)
    weights = ray.get(
        task.remote(
            replace(cfg, epochs=epochs),
            refit_spec,
            data.train.handles + data.val.handles,
            rows,
            use_gpu,
        )
    )
    model = build_model(refit_spec)
    set_standardization(model, refit_spec)
    model.load_state_dict(load_safetensors(weights))
    return model.eval(), refit_spec, {"epochs": epochs, "rows": rows, "trial_id": best.trial_id}


def best_config_of(grid: Any, best: TrialSummary) -> dict[str, Any]:
    """The raw Tune config of the best trial (λ still encoded; trial_train_config decodes)."""
    for result in grid:
        if result.path == best.path:
            return dict(result.config or {})
    raise KilnError(f"the best trial {best.trial_id} is missing from the sweep's results")
