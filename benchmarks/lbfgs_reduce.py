"""Full-batch L-BFGS for logistic regression: Kiln's reduce over the shard actors against DDP.

Both minimise the same objective on the same resident shards: mean softmax cross-entropy plus
(λ/2m)|W|², standardised features, float64, stopping when no gradient component exceeds 1e-6.
  - Kiln (`kiln train --model logistic`): scipy's L-BFGS on the driver; each function evaluation
    is one `loss_sums` call on every ShardStore actor (numpy where the rows already are).
  - DDP: a Ray Train TorchTrainer with one worker per shard; each worker copies its shard into a
    tensor, and all run `torch.optim.LBFGS` (strong Wolfe) in lockstep on the loss and gradient
    all-reduced over gloo.
Reports the wall time from the call to the weights (Ray Train's start-up included, as a user
pays it), the solve alone, the function evaluations and the final objective of each, and
prints one JSON line last.

    python benchmarks/lbfgs_reduce.py [--rows 1000000] [--features 32] [--classes 10]
    python benchmarks/lbfgs_reduce.py --smoke-test
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402

from kiln.actors.shards import load_dataset  # noqa: E402
from kiln.actors.sources import SourceSpec  # noqa: E402
from kiln.pipeline import solve_convex  # noqa: E402
from kiln.training.config import TrainConfig  # noqa: E402

TOL = 1e-6


def ddp_lbfgs(config: dict[str, Any]) -> None:
    """One Ray Train worker: its shard as float64 tensors, L-BFGS on all-reduced sums."""
    import torch
    import torch.distributed as dist
    from torch.nn import functional as F

    from kiln.training.data import batches_to_arrays, encode_labels, fetch_shard_batches

    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    _, x, y = batches_to_arrays(fetch_shard_batches(config["shards"][rank]))
    mean, std = np.asarray(config["mean"]), np.asarray(config["std"])
    xs = torch.from_numpy((x.astype(np.float64) - mean) / std)
    ys = torch.from_numpy(encode_labels(y, config["classes"]).astype(np.int64))
    rows, lam = float(config["rows"]), float(config["l2"])
    weight = torch.zeros(len(config["classes"]), xs.shape[1], dtype=torch.float64)
    bias = torch.zeros(len(config["classes"]), dtype=torch.float64)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=1000,
        tolerance_grad=TOL,
        tolerance_change=0.0,
        history_size=10,
        line_search_fn="strong_wolfe",
    )
    evaluations = [0]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        local = F.cross_entropy(xs @ weight.T + bias, ys, reduction="sum") / rows
        local.backward()
        assert weight.grad is not None and bias.grad is not None
        packed = torch.cat([local.detach().reshape(1), weight.grad.flatten(), bias.grad])
        dist.all_reduce(packed)
        weight.grad.copy_(packed[1 : 1 + weight.numel()].view_as(weight))
        bias.grad.copy_(packed[1 + weight.numel() :])
        weight.grad.add_(weight.detach(), alpha=lam / rows)
        evaluations[0] += 1
        return packed[0] + lam / (2 * rows) * weight.detach().pow(2).sum()

    started = time.perf_counter()
    optimizer.step(closure)
    solve_s = time.perf_counter() - started
    objective = float(closure())
    found = {"solve_s": solve_s, "evaluations": evaluations[0], "objective": objective}
    # Ray Train keeps the metrics of the last report that carried a checkpoint (RAY_NOTES).
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "found.json").write_text(json.dumps(found))
        checkpoint = ray.train.Checkpoint.from_directory(folder) if rank == 0 else None
        ray.train.report(found, checkpoint=checkpoint)


def run_ddp(data: Any, spec: dict[str, Any], l2: float, storage: str) -> dict[str, Any]:
    from ray.train.torch import TorchTrainer

    handles = data.train.handles
    started = time.perf_counter()
    trainer = TorchTrainer(
        ddp_lbfgs,
        train_loop_config={
            "shards": handles,
            "mean": spec["mean"],
            "std": spec["std"],
            "classes": spec["classes"],
            "rows": data.train.num_rows,
            "l2": l2,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=len(handles)),
        run_config=ray.train.RunConfig(name=f"lbfgs-ddp-{os.getpid()}", storage_path=storage),
    )
    metrics = trainer.fit().metrics or {}
    return {
        "wall_s": round(time.perf_counter() - started, 2),
        "solve_s": round(float(metrics["solve_s"]), 3),
        "evaluations": int(metrics["evaluations"]),
        "objective": float(metrics["objective"]),
    }


def run_kiln(data: Any, cfg: TrainConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    started = time.perf_counter()
    trained = solve_convex(cfg, data)
    wall = time.perf_counter() - started
    return {
        "wall_s": round(wall, 2),
        "solve_s": round(wall, 3),  # no start-up to leave out: the actors already hold the rows
        "iterations": trained.iterations,
        "objective": float(trained.train_loss or float("nan")),
        "converged": trained.converged,
    }, trained.spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--smoke-test", action="store_true", help="20k rows")
    args = parser.parse_args()
    rows = 20_000 if args.smoke_test else args.rows
    uri = (
        f"synthetic:classification?rows={rows}&features={args.features}"
        f"&classes={args.classes}&seed=0"
    )
    ray.init(num_cpus=max(args.shards, os.cpu_count() or 1), include_dashboard=False)
    data = load_dataset(SourceSpec(uri=uri, test_fraction=0.0), args.shards)
    try:
        cfg = TrainConfig(model="logistic", workers=args.shards, solver="lbfgs", tol=TOL)
        kiln, spec = run_kiln(data, cfg)
        ddp = run_ddp(data, spec, cfg.penalty, f"/tmp/kiln-lbfgs-{os.getpid()}")
    finally:
        data.release()
        ray.shutdown()
    print(
        json.dumps(
            {
                "rows": rows,
                "features": args.features,
                "classes": args.classes,
                "shards": args.shards,
                "kiln_actor_reduce": kiln,
                "ddp_ray_train": ddp,
                "wall_ddp_over_kiln": round(ddp["wall_s"] / kiln["wall_s"], 2),
                "solve_ddp_over_kiln": round(ddp["solve_s"] / kiln["solve_s"], 2),
                "objective_abs_diff": abs(kiln["objective"] - ddp["objective"]),
            }
        )
    )


if __name__ == "__main__":
    main()
