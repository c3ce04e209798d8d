"""The per-worker Ray Train loop: read my shards, train with DDP, validate, report, checkpoint.

`train_func(config)` is what `TorchTrainer` runs on every worker. It is handed the ShardStore
handles in its config and reads its own shards through ObjectRefs; it never looks anything up.
Every rank reports every epoch (Ray Train V2 requires it); rank 0 attaches the checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.util.queue import Full
from safetensors.torch import load as load_safetensors
from torch import nn
from torch.nn import functional as F

from kiln.training.checkpoints import (
    LoopState,
    TrainingState,
    load_training_checkpoint,
    save_training_checkpoint,
    state_tensors,
)
from kiln.training.compress import distillation_loss
from kiln.training.config import TrainConfig
from kiln.training.data import (
    batch_inputs,
    batch_labels,
    batches_to_arrays,
    encode_labels,
    fetch_shard_batches,
)
from kiln.training.grad_sync import (
    SharedMemoryGradSync,
    broadcast_from_rank0,
    choose_grad_sync,
    open_shared_grad_sync,
)
from kiln.training.losses import l2_penalty, objective
from kiln.training.metrics import metrics_from_confusion, regression_metrics_from_sums
from kiln.training.models import build_model, num_inputs, set_standardization
from kiln.training.tabular import Encoding

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


@dataclass(kw_only=True)
class LoopConfig:
    """Everything one worker needs; built by the driver, parsed first thing on the worker."""

    train: TrainConfig
    spec: dict[str, Any]
    shards: list[Any]
    """ShardStore actor handles; worker r reads shards r, r+W, r+2W, ..."""
    num_train_rows: int
    val_shards: list[Any] = field(default_factory=list)
    progress: Any = None
    """Optional queue (ray.util.queue.Queue) that rank 0 feeds one metrics dict per epoch."""
    feed: str = "shards"
    """shards: ShardStore actors; raydata: Ray Data's iter_torch_batches (for comparisons)."""
    init_weights: bytes | None = None
    """Safetensors bytes of the weights to start from (fine-tuning a pruned model)."""
    distill: dict[str, float] | None = None
    """{"temperature": T, "alpha": A}: train against a teacher's softened outputs as well."""
    teacher: nn.Module | None = field(default=None, repr=False)
    """The teacher of a distillation, loaded on this worker (`train_func`'s argument)."""

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> LoopConfig:
        return cls(**{**config, "train": TrainConfig(**config["train"])})


# ----------------------------------------------------------------------------- data


class RowChunks:
    """Rows spread over several read-only arrays (the object store's record batches), indexed
    like one (N, ...) array for what the loop does: sorted row gathers and slices.

    Concatenating the batches would give every reader a private copy of the whole split; with
    this view, concurrent Tune trials on one node all map the same object-store pages.
    """

    def __init__(self, chunks: list[np.ndarray]) -> None:
        self.chunks = chunks
        self.starts = np.cumsum([0] + [len(c) for c in chunks])
        self.shape = (int(self.starts[-1]), *chunks[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        rows = np.asarray(index)  # sorted, as shard_batches and validation_sums ask
        # rows[bounds[c]:bounds[c + 1]] fall in chunk c; each run is gathered straight into
        # the output. Profiled: masking `which == c` per chunk and concatenating the parts
        # took 15% of a one-thread epoch; this is one searchsorted and a take per chunk hit.
        bounds = np.searchsorted(rows, self.starts)
        out = np.empty((len(rows), *self.shape[1:]), self.chunks[0].dtype)
        for c in np.flatnonzero(bounds[1:] > bounds[:-1]).tolist():
            lo, hi = bounds[c], bounds[c + 1]
            np.take(self.chunks[c], rows[lo:hi] - self.starts[c], axis=0, out=out[lo:hi])
        return out


def read_worker_shards(
    shards: list[Any],
    rank: int,
    world_size: int,
    spec: dict[str, Any],
    zero_copy: bool = False,
) -> tuple[Any, Any]:
    """This rank's rows: features from the object store, labels encoded.

    `zero_copy` keeps features and labels as RowChunks views over the shared batches instead
    of private arrays (one copy per reader): what concurrent Tune trials on one node want.
    Labels that are already class indices 0..K-1 stay views too; others are encoded per batch.
    Inputs of a table with categorical columns are built per batch (numbers and slots), so
    each reader holds its own copy of those.
    """
    encoding = Encoding.from_spec(spec)
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for handle in shards[rank::world_size]:
        batches = fetch_shard_batches(handle)
        if zero_copy:
            xs.extend(batch_inputs(b, encoding) for b in batches)
            ys.extend(batch_labels(b) for b in batches)
            continue
        _, x_part, y_part = batches_to_arrays(batches, encoding)
        xs.append(x_part)
        ys.append(y_part)
    if not xs:
        return np.zeros((0, num_inputs(spec)), np.float32), np.zeros(0)
    if zero_copy:
        return RowChunks(xs), RowChunks([label_targets(y, spec) for y in ys])
    x = np.concatenate(xs) if len(xs) > 1 else xs[0]
    return x, label_targets(np.concatenate(ys) if len(ys) > 1 else ys[0], spec)


def label_targets(y: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Class indices (int64) or float32 targets; the array itself when it already is one."""
    if spec["task"] != "classification":
        return y.astype(np.float32, copy=False)
    classes = spec["classes"]
    if y.dtype == np.int64 and classes == list(range(len(classes))):
        return y  # labels 0..K-1 are their own indices
    return encode_labels(y, classes)


def shard_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    seed: tuple,
    device: torch.device,
    steps: int | None = None,
) -> Batches:
    """Shuffled minibatches of resident arrays, deterministic from (seed, epoch, rank).

    `steps`: cut the rows into exactly that many batches of near-equal size (sizes differ by
    at most one row) instead of `batch_size`-row ones, so every DDP rank takes the same number
    of steps whatever its row count; a rank with fewer rows than steps gets empty batches.
    """
    # The same order as Generator.permutation(len(x)), in int32 where it fits: the index is
    # the one array per row a zero-copy reader still owns (160 MB at 20M rows in int64).
    perm = np.arange(len(x), dtype=np.int32 if len(x) < 2**31 else np.int64)
    np.random.default_rng(seed).shuffle(perm)
    if steps is None:
        bounds = [*range(0, len(perm), batch_size), len(perm)]
    else:
        bounds = (np.arange(steps + 1) * len(perm) // max(steps, 1)).tolist()
    for start, stop in zip(bounds, bounds[1:], strict=False):
        idx = np.sort(perm[start:stop])  # sorted gathers read memory in order
        yield torch.from_numpy(x[idx]).to(device), torch.from_numpy(y[idx]).to(device)


def steps_per_epoch(rows_per_rank: list[int], batch_size: int) -> int:
    """Optimizer micro-batches every rank takes per epoch: enough for the largest rank to see
    all its rows in batches of at most `batch_size` (the others' batches are smaller)."""
    return max(1, -(-max(rows_per_rank) // batch_size))


def raydata_batches(batch_size: int, task: str, device: torch.device) -> Batches:
    shard = ray.train.get_dataset_shard("train")
    label_dtype = torch.int64 if task == "classification" else torch.float32
    for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
        yield batch["features"].float(), batch["label"].to(label_dtype)


# ----------------------------------------------------------------------------- steps


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    # The fused kernels update every parameter in one call: measured 3x faster per step than
    # the default per-tensor loop on CPU for the MLP of benchmarks/train_throughput.py.
    if cfg.optimizer == "adamw":
        # λ lives in the loss (DESIGN.md), so AdamW's decoupled decay stays off.
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, fused=True)
    return torch.optim.Adam(params, lr=cfg.lr, fused=True)


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.max_epochs)
    if cfg.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(cfg.max_epochs // 3, 1))
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 mixed precision on CUDA; full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    cfg: LoopConfig,
    device: torch.device,
    equal_steps: bool = False,
    sync: Callable[[], None] | None = None,
) -> torch.Tensor:
    """One pass over this worker's rows; returns [loss·rows, correct, rows] for the all-reduce.

    Every `grad_accum` micro-batches make one optimizer step (and one gradient sync: DDP's, or
    `sync`, training/grad_sync.py's shared-memory average, called before each step).
    `equal_steps`: every DDP rank is known to take the same number of micro-batches (the
    shard feed's `steps`); otherwise, under DDP, Join lets ranks with a batch more or less
    finish without hanging, at the price of a collective in every forward (measured: 8
    accumulated micro-batches of the benchmark's MLP on 2 ranks, 722k rows/s bare, 515k
    under Join).
    """
    totals = np.zeros(3)  # summed in numpy: a tensor's item assignment per batch costs more
    model.train()
    join = isinstance(model, nn.parallel.DistributedDataParallel) and not equal_steps
    with nn.parallel.distributed.Join([cast(Any, model)]) if join else contextlib.nullcontext():
        for group in grouped(batches, cfg.train.grad_accum):
            totals += accumulated_step(model, optimizer, group, cfg, device, sync)
    return torch.from_numpy(totals)


def grouped(batches: Batches, size: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Consecutive micro-batches in lists of `size` (the last one may be shorter)."""
    group: list[tuple[torch.Tensor, torch.Tensor]] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def accumulated_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    group: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: LoopConfig,
    device: torch.device,
    sync: Callable[[], None] | None = None,
) -> tuple[float, float, float]:
    """One optimizer step over a group of micro-batches: its [loss·rows, correct, rows].

    Each micro-batch's loss is weighted by its share of the group's rows, so the summed
    gradients are those of one batch of all the rows (the λ term, in every micro-batch's loss,
    adds up to itself once). Under DDP only the last backward all-reduces: the others run
    inside `no_sync()`, forward included, as DDP requires. An empty micro-batch (a rank with
    fewer rows than steps) backpropagates zeros, so the rank still joins the gradient sync.
    """
    task = cfg.spec["task"]
    rows = sum(len(yb) for _, yb in group)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    loss_sum = correct = 0.0
    optimizer.zero_grad(set_to_none=True)
    for i, (xb, yb) in enumerate(group):  # xb (B, F), yb (B,)
        last = i == len(group) - 1
        with contextlib.nullcontext() if last or not ddp else cast(Any, model).no_sync():
            with autocast(device):
                outputs = model(xb)
                if not len(yb):
                    (outputs.sum() * 0.0).backward()
                    continue
                loss = step_loss(model, outputs.float(), xb, yb, cfg)
            (loss * (len(yb) / rows)).backward()
        loss_sum += float(loss.detach()) * len(yb)
        if task == "classification":
            correct += float((outputs.argmax(1) == yb).sum())
    if sync is not None:
        sync()
    optimizer.step()
    return loss_sum, correct, float(rows)


def step_loss(
    model: nn.Module, outputs: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor, cfg: LoopConfig
) -> torch.Tensor:
    """J of the batch, or (distilling) the distillation loss plus the same L2 penalty."""
    target_std = cfg.spec.get("target_std", 1.0)
    task = cfg.spec["task"]
    if cfg.teacher is None or cfg.distill is None:
        return objective(
            model, outputs, yb, task, cfg.train.penalty, cfg.num_train_rows, target_std
        )
    with torch.no_grad():
        taught = cfg.teacher(xb).float()
    loss = distillation_loss(
        outputs, taught, yb, task, cfg.distill["temperature"], cfg.distill["alpha"], target_std
    )
    if cfg.train.penalty > 0:
        loss = loss + l2_penalty(model, cfg.train.penalty, cfg.num_train_rows)
    return loss


@torch.inference_mode()
def validation_sums(
    model: nn.Module, x: np.ndarray, y: np.ndarray, spec: dict[str, Any], device: torch.device
) -> torch.Tensor:
    """Sums that all-reduce into exact validation metrics: [loss·n, n, confusion...] or
    [loss·n, n, SSE, Σy, Σy²]. Runs on the unwrapped model, so no DDP collectives."""
    model.eval()
    classify = spec["task"] == "classification"
    k = len(spec["classes"]) if classify else 0
    sums = torch.zeros(2 + (k * k if classify else 3), dtype=torch.float64)
    for start in range(0, len(x), 8192):
        xb = torch.from_numpy(np.array(x[start : start + 8192])).to(device)
        yb = torch.from_numpy(np.array(y[start : start + 8192])).to(device)
        with autocast(device):
            out = model(xb).float()
        sums[1] += len(yb)
        if classify:
            sums[0] += float(F.cross_entropy(out, yb, reduction="sum"))
            flat = (yb * k + out.argmax(1)).cpu()
            sums[2:] += torch.bincount(flat, minlength=k * k).double()
        else:
            pred, target = out.squeeze(-1).double(), yb.double()
            sums[0] += float(0.5 * ((pred - target) ** 2).sum())
            sums[2] += float(((pred - target) ** 2).sum())
            sums[3] += float(target.sum())
            sums[4] += float((target**2).sum())
    return sums


def validation_metrics(sums: torch.Tensor, spec: dict[str, Any]) -> dict[str, float]:
    n = float(sums[1])
    if spec["task"] == "classification":
        k = len(spec["classes"])
        found = metrics_from_confusion(sums[2:].view(k, k).long().numpy())
    else:
        found = regression_metrics_from_sums(n, float(sums[2]), float(sums[3]), float(sums[4]))
    return {"val_loss": float(sums[0]) / max(n, 1.0), **{f"val_{k}": v for k, v in found.items()}}


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def worker_identity(rows: int, device: torch.device) -> list[dict[str, Any]]:
    """Who ran: one entry per rank, gathered so the driver can check the run really spread."""
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "rows": rows,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    if not (dist.is_available() and dist.is_initialized()):
        return [me]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, me)
    return gathered


def update_early_stopping(state: LoopState, score: float, epoch: int) -> bool:
    """Track the best score; returns True when the weights improved."""
    state.epoch = epoch
    if score < state.best_score:
        state.best_score, state.best_epoch, state.epochs_since_best = score, epoch, 0
        return True
    state.epochs_since_best += 1
    return False


# ----------------------------------------------------------------------------- entry


def worker_threads(cfg: TrainConfig, local_workers: int) -> int:
    """Torch threads of one worker: the CPUs it reserved (`cpus_per_worker`, else what Ray
    assigned it), at most its node's cores shared among the workers there. Ray may count
    more logical CPUs than the node has cores; threads beyond the cores only contend."""
    reserved = cfg.cpus_per_worker or ray.get_runtime_context().get_assigned_resources().get(
        "CPU", 1
    )
    cores = max(1, (os.cpu_count() or 1) // max(1, local_workers))
    return max(1, min(int(reserved), cores))


def train_func(config: dict[str, Any], teacher: nn.Module | None = None) -> None:
    """Entry point of every Train worker. `teacher`: the model a distillation learns from,
    loaded on this worker by the caller (cluster/variants.py)."""
    cfg = LoopConfig.from_dict(config)
    cfg.teacher = teacher.eval() if teacher is not None else None
    context = ray.train.get_context()
    torch.set_num_threads(worker_threads(cfg.train, context.get_local_world_size()))
    torch.manual_seed(cfg.train.seed)
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if cfg.feed == "shards":
        x, y = read_worker_shards(cfg.shards, rank, world_size, cfg.spec)
    val = read_worker_shards(cfg.val_shards, rank, world_size, cfg.spec) if cfg.val_shards else None

    # 1. Model, optimizer, scheduler; then the latest checkpoint if Ray Train resumed us.
    base_model = build_model(cfg.spec)
    set_standardization(base_model, cfg.spec)
    if cfg.init_weights is not None:
        base_model.load_state_dict(load_safetensors(cfg.init_weights))
    optimizer = make_optimizer(base_model, cfg.train)
    state = TrainingState(base_model, optimizer, make_lr_scheduler(optimizer, cfg.train))
    state.best_weights = state_tensors(base_model)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            load_training_checkpoint(directory, state)
    model, sync = prepare_for_sync(
        base_model, context, device, cfg.train.grad_sync, cfg.feed, cfg.train.bucket_cap_mb
    )
    workers = worker_identity(len(x) if cfg.feed == "shards" else -1, device)
    # Under DDP every rank takes the same number of steps (its rows in near-equal batches),
    # so no rank waits at a collective the others never reach, and no Join is needed.
    steps = None
    if cfg.feed == "shards" and world_size > 1:
        steps = steps_per_epoch([w["rows"] for w in workers], cfg.train.batch_size)

    # 2. Epochs: train, all-reduce, validate, early-stop bookkeeping, report + checkpoint.
    for epoch in range(state.loop.epoch + 1, cfg.train.max_epochs):
        started = time.perf_counter()
        if cfg.feed == "shards":
            batches = shard_batches(
                x, y, cfg.train.batch_size, (cfg.train.seed, epoch, rank), device, steps
            )
        else:
            batches = raydata_batches(cfg.train.batch_size, cfg.spec["task"], device)
        epoch_totals = run_epoch(model, optimizer, batches, cfg, device, steps is not None, sync)
        totals = all_reduce_sum(epoch_totals)
        epoch_time_s = time.perf_counter() - started
        state.scheduler.step()
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "max_epochs": cfg.train.max_epochs,
            "train_loss": float(totals[0] / totals[2]),
            "rows_seen": int(totals[2]),
            "epoch_time_s": epoch_time_s,
            "rows_per_s": float(totals[2]) / epoch_time_s,
            "lr": state.scheduler.get_last_lr()[0],
            "num_workers": world_size,
            "grad_sync": "none" if world_size == 1 else "shm" if sync is not None else "ddp",
            "workers": workers,
        }
        if cfg.spec["task"] == "classification":
            metrics["train_accuracy"] = float(totals[1] / totals[2])
        if val is not None:
            sums = all_reduce_sum(validation_sums(base_model, *val, cfg.spec, device))
            metrics.update(validation_metrics(sums, cfg.spec))
        if update_early_stopping(state.loop, metrics.get("val_loss", metrics["train_loss"]), epoch):
            state.best_weights = state_tensors(base_model)
        patience = cfg.train.patience or 0
        stop = val is not None and patience > 0 and state.loop.epochs_since_best >= patience
        metrics.update(best_epoch=state.loop.best_epoch, stopped_early=stop)
        report(cfg, rank, metrics, state)
        if stop:
            break


def prepare_for_sync(
    base_model: nn.Module,
    context: Any,
    device: torch.device,
    grad_sync: str = "auto",
    feed: str = "shards",
    bucket_cap_mb: float | None = None,
) -> tuple[nn.Module, SharedMemoryGradSync | None]:
    """The model to train and, where the workers share one node's memory, the gradient sync
    that replaces DDP's (training/grad_sync.py; DDP otherwise, and `--grad-sync ddp`)."""
    world_size = context.get_world_size()
    sync = None
    if world_size > 1:
        mode = choose_grad_sync(
            grad_sync, world_size, context.get_local_world_size(), device.type, feed
        )
        params = list(base_model.parameters())
        sync = open_shared_grad_sync(params, context.get_world_rank(), world_size, mode == "shm")
    if sync is not None:
        model = ray.train.torch.prepare_model(base_model, parallel_strategy=None)
        broadcast_from_rank0(model)
        return model, sync
    ddp_kwargs = {"bucket_cap_mb": bucket_cap_mb} if bucket_cap_mb else {}
    # DDP-wrapped when world_size > 1
    return ray.train.torch.prepare_model(base_model, parallel_strategy_kwargs=ddp_kwargs), None


def report(cfg: LoopConfig, rank: int, metrics: dict[str, Any], state: TrainingState) -> None:
    """Every rank reports; rank 0 attaches a checkpoint and feeds the live progress queue."""
    if rank == 0 and cfg.progress is not None:
        try:
            cfg.progress.put_nowait(metrics)
        except Full:
            pass  # 10,000 epochs the driver never drained: it is not listening, keep training
        except ray.exceptions.RayActorError:
            # The queue died with its node (or the driver went away): the live progress ends,
            # the training does not (the checkpoint and final metrics still reach the driver).
            cfg.progress = None
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            save_training_checkpoint(directory, state)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)


# ----------------------------------------------------------------------------- trainer


def state_api_served() -> bool:
    """Whether this Ray runs a dashboard head, which serves Ray's State API (it writes its
    address to the GCS). Kiln's embedded Ray runs none (cluster/runtime.py::start_embedded)."""
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get("dashboard", namespace=b"dashboard") is not None


class KilnTorchTrainer(ray.train.torch.TorchTrainer):
    """Ray Train's TorchTrainer, less its placement-group cleaner where no State API runs.

    Ray Train 2.60 starts a detached PlacementGroupCleaner with every run; it asks the State
    API (served by the dashboard) each second whether the controller lives, and the controller
    waits for it to stop for up to 12 s (2 x 1 s + GET_ACTOR_TIMEOUT_S). With no dashboard each
    question hangs, so every fit on the embedded Ray ended with that wait: 12.2 s from the last
    epoch to `fit()`'s return on diabetes, with 1 worker or 2. The cleaner only removes a run's
    placement group when the controller dies ungracefully; there the group still goes with the
    driver's job. Where a dashboard runs (any `ray start` cluster), the cleaner stays.
    """

    def _create_default_callbacks(self) -> list[Any]:
        from ray.train.v2._internal.callbacks.placement_group_callback import (
            PlacementGroupCleanerCallback,
        )

        callbacks = list(super()._create_default_callbacks())  # type: ignore[misc]
        if state_api_served():
            return callbacks
        return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]
