"""What one `kiln train` or `kiln tune` asks for, built from its options and saved for --resume.

`TrainRequest.from_options` and `SweepRequest.from_options` take a command's options by their
CLI names (`batch_size` for `--batch-size`), check them in the order a user reads them, and
build the configs. The CLI passes its options straight through; the Python client checks its
keywords against the same signatures (cluster/options.py) before it submits a job. Light on
purpose: no torch, no Ray Tune, so the client and `--help` stay fast.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kiln.actors.catalog import validate_name
from kiln.actors.sources import SourceSpec
from kiln.settings import Settings
from kiln.training.config import TrainConfig
from kiln.training.errors import KilnError
from kiln.tuning.config import SweepConfig
from kiln.tuning.space import SearchSpace, default_l2_range, load_space_file


def unique_name(prefix: str) -> str:
    """`prefix-YYYYmmdd-HHMMSS-xxxxxx`: Ray Train and Tune resume a run that reuses a name."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def parse_hidden(hidden: str) -> list[int]:
    try:
        return [int(w) for w in hidden.split(",") if w.strip()]
    except ValueError as exc:
        raise KilnError(
            f'Got "{hidden}" for --hidden. Give widths separated by commas, e.g. 128,64.'
        ) from exc


def parse_features(features: str | None, option: str = "--features") -> tuple[str, ...] | None:
    """`--features a,b` -> ("a", "b"); None keeps every usable column but the label."""
    if features is None:
        return None
    names = tuple(f.strip() for f in features.split(",") if f.strip())
    if not names:
        raise KilnError(f'Got "{features}" for {option}. Give column names, e.g. age,city.')
    return names


def source_from_options(
    data: str,
    label: str | None,
    features: str | None,
    eval_data: str | None,
    test_fraction: float,
    val_fraction: float,
    seed: int,
    categorical: str | None = None,
    missing: str = "impute",
    min_category_count: int = 1,
) -> SourceSpec:
    """The data options as a SourceSpec (no test split when --eval-data is the test set)."""
    return SourceSpec(
        uri=data,
        label=label,
        test_fraction=0.0 if eval_data else test_fraction,
        val_fraction=val_fraction,
        seed=seed,
        features=parse_features(features),
        categorical=parse_features(categorical, "--categorical"),
        missing=missing,
        min_category_count=min_category_count,
    )


def default_model_name(data: str, model: str) -> str:
    stem = data.rsplit("/", 1)[-1].split("?")[0].split(".")[0].replace(":", "-").replace("_", "-")
    return f"{stem.lower()}-{model}"[:64]


def option_names(build: Callable[..., Any]) -> list[str]:
    """The keyword options a `from_options` takes, by their Python names."""
    code = build.__code__
    return list(code.co_varnames[code.co_argcount : code.co_argcount + code.co_kwonlyargcount])


@dataclass(kw_only=True)
class TrainRequest:
    """One `kiln train`: what to read, how to train, where to register. Saved for --resume."""

    data: str
    """A dataset URI, or the name of a dataset loaded with `kiln data load`."""
    source: SourceSpec
    train: TrainConfig
    name: str
    eval_data: str | None = None
    run_name: str = ""

    def __post_init__(self) -> None:
        validate_name(self.name)
        self.run_name = self.run_name or unique_name(self.name)

    @classmethod
    def from_options(
        cls,
        *,
        data: str,
        model: str,
        label: str | None,
        features: str | None,
        categorical: str | None,
        missing: str,
        min_category_count: int,
        workers: int,
        epochs: int | None,
        batch_size: int,
        solver: str,
        optimizer: str,
        lr: float,
        l2: float | None,
        max_iter: int,
        tol: float,
        hidden: str,
        lr_schedule: str,
        test_fraction: float,
        val_fraction: float,
        patience: int | None,
        eval_data: str | None,
        seed: int,
        register: str | None,
        gpu: str,
        cpus_per_worker: int | None,
        grad_accum: int,
        bucket_cap_mb: float | None,
        grad_sync: str,
        pca: float | None,
    ) -> TrainRequest:
        """`kiln train`'s options (by their Python names), checked, as a request."""
        source = source_from_options(
            data,
            label,
            features,
            eval_data,
            test_fraction,
            val_fraction,
            seed,
            categorical,
            missing,
            min_category_count,
        )
        cfg = TrainConfig(
            model=model,
            workers=workers,
            epochs=epochs,
            batch_size=batch_size,
            optimizer=optimizer,
            lr=lr,
            l2=l2,
            solver=solver,
            max_iter=max_iter,
            tol=tol,
            hidden=parse_hidden(hidden),
            lr_schedule=lr_schedule,
            seed=seed,
            gpu=gpu,
            patience=patience,
            cpus_per_worker=cpus_per_worker,
            grad_accum=grad_accum,
            bucket_cap_mb=bucket_cap_mb,
            grad_sync=grad_sync,
            pca=pca,
        )
        return cls(
            data=data,
            source=source,
            train=cfg,
            eval_data=eval_data,
            name=register or default_model_name(data, model),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainRequest:
        raw = json.loads(text)
        source, train = SourceSpec.from_dict(raw["source"]), TrainConfig(**raw["train"])
        return cls(**{**raw, "source": source, "train": train})


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
    refit: bool = False
    """Train the best configuration again on train + validation rows and register that,
    instead of the best trial's own best weights (minibatch sweeps; see `kiln tune --refit`)."""

    def __post_init__(self) -> None:
        validate_name(self.name)
        self.sweep_id = self.sweep_id or unique_name(f"sweep-{self.name}")

    @classmethod
    def from_options(
        cls,
        *,
        data: str,
        model: str,
        label: str | None,
        features: str | None,
        categorical: str | None,
        missing: str,
        min_category_count: int,
        eval_data: str | None,
        trials: int,
        scheduler: str,
        search: str,
        lr: str,
        l2: str | None,
        solver: str,
        batch_size: str | None,
        hidden_width: str | None,
        depth: str | None,
        optimizer: str | None,
        space: str | None,
        epochs: int,
        workers_per_trial: int,
        metric: str,
        grid_points: int,
        base_batch_size: int,
        hidden: str,
        test_fraction: float,
        val_fraction: float,
        seed: int,
        register: str | None,
        refit: bool,
    ) -> SweepRequest:
        """`kiln tune`'s options (by their Python names), checked, as a request."""
        if not 0.0 < val_fraction < 1.0:
            raise KilnError(
                f'Got "{val_fraction}" for --val-fraction. A sweep ranks trials on validation '
                "rows: use a value in (0, 1), e.g. 0.15."
            )
        source = source_from_options(
            data,
            label,
            features,
            eval_data,
            test_fraction,
            val_fraction,
            seed,
            categorical,
            missing,
            min_category_count,
        )
        base = TrainConfig(
            model=model,
            workers=workers_per_trial,
            epochs=epochs,
            batch_size=base_batch_size,
            hidden=parse_hidden(hidden),
            seed=seed,
            solver=solver,
        )
        if space:
            search_space = SearchSpace.from_dict(load_space_file(space), where=space)
        else:
            raw: dict[str, Any] = {"lr": lr, "l2": l2 or default_l2_range(base)}
            tuned = {
                "batch_size": batch_size,
                "hidden_width": hidden_width,
                "depth": depth,
                "optimizer": optimizer,
            }
            raw.update({key: value for key, value in tuned.items() if value})
            search_space = SearchSpace.from_dict(raw)
        sweep = SweepConfig(
            space=search_space,
            scheduler=scheduler,
            search=search,
            num_trials=trials,
            max_epochs=epochs,
            workers_per_trial=workers_per_trial,
            metric=metric,
            grid_points=grid_points,
            seed=seed,
        )
        return cls(
            data=data,
            source=source,
            train=base,
            sweep=sweep,
            eval_data=eval_data,
            name=register or default_model_name(data, model),
            refit=refit,
        )

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


# ------------------------------------------------------------- saved for --resume


def run_record_path(settings: Settings, run_name: str) -> Path:
    return settings.kiln_home.expanduser() / "runs" / f"{run_name}.json"


def read_saved_request(path: Path, kind: str) -> str:
    """The JSON of a request saved under KILN_HOME (a run or a sweep), for --resume."""
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.json"))[-5:]
        raise KilnError(
            f'Got "{path.stem}" for --resume, which is not a {kind} of this KILN_HOME. '
            f"Recent {kind}s: {', '.join(known) or 'none'}."
        )
    return path.read_text()


def load_run_request(settings: Settings, run_name: str) -> TrainRequest:
    return TrainRequest.from_json(read_saved_request(run_record_path(settings, run_name), "run"))


def sweeps_folder(settings: Settings) -> Path:
    return settings.kiln_home.expanduser() / "sweeps"


def load_sweep_request(settings: Settings, sweep_id: str) -> SweepRequest:
    path = sweeps_folder(settings) / f"{sweep_id}.json"
    return SweepRequest.from_json(read_saved_request(path, "sweep"))
