"""The Tune trial: the same training steps as `kiln train`, on the sweep's resident shards.

Every trial gets the ShardStore handles of the one copy of the dataset the sweep loaded (through
`tune.with_parameters`, so they are shipped once) and reads its rows zero-copy from the object
store: no trial reloads the data, and trials on one node share its pages. A one-worker trial is
a plain function trainable running training/loop.py's steps (no Ray Train start-up cost); a
trial with several workers runs a TorchTrainer over `train_func` and forwards its reports to
Tune through TuneReportCallback. Either way each epoch reports validation metrics, so ASHA can
stop a bad trial. A one-worker trial attaches a safetensors checkpoint where something needs
one (`TrialContext.checkpoint_every`/`checkpoint_at`, set by tuning/sweep.py: the rungs where
PromotingASHA pauses, PBT's clone points, every few epochs for a resumed sweep, the last epoch)
and, on a reused Tune actor, reads the shards' rows from a per-process cache.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from typing import Any, cast

import ray
import ray.train
import torch
from ray import tune
from safetensors.torch import save as save_safetensors

from kiln.training.checkpoints import (
    TrainingState,
    load_training_checkpoint,
    save_training_checkpoint,
    state_tensors,
)
from kiln.training.config import TrainConfig
from kiln.training.loop import (
    KilnTorchTrainer,
    LoopConfig,
    make_lr_scheduler,
    make_optimizer,
    read_worker_shards,
    run_epoch,
    shard_batches,
    train_func,
    update_early_stopping,
    validation_metrics,
    validation_sums,
)
from kiln.training.models import build_model, set_standardization
from kiln.training.tabular import Encoding
from kiln.tuning.space import decode_l2

logger = logging.getLogger(__name__)

TUNED_KEYS = ("lr", "batch_size", "optimizer")


@dataclass(kw_only=True)
class TrialContext:
    """What every trial of one sweep shares; handed to Tune once with `with_parameters`."""

    train: dict[str, Any]
    """The base TrainConfig (as a dict); a trial overrides the tuned fields."""
    spec: dict[str, Any]
    shards: list[Any]
    val_shards: list[Any]
    num_train_rows: int
    workers_per_trial: int = 1
    storage_path: str = ""
    """Where a multi-worker trial's TorchTrainer keeps its run (under the sweep's storage)."""
    use_gpu: bool = False
    read_own_data: Any = None
    """Benchmarks only: a callable (source) -> (x, y) that makes each trial load its own copy."""
    extra: dict[str, Any] = field(default_factory=dict)
    checkpoint_every: int = 1
    """A one-worker trial attaches a checkpoint to every k-th epoch's report (and its last)."""
    checkpoint_at: list[int] = field(default_factory=list)
    """Training iterations whose report must carry one too: the rungs where a scheduler
    pauses trials (Tune resumes a paused trial from the checkpoint of its last report)."""

    def wants_checkpoint(self, iteration: int, last: bool) -> bool:
        return last or iteration % self.checkpoint_every == 0 or iteration in self.checkpoint_at


def trial_train_config(base: dict[str, Any], config: dict[str, Any]) -> TrainConfig:
    """The base config with this trial's sampled values; validated like `kiln train`'s."""
    overrides: dict[str, Any] = {k: config[k] for k in TUNED_KEYS if k in config}
    overrides["l2"] = decode_l2(config)
    if "hidden_width" in config or "depth" in config:
        width = int(config.get("hidden_width", base["hidden"][0]))
        depth = int(config.get("depth", len(base["hidden"])))
        overrides["hidden"] = [width] * depth
    # Early stopping is the scheduler's job in a sweep: the trial runs until Tune stops it.
    return TrainConfig(**{**base, **overrides, "patience": 0})


def trial_spec(spec: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    return {**spec, "hidden": list(cfg.hidden)} if spec["kind"] == "mlp" else dict(spec)


def trial_device(use_gpu: bool) -> torch.device:
    if use_gpu and torch.cuda.is_available() and ray.get_gpu_ids():
        return torch.device("cuda")
    return torch.device("cpu")


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """The Tune trainable (one trial)."""
    cfg = trial_train_config(context.train, config)
    spec = trial_spec(context.spec, cfg)
    if context.workers_per_trial > 1:
        run_trial_on_train(cfg, spec, context)
        return
    run_trial_in_process(cfg, spec, context)


def run_trial_in_process(cfg: TrainConfig, spec: dict[str, Any], context: TrialContext) -> None:
    """One worker: training/loop.py's steps, reporting to Tune every epoch."""
    torch.manual_seed(cfg.seed)
    device = trial_device(context.use_gpu)
    if context.read_own_data is not None:
        x, y = context.read_own_data(spec)
    else:
        x, y = cached_shard_rows(context.shards, spec)
    val = cached_shard_rows(context.val_shards, spec)
    loop_cfg = LoopConfig(train=cfg, spec=spec, shards=[], num_train_rows=context.num_train_rows)

    model = build_model(spec)
    set_standardization(model, spec)
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    state = TrainingState(model, optimizer, make_lr_scheduler(optimizer, cfg))
    state.best_weights = state_tensors(model)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a resumed trial, or PBT handing over a better trial's state
        with checkpoint.as_directory() as directory:
            load_training_checkpoint(directory, state)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr  # PBT may have perturbed the learning rate since the save

    for epoch in range(state.loop.epoch + 1, cfg.max_epochs):
        batches = shard_batches(x, y, cfg.batch_size, (cfg.seed, epoch, 0), device)
        totals = run_epoch(model, optimizer, batches, loop_cfg, device)
        state.scheduler.step()
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": float(totals[0] / totals[2])}
        if spec["task"] == "classification":
            metrics["train_accuracy"] = float(totals[1] / totals[2])
        metrics.update(validation_metrics(validation_sums(model, *val, spec, device), spec))
        if update_early_stopping(state.loop, metrics["val_loss"], epoch):
            state.best_weights = state_tensors(model)
        metrics["best_epoch"] = state.loop.best_epoch
        if not context.wants_checkpoint(epoch + 1, last=epoch == cfg.max_epochs - 1):
            tune.report(metrics)  # epoch + 1 is this report's training_iteration
            continue
        with tempfile.TemporaryDirectory() as directory:
            save_training_checkpoint(directory, state)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


_SHARD_ROWS: dict[tuple, tuple[Any, Any]] = {}
"""Rows already read in this process, by shard actors and label encoding: a trial on a
reused Tune actor (`reuse_actors`) finds them here instead of asking the shards again."""


def cached_shard_rows(shards: list[Any], spec: dict[str, Any]) -> tuple[Any, Any]:
    """`read_worker_shards(..., zero_copy=True)` of one worker, remembered per process. The
    views keep the shards' objects mapped; a sweep's shards outlive its trial actors."""
    key = (
        tuple(h._actor_id.hex() for h in shards),
        spec["task"],
        tuple(spec.get("classes", ())),
        Encoding.from_spec(spec),  # category slots depend on the model's categories
    )
    if key not in _SHARD_ROWS:
        if len(_SHARD_ROWS) >= 4:  # a sweep reads two sets (train, val); forget older sweeps'
            _SHARD_ROWS.clear()
        _SHARD_ROWS[key] = read_worker_shards(shards, 0, 1, spec, zero_copy=True)
    return _SHARD_ROWS[key]


def refit_weights(
    cfg: TrainConfig, spec: dict[str, Any], shards: list[Any], num_rows: int, use_gpu: bool
) -> bytes:
    """The winning configuration trained again, on every shard handed in (train and
    validation rows), for `cfg.epochs` epochs: its final weights, as safetensors bytes.

    The same steps as a trial (training/loop.py), without validation: no row is held out.
    """
    torch.manual_seed(cfg.seed)
    device = trial_device(use_gpu)
    x, y = read_worker_shards(shards, 0, 1, spec, zero_copy=True)
    loop_cfg = LoopConfig(train=cfg, spec=spec, shards=[], num_train_rows=num_rows)
    model = build_model(spec)
    set_standardization(model, spec)
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_lr_scheduler(optimizer, cfg)
    for epoch in range(cfg.max_epochs):
        batches = shard_batches(x, y, cfg.batch_size, (cfg.seed, epoch, 0), device)
        run_epoch(model, optimizer, batches, loop_cfg, device)
        scheduler.step()
    return save_safetensors(state_tensors(model))


def run_trial_on_train(cfg: TrainConfig, spec: dict[str, Any], context: TrialContext) -> None:
    """Several workers: a TorchTrainer over `train_func`, its reports forwarded to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg.workers = context.workers_per_trial
    trainer = KilnTorchTrainer(
        train_func,
        train_loop_config={
            "train": cfg.to_dict(),
            "spec": spec,
            "shards": context.shards,
            "val_shards": context.val_shards,
            "num_train_rows": context.num_train_rows,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=context.workers_per_trial, use_gpu=context.use_gpu
        ),
        run_config=ray.train.RunConfig(
            name=f"train_{trial_id}",
            storage_path=context.storage_path,
            callbacks=[cast(Any, TuneReportCallback())],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
    )
    trainer.fit()
