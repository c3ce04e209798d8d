"""Sweep efficiency: ASHA against a full grid, and shared shards against per-trial loading.

1. The same grid of (lr, λ) configurations on the same resident data, run once to the end
   (scheduler none) and once under ASHA: `asha_best_gap` is ASHA's best validation loss
   relative to the grid's (0.01 = 1% worse), `asha_epoch_fraction` the share of the grid's
   trial-epochs ASHA spent, `asha_wall_fraction` ASHA's wall time over the grid's (targets:
   <= 0.01, <= 0.40 and <= 0.5: the epochs ASHA skips must show on the clock, so a trial's
   fixed cost, its start, its resume after a pause and its checkpoints, must stay small).
   `grid_first_report_s`/`asha_first_report_s`: each sweep's time to its first report (Tune's
   start, the first trial processes' imports, a trial's first epoch), paid once per sweep;
   `asha_wall_fraction_after_start` is the ratio of the two sweeps' times after it.
   `tune_floor_first_report_s`: the same for a grid of trials that only report (Ray Tune's own
   start, which no trial code can remove); with S the start and G the grid's time after it,
   `asha_wall_fraction` <= 0.5 needs S <= G (1 - 2 x asha_epoch_fraction) at the very best.
2. Peak memory (sampled in a thread, above the idle baseline) of 2 concurrent trials reading
   one resident copy of a large synthetic set (train and validation shards), against 2 trials
   that each load the training set themselves (validation shards resident in both arms):
   `shared_memory_ratio` (target <= 0.6). Memory is the summed PSS of this benchmark's process
   tree (driver, raylet with its object store, workers): on a machine shared with other jobs,
   total - available moves with them. Each Tune trial process costs about 380 MB before it
   reads a row (torch and Ray Tune), in both arms, so the ratio is (D + fixed) / (2D + fixed):
   near 1 for a set much smaller than that (2M x 32 is 280 MB), towards 0.5 for large ones.
   The default, 20M x 32 (2.8 GB), is a set where sharing is what matters.

Prints one JSON line last; writes the grid's heatmap and curves under --out.

    python benchmarks/tune_efficiency.py                # digits grid, 20M x 32 memory set
    python benchmarks/tune_efficiency.py --smoke-test   # small, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402

from kiln.actors.shards import load_dataset, load_shards  # noqa: E402
from kiln.actors.sources import SourceSpec, read_shard  # noqa: E402
from kiln.pipeline import make_spec  # noqa: E402
from kiln.training.config import TrainConfig  # noqa: E402
from kiln.training.data import batch_features, encode_labels  # noqa: E402
from kiln.training.loop import RowChunks  # noqa: E402
from kiln.tuning.config import SweepConfig  # noqa: E402
from kiln.tuning.report import write_reports  # noqa: E402
from kiln.tuning.space import SearchSpace  # noqa: E402
from kiln.tuning.trainable import TrialContext  # noqa: E402
from kiln.tuning.tuner import run_tuner, summarise  # noqa: E402


class MemorySampler:
    """Peak memory of this process tree (sum of PSS, shared pages split) while running."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def used() -> int:
        me = psutil.Process()
        total = 0
        for process in [me, *me.children(recursive=True)]:
            try:
                total += process.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemorySampler:
        self.peak = self.used()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def sweep(cfg: SweepConfig, context: TrialContext, storage: str) -> tuple[list[Any], float, float]:
    """(trials, wall seconds, seconds until the first trial's first report reached the driver:
    Tune's start and the first trial processes' start, paid once per sweep)."""
    first: list[float] = []

    def on_result(*_: Any) -> None:
        if not first:
            first.append(time.perf_counter())

    started = time.perf_counter()
    grid = run_tuner(cfg, context, storage, f"bench-{uuid.uuid4().hex[:8]}", on_result=on_result)
    elapsed = time.perf_counter() - started
    return summarise(grid, cfg.metric, cfg.mode), elapsed, first[0] - started


def report_only(config: dict[str, Any], epochs: int) -> None:
    """A trial that imports nothing and trains nothing: it only reports, `epochs` times."""
    from ray import tune

    for epoch in range(epochs):
        tune.report({"val_loss": float(config["x"]) / (epoch + 1)})


def tune_floor(points: int, epochs: int, storage: str) -> dict[str, Any]:
    """Ray Tune's own cost on this machine: a grid of `points` report-only trials, as many at
    once as Kiln's one-worker trials run (`trial_resources`), actors reused. Its time to the
    first report is what any sweep pays before a trial's own code runs."""
    from ray import tune

    from kiln.tuning.tuner import trial_resources

    resources, _ = trial_resources(1)
    first: list[float] = []

    class FirstReport(tune.Callback):
        def on_trial_result(self, *_: Any, **__: Any) -> None:
            if not first:
                first.append(time.perf_counter())

    started = time.perf_counter()
    tune.Tuner(
        tune.with_resources(tune.with_parameters(report_only, epochs=epochs), resources),
        param_space={"x": tune.grid_search(list(range(1, points + 1)))},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"floor-{uuid.uuid4().hex[:8]}",
            storage_path=storage,
            verbose=0,
            callbacks=[FirstReport()],
        ),
    ).fit()
    return {
        "tune_floor_elapsed_s": time.perf_counter() - started,
        "tune_floor_first_report_s": first[0] - started,
    }


def asha_vs_grid(args: argparse.Namespace, storage: str, out: Path) -> dict[str, Any]:
    source = SourceSpec(uri=args.grid_data, val_fraction=0.2)
    data = load_dataset(source, 1)
    base = TrainConfig(model=args.grid_model, workers=1, epochs=args.epochs, batch_size=32)
    context = TrialContext(
        train=base.to_dict(),
        spec=make_spec(base, data.train),
        shards=data.train.handles,
        val_shards=data.val.handles if data.val else [],
        num_train_rows=data.train.num_rows,
    )
    space = SearchSpace.from_dict({"lr": "1e-4:1e-1", "l2": "0,1e-3:10"})
    common = {"space": space, "search": "grid", "max_epochs": args.epochs, "grid_points": 4}
    try:
        full, full_s, full_start = sweep(SweepConfig(scheduler="none", **common), context, storage)
        asha, asha_s, asha_start = sweep(SweepConfig(scheduler="asha", **common), context, storage)
    finally:
        data.release()
    floor = tune_floor(len(full), args.epochs, storage)
    write_reports(full, "val_loss", "min", out / "grid")
    write_reports(asha, "val_loss", "min", out / "asha")
    full_best, asha_best = min(t.best for t in full), min(t.best for t in asha)
    return {
        "grid_trials": len(full),
        "grid_best_val_loss": full_best,
        "asha_best_val_loss": asha_best,
        "asha_best_gap": (asha_best - full_best) / abs(full_best),
        "grid_trial_epochs": sum(t.epochs for t in full),
        "asha_trial_epochs": sum(t.epochs for t in asha),
        "asha_epoch_fraction": sum(t.epochs for t in asha) / sum(t.epochs for t in full),
        "grid_elapsed_s": full_s,
        "asha_elapsed_s": asha_s,
        "asha_wall_fraction": asha_s / full_s,
        "grid_first_report_s": full_start,
        "asha_first_report_s": asha_start,
        # The same ratio from each sweep's first report on: what the epochs ASHA skips save
        # once both sweeps are running (the sweeps' start is not a per-trial cost).
        "asha_wall_fraction_after_start": (asha_s - asha_start) / (full_s - full_start),
        **floor,
        "heatmap": str(out / "grid" / "heatmap.png"),
    }


def own_copy_reader(source: SourceSpec):  # noqa: ANN201 (a callable shipped to trials)
    """What a trial without shared shards does: read and build the training split itself."""

    def read(spec: dict[str, Any]) -> tuple[Any, np.ndarray]:
        batches = read_shard(source, "train", 0, 1)
        x = RowChunks([batch_features(b) for b in batches])
        y = np.concatenate([b.column("label").to_numpy() for b in batches])
        return x, encode_labels(y, spec["classes"])

    return read


def settle(baseline: int, timeout_s: float = 30.0) -> None:
    """Wait (with a deadline) for memory to come back near the baseline between runs."""
    deadline = time.monotonic() + timeout_s
    while MemorySampler.used() > baseline + 200 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.5)


def shared_vs_own_memory(args: argparse.Namespace, storage: str) -> dict[str, Any]:
    uri = f"synthetic:classification?rows={args.rows}&features=32&classes=2&seed=1"
    source = SourceSpec(uri=uri, test_fraction=0.01, val_fraction=0.02)
    base = TrainConfig(model="logistic", solver="adam", workers=1, epochs=1, batch_size=4096)
    cfg = SweepConfig(
        space=SearchSpace.from_dict({"lr": "1e-3:1e-2", "l2": "1e-4:1e-2"}),
        scheduler="none",
        num_trials=2,
        max_epochs=1,
    )
    baseline = MemorySampler.used()
    with MemorySampler() as shared_peak:
        # The splits both arms use (train, val): the test split is no part of the comparison.
        train, val = load_shards(source, "train", 1), load_shards(source, "val", 1)
        context = TrialContext(
            train=base.to_dict(),
            spec=make_spec(base, train),
            shards=train.handles,
            val_shards=val.handles,
            num_train_rows=train.num_rows,
        )
        sweep(cfg, context, storage)
    data_bytes = sum(ray.get([h.num_bytes.remote() for h in train.handles]))
    num_train_rows = train.num_rows
    train.release()
    val.release()
    settle(baseline)
    own_baseline = MemorySampler.used()
    with MemorySampler() as own_peak:
        val = load_shards(source, "val", 1)
        context = TrialContext(
            train=base.to_dict(),
            spec=make_spec(base, val),
            shards=[],
            val_shards=val.handles,
            num_train_rows=num_train_rows,
            read_own_data=own_copy_reader(source),
        )
        sweep(cfg, context, storage)
    val.release()
    shared = shared_peak.peak - baseline
    own = own_peak.peak - own_baseline
    return {
        "memory_rows": args.rows,
        "train_bytes": data_bytes,
        "shared_peak_bytes": shared,
        "own_peak_bytes": own,
        "shared_memory_ratio": shared / own,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true", help="iris grid, 200k rows")
    parser.add_argument("--epochs", type=int, default=18, help="Epochs of a grid trial.")
    parser.add_argument("--rows", type=int, default=20_000_000, help="Rows of the memory set.")
    parser.add_argument("--grid-data", default="sklearn:digits")
    parser.add_argument("--grid-model", default="logistic")
    parser.add_argument("--out", default="benchmarks/results/tune_efficiency")
    parser.add_argument("--num-cpus", type=int, default=4)
    parser.add_argument(
        "--only", choices=("asha", "memory"), help="Run one of the two comparisons."
    )
    args = parser.parse_args()
    if args.smoke_test:
        args.epochs, args.rows, args.grid_data = 4, 200_000, "sklearn:iris"
    out = Path(args.out)
    storage = str(Path(f"/tmp/kiln-bench-{uuid.uuid4().hex[:6]}").resolve())
    # address="local": a fresh Ray of our own, never a cluster another job started here.
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        started = time.perf_counter()
        result: dict[str, Any] = {}
        if args.only != "memory":
            result.update(asha_vs_grid(args, storage, out))
        if args.only != "asha":
            result.update(shared_vs_own_memory(args, storage))
        result["elapsed_s"] = time.perf_counter() - started
    finally:
        ray.shutdown()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
