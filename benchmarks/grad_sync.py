"""Gradient sync of several workers on one node: Kiln's shared-memory average against DDP.

The same fits (`kiln.pipeline.fit`, MLP 32-128-64-10, batch 256, 3 epochs, Adam) on the same
resident shards, at each worker count and `grad_accum`, once with `--grad-sync auto` (shared
memory, training/grad_sync.py) and once with `--grad-sync ddp` (DDP over gloo). Worker counts
above the machine's cores are the oversubscribed case (ranks that wait must leave the CPU to
the ranks they wait for). Each pair must end at the same training loss (same steps); the JSON
line last holds rows/s per arm, `gain` (shared memory over DDP) per pair and the loss of both.

    python benchmarks/grad_sync.py                        # 400k rows; 2, 3, 4 workers
    python benchmarks/grad_sync.py --rows 20000 --workers 2 --epochs 2   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402

from benchmarks.train_throughput import steady_rows_per_s  # noqa: E402
from kiln.actors.shards import load_dataset  # noqa: E402
from kiln.actors.sources import SourceSpec  # noqa: E402
from kiln.pipeline import fit, make_spec  # noqa: E402
from kiln.settings import Settings  # noqa: E402
from kiln.training.config import TrainConfig  # noqa: E402


def arm(data: Any, settings: Settings, **options: Any) -> tuple[float, float, str]:
    """(median rows/s after the first epoch, last training loss, the sync that ran)."""
    cfg = TrainConfig(model="mlp", hidden=[128, 64], batch_size=256, lr=1e-3, **options)
    name = f"bench-sync-{time.monotonic_ns()}"
    _, history = fit(cfg, make_spec(cfg, data.train), data, settings, name)
    return steady_rows_per_s(history), history[-1]["train_loss"], history[-1]["grad_sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", default="2,3,4", help="Worker counts, comma-separated.")
    parser.add_argument("--accum", default="1,8", help="grad_accum values, comma-separated.")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    uri = f"synthetic:classification?rows={args.rows}&features=32&classes=10&seed=0"
    ray.init(
        address="local",
        num_cpus=max(counts) + 2,
        include_dashboard=False,
        log_to_driver=False,
    )
    settings = Settings(kiln_home=Path(tempfile.mkdtemp(prefix="kiln-bench-")))
    out: dict[str, Any] = {"rows": args.rows, "cores": os.cpu_count(), "epochs": args.epochs}
    data = load_dataset(SourceSpec(uri=uri, test_fraction=0.001), max(counts))
    try:
        for workers in counts:
            for accum in [int(a) for a in args.accum.split(",")]:
                common = dict(
                    workers=workers, cpus_per_worker=1, grad_accum=accum, epochs=args.epochs
                )
                shm, shm_loss, ran = arm(data, settings, grad_sync="auto", **common)
                ddp, ddp_loss, _ = arm(data, settings, grad_sync="ddp", **common)
                key = f"{workers}w_{accum}accum"
                out[f"{key}_{ran}_rows_per_s"] = shm
                out[f"{key}_ddp_rows_per_s"] = ddp
                out[f"{key}_gain"] = shm / ddp
                out[f"{key}_loss"] = [shm_loss, ddp_loss]
                print(f"{key}: {ran} {shm:,.0f} rows/s, ddp {ddp:,.0f}", file=sys.stderr)
    finally:
        data.release()
        ray.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
