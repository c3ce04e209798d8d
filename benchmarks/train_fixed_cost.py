"""Fixed cost of `kiln train` on a small dataset: where the seconds go before and after epochs.

Runs the same steps as `kiln train --data sklearn:diabetes --json` (default MLP settings) in
this process, timing each: imports, Ray start, shard load, Train fit() start to the first
epoch report, the epochs, evaluation, registration, Ray shutdown. Prints one JSON line.

    python benchmarks/train_fixed_cost.py                    # sklearn:diabetes, defaults
    python benchmarks/train_fixed_cost.py --smoke-test       # 3 epochs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kiln.actors.sources import SourceSpec  # noqa: E402
from kiln.pipeline import train_and_register  # noqa: E402
from kiln.requests import TrainRequest  # noqa: E402
from kiln.runtime import init_ray, registry_for, shutdown_ray  # noqa: E402
from kiln.settings import Settings  # noqa: E402
from kiln.training.config import TrainConfig  # noqa: E402

IMPORTED = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="sklearn:diabetes")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--smoke-test", action="store_true", help="3 epochs")
    args = parser.parse_args()
    epochs = 3 if args.smoke_test else args.epochs
    marks: dict[str, float] = {"imports": IMPORTED}
    settings = Settings(kiln_home=Path(tempfile.mkdtemp(prefix="kiln-fixed-")))
    init_ray(settings)
    registry = registry_for(settings)
    marks["ray_start"] = time.perf_counter()

    def on_step(step: str) -> None:
        marks[step.split(" (")[0]] = time.perf_counter()  # "training (30 epochs)" -> "training"

    def on_epoch(_: dict[str, Any]) -> None:
        marks.setdefault("first_epoch", time.perf_counter())

    request = TrainRequest(
        data=args.data,
        source=SourceSpec(uri=args.data, test_fraction=0.2, val_fraction=0.1),
        train=TrainConfig(epochs=epochs, patience=5),
        name="fixed-cost",
    )
    outcome = train_and_register(settings, request, registry, on_epoch, on_step)
    marks["registered"] = time.perf_counter()
    shutdown_ray()
    marks["shutdown"] = time.perf_counter()
    print(json.dumps(breakdown(marks, outcome.epochs_run)))


def breakdown(marks: dict[str, float], epochs_run: int) -> dict[str, Any]:
    """Seconds per phase from the marks, in the order the phases run."""
    phases = [
        ("imports_s", STARTED, "imports"),
        ("ray_start_s", "imports", "ray_start"),
        ("shard_load_s", "loading shards", "training"),
        ("fit_start_to_first_epoch_s", "training", "first_epoch"),
        ("epochs_s", "first_epoch", "evaluating"),
        ("evaluate_s", "evaluating", "registering"),
        ("register_s", "registering", "registered"),
        ("shutdown_s", "registered", "shutdown"),
    ]
    found: dict[str, Any] = {"epochs_run": epochs_run}
    for name, start, end in phases:
        begin = start if isinstance(start, float) else marks[start]
        found[name] = round(marks[end] - begin, 3)
    found["start_to_first_epoch_s"] = round(marks["first_epoch"] - STARTED, 3)
    found["total_s"] = round(marks["shutdown"] - STARTED, 3)
    return found


if __name__ == "__main__":
    main()
