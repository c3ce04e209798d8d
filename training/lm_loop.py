"""The per-worker Ray Train loop of a language model: windows from my token shards, AdamW with
warmup and cosine, clipping, held-out perplexity, checkpoints that resume.

`lm_train_func(config)` runs on every Train worker. It is handed the TextShardStore handles
(actors/text.py) and maps its own shards' token streams from the object store (zero-copy on
the same node); it never looks anything up. Each optimizer step samples `block_size + 1`-token
windows uniformly from those streams (training/lm_data.py). Gradients are averaged like the
tabular loop's: in shared memory when every worker runs on one CPU node, DDP otherwise, or the
parameters are sharded with torch FSDP (`--strategy fsdp`: FSDP2's `fully_shard`, which runs on
CPU over gloo; Ray Train's own FSDP wrapper refuses CPUs).

Every rank reports at each evaluation (Ray Train V2 requires all ranks to report); rank 0
attaches a checkpoint: the full weights (Hugging Face key names), the optimizer's state by
parameter name and `state.json` with the step and tokens seen. A restarted group resumes from
the latest one, with the same schedule.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from kiln.training.checkpoints import load_tensors, save_tensors
from kiln.training.encryption import read_local, write_local
from kiln.training.lm import build_lm, ties_embeddings
from kiln.training.lm_config import LMTrainConfig, lr_at
from kiln.training.lm_data import eval_windows, sample_windows
from kiln.training.loop import all_reduce_sum, prepare_for_sync, worker_identity, worker_threads

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
TIME_CHECK_STEPS = 10
"""Steps between the ranks' agreement on whether --max-minutes has passed (one small
all-reduce; every rank must stop at the same step)."""
SPEED_PROBE_STEPS = 5
"""Steps timed (after the first) to plan a --max-minutes run's schedule."""


@dataclass(kw_only=True)
class LMLoopConfig:
    """Everything one worker needs; built by the driver, parsed first thing on the worker."""

    train: LMTrainConfig
    spec: dict[str, Any]
    shards: list[Any]
    """TextShardStore handles; with at least as many shards as workers, rank r reads shards
    r, r+W, ...; with fewer, every rank samples all of them (with its own seed)."""
    total_steps: int
    progress: Any = None
    """Optional ray.util.queue.Queue that rank 0 feeds one metrics dict per evaluation."""
    init_weights: bytes | None = None
    """Safetensors bytes of the weights to start from (fine-tuning an imported model)."""

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> LMLoopConfig:
        return cls(**{**config, "train": LMTrainConfig(**config["train"])})


# ----------------------------------------------------------------------------- data


def my_shards(shards: list[Any], rank: int, world_size: int) -> tuple[list[Any], bool]:
    """This rank's shards, and whether they are shared with the other ranks."""
    if len(shards) >= world_size:
        return shards[rank::world_size], False
    return list(shards), True


def fetch_streams(handles: list[Any], split: str) -> list[np.ndarray]:
    """Token streams of `split` from the stores' object-store arrays, as read-only numpy views
    (zero-copy on the same node)."""
    ref_lists = ray.get([h.token_refs.remote(split) for h in handles])
    arrays = ray.get([ref for refs in ref_lists for ref in refs])
    streams = []
    for array in arrays:
        if hasattr(array, "to_numpy"):  # a pyarrow Array or ChunkedArray
            array = array.to_numpy(zero_copy_only=False)
        streams.append(np.asarray(array))
    return [s for s in streams if len(s)]


def validation_batches(
    streams: list[np.ndarray],
    block_size: int,
    max_windows: int,
    rank: int,
    world: int,
    shared: bool,
) -> list[np.ndarray]:
    """Deterministic held-out windows (N, block_size + 1) of this rank, cut into batches."""
    windows = [eval_windows(s, block_size, max_windows) for s in streams]
    found = [w for w in windows if len(w)]
    if not found:
        return []
    every: np.ndarray = np.concatenate(found)[:max_windows]
    if shared:
        every = every[rank::world]
    return [every[i : i + 16] for i in range(0, len(every), 16)]


# ----------------------------------------------------------------------------- precision


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast: asked for, or (auto) where the device computes bf16 natively."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: without either, bf16 matmuls on a CPU are emulated and slower
    than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def autocast(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------- steps


def make_optimizer(model: nn.Module, cfg: LMTrainConfig) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (not on norms, biases or, by name, embeddings'
    shared copy twice): the usual GPT/Llama recipe."""
    decay: list[nn.Parameter] = []
    keep: list[nn.Parameter] = []
    seen: set[int] = set()
    for _, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else keep).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=(0.9, 0.95), eps=1e-8)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    bf16: bool,
    device: torch.device,
    grad_clip: float,
    sync: Any = None,
) -> float:
    """One optimizer step over `grad_accum` micro-batches; returns their mean loss. Under DDP
    only the last backward all-reduces (the others run in `no_sync()`)."""
    optimizer.zero_grad(set_to_none=True)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    total = 0.0
    for i, (x, y) in enumerate(batches):  # x, y: (B, T)
        last = i == len(batches) - 1
        with model.no_sync() if ddp and not last else contextlib.nullcontext():  # type: ignore[operator]
            with autocast(bf16, device):
                logits = model(x)  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            (loss / len(batches)).backward()
        total += float(loss.detach())
    if sync is not None:
        sync()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return total / len(batches)


@torch.inference_mode()
def validation_sums(
    model: nn.Module, batches: list[np.ndarray], bf16: bool, device: torch.device
) -> torch.Tensor:
    """[Σ token loss, tokens] over the held-out windows: all-reduced into exact perplexity."""
    sums = torch.zeros(2, dtype=torch.float64)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # no DDP collectives: ranks may hold different numbers of windows
    model.eval()
    for windows in batches:
        if not len(windows):  # a placeholder: the forward still runs (FSDP's gathers)
            model(torch.zeros((1, windows.shape[1] - 1), dtype=torch.int64, device=device))
            continue
        tokens = torch.from_numpy(windows.astype(np.int64)).to(device)  # (B, T + 1)
        with autocast(bf16, device):
            logits = model(tokens[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum"
        )
        sums += torch.tensor([float(loss), tokens[:, 1:].numel()], dtype=torch.float64)
    model.train()
    return sums


def any_rank(flag: bool) -> bool:
    """Whether any rank's flag is set (a one-number all-reduce)."""
    value = torch.tensor([1.0 if flag else 0.0])
    return bool(all_reduce_sum(value)[0] > 0)


def max_over_ranks(value: float) -> float:
    return reduce_over_ranks(value, dist.ReduceOp.MAX)


def reduce_over_ranks(value: float, op: Any) -> float:
    found = torch.tensor([value], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(found, op=op)
    return float(found[0])


# ----------------------------------------------------------------------------- sharding


def shard_with_fsdp(model: nn.Module) -> nn.Module:
    """FSDP2: each transformer block a unit of its own, the rest (embeddings, final norm,
    head: tied weights stay in one unit) in the root's."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks_of(model):
        fully_shard(block)
    fully_shard(model)
    return model


def blocks_of(model: nn.Module) -> list[nn.Module]:
    body = getattr(model, "model", None) or getattr(model, "transformer", None)
    layers = getattr(body, "layers", None) or getattr(body, "h", None)
    return list(layers or [])


# ----------------------------------------------------------------------------- checkpoints


def full_weights(model: nn.Module, spec: dict[str, Any], sharded: bool) -> dict[str, torch.Tensor]:
    """The whole model's weights by Hugging Face name, on the CPU (a collective under FSDP:
    every rank calls it). A tied lm_head is left out, as Hugging Face saves it."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state: dict[str, Any] = dict(get_model_state_dict(model, options=options))
    else:
        state = model.state_dict()
    if ties_embeddings(spec):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def optimizer_parts(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state keyed by parameter name (tensors, and JSON for the rest): the same
    on one worker, on DDP and on FSDP (a collective there)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state: Any = get_optimizer_state_dict(model, optimizer, options=options)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    if not state:  # with cpu_offload only rank 0 receives the full state
        return tensors, {"param_groups": [], "scalars": scalars}
    for name, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{name}::{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}::{key}"] = float(value)
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, meta: dict[str, Any]
) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    per_param: dict[str, dict[str, Any]] = {}
    for key, value in load_tensors(folder / OPTIMIZER_FILE).items():
        name, field = key.split("::", 1)
        per_param.setdefault(name, {})[field] = value
    for key, value in meta["scalars"].items():
        name, field = key.split("::", 1)
        per_param.setdefault(name, {})[field] = torch.tensor(value)
    state = {"state": per_param, "param_groups": meta["param_groups"]}
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=options)


@dataclass
class Progress:
    step: int = 0
    tokens_seen: int = 0
    total_steps: int = 0
    train_time_s: float = 0.0


def resume_from(checkpoint: Any, base_model: nn.Module) -> tuple[Path | None, dict[str, Any]]:
    """Load a checkpoint's weights into the unwrapped model; returns its folder (kept open by
    the caller) and state.json, or (None, {}) for a fresh run."""
    if checkpoint is None:
        return None, {}
    folder = Path(checkpoint.to_directory())
    weights = load_tensors(folder / WEIGHTS_FILE)
    base_model.load_state_dict(weights, strict=False)
    return folder, json.loads(read_local(folder / STATE_FILE))


# ----------------------------------------------------------------------------- entry


def lm_train_func(config: dict[str, Any]) -> None:
    """Entry point of every Train worker of `kiln train --model lm`."""
    cfg = LMLoopConfig.from_dict(config)
    train = cfg.train
    context = ray.train.get_context()
    torch.set_num_threads(worker_threads_for(train, context.get_local_world_size()))
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    block = int(cfg.spec["max_position_embeddings"])
    shards, shared = my_shards(cfg.shards, rank, world)
    streams = fetch_streams(shards, "train")
    val_batches = validation_batches(
        fetch_streams(shards, "val"),
        block,
        max(1, train.eval_tokens // block // (1 if shared else world)),
        rank,
        world,
        shared,
    )
    if train.strategy == "fsdp" and world > 1:
        # Every FSDP forward gathers parameters from all ranks: each must run as many, so a
        # rank with fewer held-out windows runs empty ones (counted as nothing).
        most = int(max_over_ranks(len(val_batches)))
        empty = np.zeros((0, block + 1), np.int64)
        val_batches = val_batches + [empty] * (most - len(val_batches))
    rng = np.random.default_rng([train.seed, rank, 7])

    # 1. The model, from a checkpoint when Ray Train restarted the group.
    torch.manual_seed(train.seed)
    base_model = build_lm(cfg.spec)
    if cfg.init_weights is not None:
        from safetensors.torch import load as load_bytes

        base_model.load_state_dict(load_bytes(cfg.init_weights), strict=False)
    folder, saved = resume_from(ray.train.get_checkpoint(), base_model)
    sharded = train.strategy == "fsdp" and world > 1
    sync = None
    if sharded:
        model = shard_with_fsdp(base_model.to(device))
    else:
        model, sync = prepare_for_sync(base_model, context, device, train.grad_sync)
    optimizer = make_optimizer(model, train)
    if folder is not None:
        restore_optimizer(model, optimizer, folder, saved)
        rng = np.random.default_rng([train.seed, rank, 7, int(saved["step"])])
    progress = Progress(
        step=int(saved.get("step", 0)),
        tokens_seen=int(saved.get("tokens_seen", 0)),
        total_steps=int(saved.get("total_steps", cfg.total_steps)),
        train_time_s=float(saved.get("train_time_s", 0.0)),
    )
    bf16 = use_bf16(train.precision, device)
    workers = worker_identity(sum(len(s) for s in streams), device)
    warmup = train.planned_warmup(progress.total_steps)
    eval_every = train.planned_eval_every(progress.total_steps)
    tokens_per_step = train.tokens_per_step(block)
    budget_s = None if train.max_minutes is None else train.max_minutes * 60
    model.train()

    # 2. Steps: sample, forward/backward, sync, clip, step; evaluate and report every N.
    window_start = time.perf_counter()
    window_tokens, losses = 0, []
    while progress.step < progress.total_steps:
        started = time.perf_counter()
        lr = lr_at(progress.step, progress.total_steps, warmup, train.peak_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [
            tuple(t.to(device) for t in sample_windows(streams, block, train.micro_batch, rng))
            for _ in range(train.grad_accum)
        ]
        losses.append(train_step(model, optimizer, batches, bf16, device, train.grad_clip, sync))  # type: ignore[arg-type]
        progress.step += 1
        progress.tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        progress.train_time_s += time.perf_counter() - started
        if budget_s is not None and progress.step == 1 + SPEED_PROBE_STEPS:
            # Plan the schedule from the measured speed (the slowest rank's).
            per_step = max_over_ranks(progress.train_time_s / progress.step)
            fits = max(progress.step, int(budget_s / per_step))
            progress.total_steps = min(progress.total_steps, fits)
            warmup = train.planned_warmup(progress.total_steps)
            eval_every = train.planned_eval_every(progress.total_steps)
        out_of_time = False
        if budget_s is not None and progress.step % TIME_CHECK_STEPS == 0:
            out_of_time = any_rank(progress.train_time_s >= budget_s)
        last = progress.step >= progress.total_steps or out_of_time
        if progress.step % eval_every == 0 or last:
            elapsed = time.perf_counter() - window_start
            metrics: dict[str, Any] = dict(evaluate(model, val_batches, bf16, device))
            metrics.update(
                step=progress.step,
                max_steps=progress.total_steps,
                train_loss=float(np.mean(losses)),
                tokens_seen=progress.tokens_seen,
                tokens_per_s=window_tokens / elapsed if elapsed > 0 else 0.0,
                lr=lr,
                num_workers=world,
                grad_sync=sync_name(sharded, world, sync),
                bf16=bf16,
                train_time_s=progress.train_time_s,
                workers=workers,
            )
            report(cfg, rank, metrics, model, optimizer, progress, sharded)
            window_start, window_tokens, losses = time.perf_counter(), 0, []
        if out_of_time:
            break


def worker_threads_for(train: LMTrainConfig, local_workers: int) -> int:
    from kiln.training.config import TrainConfig

    return worker_threads(TrainConfig(cpus_per_worker=train.cpus_per_worker), local_workers)


def evaluate(
    model: nn.Module, val_batches: list[np.ndarray], bf16: bool, device: torch.device
) -> dict[str, float]:
    """Held-out loss and perplexity over every rank's windows (nothing when there are none)."""
    sums = all_reduce_sum(validation_sums(model, val_batches, bf16, device))
    if float(sums[1]) == 0:
        return {}
    loss = float(sums[0] / sums[1])
    return {
        "val_loss": loss,
        "val_perplexity": math.exp(min(loss, 50.0)),
        "val_tokens": int(sums[1]),
    }


def sync_name(sharded: bool, world: int, sync: Any) -> str:
    """How the workers combined gradients: fsdp, shm, ddp, or none (one worker)."""
    if sharded:
        return "fsdp"
    return "none" if world == 1 else "shm" if sync is not None else "ddp"


def report(
    cfg: LMLoopConfig,
    rank: int,
    metrics: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: Progress,
    sharded: bool,
) -> None:
    """Every rank reports (and joins the state gathers under FSDP); rank 0 writes the
    checkpoint and feeds the live progress queue."""
    weights = full_weights(model, cfg.spec, sharded)
    tensors, meta = optimizer_parts(model, optimizer)
    if rank == 0 and cfg.progress is not None:
        with contextlib.suppress(Exception):  # the live progress is a side channel
            cfg.progress.put_nowait(metrics)
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            folder = Path(directory)
            save_tensors(weights, folder / WEIGHTS_FILE, metadata={"format": "pt"})
            save_tensors(tensors, folder / OPTIMIZER_FILE)
            meta.update(
                step=progress.step,
                tokens_seen=progress.tokens_seen,
                total_steps=progress.total_steps,
                train_time_s=progress.train_time_s,
            )
            write_local(folder / STATE_FILE, json.dumps(meta).encode())
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)
