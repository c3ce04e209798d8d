"""Training throughput: Kiln's ShardStore feed against plain PyTorch and Ray Data.

In one run, on the same synthetic data, model and cores, measures steady-state samples/s of:
  - Kiln with 1 and 2 Ray Train workers reading resident ShardStore actors (ObjectRefs),
  - a plain single-process PyTorch loop using every core (what a user would write first),
  - the same Train loop (2 workers) fed by Ray Data's `iter_torch_batches`,
and the shard actors' resident memory against the raw Arrow bytes. Prints one JSON line last.

    python benchmarks/train_throughput.py               # 2M rows x 32 features
    python benchmarks/train_throughput.py --smoke-test  # 20k rows, for CI
    python benchmarks/train_throughput.py --rows 5000000 --shards 4 --epochs 1 --only-kiln
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from actors.shards import ShardStore, load_dataset  # noqa: E402
from actors.sources import SourceSpec  # noqa: E402
from cluster.pipeline import fit, make_spec  # noqa: E402
from cluster.settings import Settings  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import encode_labels  # noqa: E402
from training.loop import make_optimizer, run_epoch, shard_batches  # noqa: E402
from training.models import build_model, set_standardization  # noqa: E402


class PeakMemory:
    """Samples the machine's used memory in a thread; `peak_bytes` is the rise above the start."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s, self.start = interval_s, psutil.virtual_memory().used
        self.peak, self._stop = self.start, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, psutil.virtual_memory().used)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_bytes(self) -> int:
        return self.peak - self.start


def plasma_bytes() -> int:
    from ray._private.internal_api import memory_summary

    # The address matters: other Ray instances may run on this machine (CI, a test session).
    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    found = re.search(r"Plasma memory usage (\d+) MiB", summary)
    return int(found.group(1)) * 2**20 if found else 0


def steady_rows_per_s(history: list[dict[str, Any]]) -> float:
    """Median of the per-epoch throughput, the first (warm-up) epoch left out when possible."""
    rates = [m["rows_per_s"] for m in history]
    return float(statistics.median(rates[1:] if len(rates) > 1 else rates))


def kiln_run(cfg: TrainConfig, data, settings: Settings, extra=None, datasets=None) -> float:
    spec = make_spec(cfg, data.train)
    name = f"bench-{cfg.workers}w-{time.monotonic_ns()}"
    _, history = fit(cfg, spec, data, settings, name, extra_loop_config=extra, datasets=datasets)
    return steady_rows_per_s(history)


def plain_torch_rows_per_s(data, cfg: TrainConfig, threads: int) -> float:
    """The loop a user writes without Ray: one process, all cores to torch, same steps."""
    torch.set_num_threads(threads)
    _, x, y = data.train.read_arrays()
    spec = make_spec(cfg, data.train)
    y = encode_labels(y, spec["classes"])
    model = build_model(spec)
    set_standardization(model, spec)
    optimizer = make_optimizer(model, cfg)
    from training.loop import LoopConfig

    loop_cfg = LoopConfig(train=cfg, spec=spec, shards=[], num_train_rows=len(x))
    rates = []
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        batches = shard_batches(x, y, cfg.batch_size, (0, epoch, 0), torch.device("cpu"))
        rows = run_epoch(model, optimizer, batches, loop_cfg, torch.device("cpu"))[2]
        rates.append(float(rows) / (time.perf_counter() - started))
    torch.set_num_threads(1)
    return float(statistics.median(rates[1:] if len(rates) > 1 else rates))


def raydata_dataset(data):
    """The same training rows as a Ray Data dataset with a tensor column."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    _, x, y = data.train.read_arrays()
    table = pa.table({"features": ArrowTensorArray.from_numpy(np.ascontiguousarray(x)), "label": y})
    return ray.data.from_arrow(table)


def shard_memory(source: SourceSpec, num_shards: int) -> dict[str, float]:
    """Resident bytes of the shards: object store + actors' private memory above an empty one."""
    empty = ShardStore.options(num_cpus=0).remote(source, "val", 0, 1)  # type: ignore[attr-defined]
    ray.get(empty.ready.remote())
    baseline = ray.get(empty.memory_bytes.remote())["private"]
    ray.kill(empty)
    before = plasma_bytes()
    data = load_dataset(source, num_shards)
    raw = sum(ray.get([h.num_bytes.remote() for h in data.train.handles]))
    private = [ray.get(h.memory_bytes.remote())["private"] for h in data.train.handles]
    # Object store bytes, plus what each actor holds privately beyond an empty ShardStore.
    resident = (plasma_bytes() - before) + sum(max(p - baseline, 0) for p in private)
    data.release()
    return {"raw_bytes": raw, "resident_bytes": resident, "memory_vs_raw": resident / raw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--only-kiln", action="store_true", help="Kiln 2 workers and memory only")
    parser.add_argument("--smoke-test", action="store_true", help="20k rows, 2 epochs")
    args = parser.parse_args()
    if args.smoke_test:
        args.rows, args.epochs = 20_000, 2

    uri = f"synthetic:classification?rows={args.rows}&features={args.features}&classes=10&seed=0"
    source = SourceSpec(uri=uri, test_fraction=0.001)
    cores = os.cpu_count() or 1
    ray.init(
        address="local", num_cpus=max(4, cores + 2), include_dashboard=False, log_to_driver=False
    )
    settings = Settings(kiln_home=Path(tempfile.mkdtemp(prefix="kiln-bench-")))
    cfg = dict(
        model="mlp", hidden=[128, 64], epochs=args.epochs, batch_size=args.batch_size, lr=1e-3
    )
    out: dict[str, Any] = {
        "rows": args.rows,
        "features": args.features,
        "cores": cores,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
    }

    with PeakMemory() as peak:
        started = time.perf_counter()
        data = load_dataset(source, args.shards)
        out["load_s"] = time.perf_counter() - started
        started = time.perf_counter()
        out["kiln_2w_rows_per_s"] = kiln_run(TrainConfig(workers=2, **cfg), data, settings)
        out["kiln_2w_fit_s"] = time.perf_counter() - started
    out["peak_memory_bytes"] = peak.peak_bytes
    if not args.only_kiln:
        out["kiln_1w_rows_per_s"] = kiln_run(TrainConfig(workers=1, **cfg), data, settings)
        out["torch_rows_per_s"] = plain_torch_rows_per_s(data, TrainConfig(**cfg), threads=cores)
        out["raydata_2w_rows_per_s"] = kiln_run(
            TrainConfig(workers=2, **cfg),
            data,
            settings,
            extra={"feed": "raydata"},
            datasets={"train": raydata_dataset(data)},
        )
        out["kiln_1w_vs_torch"] = out["kiln_1w_rows_per_s"] / out["torch_rows_per_s"]
        out["kiln_2w_vs_torch"] = out["kiln_2w_rows_per_s"] / out["torch_rows_per_s"]
        out["shards_vs_raydata"] = out["kiln_2w_rows_per_s"] / out["raydata_2w_rows_per_s"]
    data.release()
    out.update(shard_memory(source, args.shards))
    ray.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
