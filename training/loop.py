"""The per-worker Ray Train loop: read my shards, train with DDP, report and checkpoint.

`train_func(config)` is what `TorchTrainer` runs on every worker. It is handed the ShardStore
handles in its config and reads its own shards through ObjectRefs; it never looks anything up.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from training.config import TrainConfig
from training.data import batches_to_arrays, encode_labels
from training.losses import objective
from training.models import build_model, set_standardization

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.json"


@dataclass(kw_only=True)
class LoopConfig:
    """Everything one worker needs; built by the driver, parsed first thing on the worker."""

    train: TrainConfig
    spec: dict[str, Any]
    shards: list[Any]
    """ShardStore actor handles; worker r reads shards r, r+W, r+2W, ..."""
    num_train_rows: int
    progress: Any = None
    """Optional queue (ray.util.queue.Queue) that rank 0 feeds one metrics dict per epoch."""

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> LoopConfig:
        return cls(
            train=TrainConfig(**config["train"]),
            spec=config["spec"],
            shards=config["shards"],
            num_train_rows=config["num_train_rows"],
            progress=config.get("progress"),
        )


def read_worker_shards(
    shards: list[Any], rank: int, world_size: int, spec: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Fetch this rank's shards: the actors hand back ObjectRefs, the batches come zero-copy."""
    xs, ys = [], []
    for handle in shards[rank::world_size]:
        refs = ray.get(handle.batch_refs.remote())
        _, x, y = batches_to_arrays(ray.get(refs))
        xs.append(x)
        ys.append(y)
    x = np.concatenate(xs) if len(xs) > 1 else xs[0]
    y = np.concatenate(ys) if len(ys) > 1 else ys[0]
    if spec["task"] == "classification":
        return x, encode_labels(y, spec["classes"])
    return x, y.astype(np.float32)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        # λ lives in the loss (DESIGN.md), so AdamW's decoupled decay stays off.
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    return torch.optim.Adam(params, lr=cfg.lr)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(cfg.epochs // 3, 1))
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)


def run_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: np.ndarray,
    y: np.ndarray,
    cfg: LoopConfig,
    epoch: int,
    rank: int,
    device: torch.device,
) -> torch.Tensor:
    """One pass over this worker's rows; returns [loss·rows, correct, rows] for the all-reduce."""
    task = cfg.spec["task"]
    perm = np.random.default_rng((cfg.train.seed, epoch, rank)).permutation(len(x))
    totals = torch.zeros(3, dtype=torch.float64)
    model.train()
    joinable = isinstance(model, nn.parallel.DistributedDataParallel)
    # Join lets ranks with one batch more or less finish the epoch without hanging DDP.
    with nn.parallel.distributed.Join([cast(Any, model)]) if joinable else contextlib.nullcontext():
        for start in range(0, len(perm), cfg.train.batch_size):
            idx = perm[start : start + cfg.train.batch_size]
            xb = torch.from_numpy(x[idx]).to(device)  # (B, F)
            yb = torch.from_numpy(y[idx]).to(device)  # (B,)
            outputs = model(xb)
            loss = objective(model, outputs, yb, task, cfg.train.l2, cfg.num_train_rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            totals[0] += float(loss.detach()) * len(idx)
            totals[2] += len(idx)
            if task == "classification":
                totals[1] += float((outputs.argmax(1) == yb).sum())
    return totals


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def worker_identity(rows: int, device: torch.device) -> list[dict[str, Any]]:
    """Who ran: one entry per rank, gathered so the driver can check the run really spread."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "rows": rows, "device": str(device)}
    if not (dist.is_available() and dist.is_initialized()):
        return [me]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, me)
    return gathered


def save_checkpoint(model: nn.Module, epoch: int, directory: str) -> ray.train.Checkpoint:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(Path(directory) / WEIGHTS_FILE))
    (Path(directory) / STATE_FILE).write_text(json.dumps({"epoch": epoch}))
    return ray.train.Checkpoint.from_directory(directory)


def restore_checkpoint(model: nn.Module) -> int:
    """Load the latest checkpoint if Ray Train resumed us; returns the first epoch to run."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        model.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE)))
        return json.loads((Path(directory) / STATE_FILE).read_text())["epoch"] + 1


def train_func(config: dict[str, Any]) -> None:
    """Entry point of every Train worker."""
    cfg = LoopConfig.from_dict(config)
    torch.manual_seed(cfg.train.seed)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    x, y = read_worker_shards(cfg.shards, rank, world_size, cfg.spec)
    device = ray.train.torch.get_device()

    base_model = build_model(cfg.spec)
    set_standardization(base_model, cfg.spec["mean"], cfg.spec["std"])
    start_epoch = restore_checkpoint(base_model)
    model = ray.train.torch.prepare_model(base_model)  # DDP-wrapped when world_size > 1
    optimizer = make_optimizer(model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    workers = worker_identity(len(x), device)

    for epoch in range(start_epoch, cfg.train.epochs):
        totals = all_reduce_sum(run_epoch(model, optimizer, x, y, cfg, epoch, rank, device))
        scheduler.step()
        metrics = {
            "epoch": epoch,
            "train_loss": float(totals[0] / totals[2]),
            "rows_seen": int(totals[2]),
            "num_workers": world_size,
            "workers": workers,
        }
        if cfg.spec["task"] == "classification":
            metrics["train_accuracy"] = float(totals[1] / totals[2])
        if rank == 0 and cfg.progress is not None:
            cfg.progress.put_nowait({k: v for k, v in metrics.items() if k != "workers"})
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:
                checkpoint = save_checkpoint(base_model, epoch, directory)
            ray.train.report(metrics, checkpoint=checkpoint)
