"""Sweep -> evaluate -> register: the path behind `kiln tune` and `Kiln.tune`.

Reads as its steps: make the dataset resident once (load it, or attach to a named one), build
the model spec from its statistics, run the Tune sweep with every trial reading those same
ShardStore actors, write the CSV and PNG reports, train the best configuration again on train +
validation rows (or, with refit off, take the best trial's best weights), evaluate that model on
the test split (or --eval-data), and register it with the sweep's lineage. The request is saved
under KILN_HOME/sweeps before Ray Tune starts, so `kiln tune --resume SWEEP` can finish a sweep
whose driver died.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from actors.catalog import VersionRecord, validate_name
from actors.lineage import code_version, dataset_sha256
from actors.shards import Dataset, FeatureStats, attach_dataset, load_dataset
from actors.sources import SourceSpec
from cluster.pipeline import (
    StepFn,
    evaluate_on,
    load_eval_set,
    make_spec,
    register_model,
    unique_name,
)
from cluster.settings import Settings
from training.checkpoints import BEST_WEIGHTS_FILE
from training.config import TrainConfig
from training.errors import KilnError
from training.models import KilnModel, build_model, set_standardization
from tuning.report import write_reports
from tuning.space import SearchSpace
from tuning.sweep import ResultFn, SweepConfig, TrialSummary, best_trial, run_tuner, summarise
from tuning.trainable import TrialContext, refit_weights, trial_spec, trial_train_config

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SweepRequest:
    """One `kiln tune`: data, base training config, search, registry name. Saved for --resume."""

    data: str
    source: SourceSpec
    train: TrainConfig
    sweep: SweepConfig
    name: str
    eval_data: str | None = None
    sweep_id: str = ""
    refit: bool = True
    """Train the best configuration again on train + validation rows and register that."""

    def __post_init__(self) -> None:
        validate_name(self.name)
        self.sweep_id = self.sweep_id or unique_name(f"sweep-{self.name}")

    def to_json(self) -> str:
        raw = asdict(self)
        raw["sweep"]["space"] = self.sweep.space.to_dict()
        return json.dumps(raw)

    @classmethod
    def from_json(cls, text: str) -> SweepRequest:
        raw = json.loads(text)
        sweep = {**raw["sweep"], "space": SearchSpace.from_dict(raw["sweep"]["space"])}
        return cls(
            **{
                **raw,
                "source": SourceSpec.from_dict(raw["source"]),
                "train": TrainConfig(**raw["train"]),
                "sweep": SweepConfig(**sweep),
            }
        )


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


def sweeps_folder(settings: Settings) -> Path:
    return settings.kiln_home.expanduser() / "sweeps"


def sweep_storage_path(settings: Settings) -> str:
    return f"{settings.storage_uri.rstrip('/')}/sweeps"


def load_sweep_request(settings: Settings, sweep_id: str) -> SweepRequest:
    path = sweeps_folder(settings) / f"{sweep_id}.json"
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.json"))[-5:]
        raise KilnError(
            f'Got "{sweep_id}" for --resume, which is not a sweep of this KILN_HOME. '
            f"Recent sweeps: {', '.join(known) or 'none'}."
        )
    return SweepRequest.from_json(path.read_text())


def sweep_data(request: SweepRequest) -> Dataset:
    """The named dataset if there is one (shared, never reloaded), else load the URI once."""
    if ":" not in request.data and "/" not in request.data:
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
        spec=make_spec(request.train, data.train),
        shards=data.train.handles,
        val_shards=data.val.handles,
        num_train_rows=data.train.num_rows,
        workers_per_trial=request.sweep.workers_per_trial,
        storage_path=f"{sweep_storage_path(settings)}/{request.sweep_id}-train",
    )


def load_trial_model(best: TrialSummary, spec: dict[str, Any]) -> KilnModel:
    """The best trial's best weights (lowest validation loss it saw), from its checkpoint."""
    model = build_model(spec)
    set_standardization(model, spec)
    with best.checkpoint.as_directory() as directory:
        model.load_state_dict(load_file(str(Path(directory) / BEST_WEIGHTS_FILE)))
    return model.eval()


def tune_and_register(
    settings: Settings,
    request: SweepRequest,
    registry: Any,
    resume: bool = False,
    on_result: ResultFn | None = None,
    on_step: StepFn | None = None,
) -> SweepOutcome:
    """The whole sweep, from a dataset to the best trial's registered model version."""
    started = time.perf_counter()
    step = on_step or (lambda _: None)
    record_path = sweeps_folder(settings) / f"{request.sweep_id}.json"
    record_path.parent.mkdir(parents=True, exist_ok=True)
    if not resume:
        record_path.write_text(request.to_json())

    step("loading shards")
    data = sweep_data(request)
    content_hash = ray.remote(num_cpus=0)(dataset_sha256).remote(data.train.source.uri)
    eval_set = load_eval_set(request.eval_data, request.source)
    try:
        context = trial_context(request, data, settings)
        step("tuning")
        grid = run_tuner(
            request.sweep,
            context,
            sweep_storage_path(settings),
            request.sweep_id,
            resume=resume,
            on_result=on_result,
        )
        sweep = request.sweep
        trials = summarise(grid, sweep.metric, sweep.mode)
        best = best_trial(trials, sweep.mode)
        step("reporting")
        artifacts = write_reports(trials, sweep.metric, sweep.mode, record_path.with_suffix(""))
        best_cfg = trial_train_config(request.train.to_dict(), best_config_of(grid, best))
        spec = trial_spec(context.spec, best_cfg)
        refit: dict[str, Any] | None = None
        if request.refit:
            step("refitting")
            model, spec, refit = refit_best(best_cfg, spec, best, data, context.use_gpu)
        else:
            model = load_trial_model(best, spec)
        step("evaluating")
        test_metrics = evaluate_on(model, spec, eval_set or data.test)
        step("registering")
        lineage = {
            "sweep_id": request.sweep_id,
            "trial_id": best.trial_id,
            "trial_config": best.config,
            "sweep": {
                "scheduler": sweep.scheduler,
                "search": sweep.search,
                "metric": sweep.metric,
                "num_trials": len(trials),
                "space": sweep.space.to_dict(),
            },
            "dataset_uri": data.train.source.uri,
            "dataset_sha256": ray.get(content_hash),
            "dataset_name": data.name,
            "code_version": code_version(),
            "eval_data": request.eval_data,
            "test_fraction": data.train.source.test_fraction,
            "val_fraction": data.train.source.val_fraction,
            "split_seed": data.train.source.seed,
            "train_rows": refit["rows"] if refit else data.train.num_rows,
            "test_rows": (eval_set or data.test).num_rows,
            "train_config": best_cfg.to_dict(),
            "best_epoch": best.metrics.get("best_epoch"),
            "refit": refit,
        }
        metrics = {
            **test_metrics,
            f"best_{sweep.metric}": best.best,
            "trial_epochs": best.epochs,
        }
        record = register_model(registry, request.name, model, spec, metrics, lineage)
    finally:
        data.release()
        if eval_set is not None:
            eval_set.release()
    return SweepOutcome(
        sweep_id=request.sweep_id,
        record=record,
        best=best,
        test_metrics=test_metrics,
        trials=trials,
        artifacts=artifacts,
        elapsed_s=time.perf_counter() - started,
    )


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
    epochs = int(best.metrics.get("best_epoch", cfg.epochs - 1)) + 1
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


def spec_with_stats(spec: dict[str, Any], stats: FeatureStats) -> dict[str, Any]:
    """The spec with standardisation statistics from `stats` (as make_spec computes them)."""
    found = {
        **spec,
        "mean": stats.mean.astype(float).tolist(),
        "std": stats.std.astype(float).tolist(),
    }
    if spec["task"] == "regression":
        found.update(target_mean=stats.label_mean, target_std=stats.label_std)
    return found


def best_config_of(grid: Any, best: TrialSummary) -> dict[str, Any]:
    """The raw Tune config of the best trial (λ still encoded; trial_train_config decodes)."""
    for result in grid:
        if result.path == best.path:
            return dict(result.config or {})
    raise KilnError(f"the best trial {best.trial_id} is missing from the sweep's results")
