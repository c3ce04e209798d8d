"""A client's local training in plain torch: start from the global weights, run E epochs over
its own rows with the same per-step code as `kiln train` (kiln.training.loop), return the update.

No Ray here: the FederatedClient actor calls `local_update`, and the tests call it directly.
FedProx's proximal term mu/2·||w - w_global||² enters as its gradient, mu·(w - w_global),
added to every parameter's gradient just before the optimizer steps (an optimizer step
pre-hook), so the loss code of `kiln train` stays the one both paths run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from kiln.training.config import TrainConfig
from kiln.training.loop import LoopConfig, make_optimizer, run_epoch, shard_batches
from kiln.training.models import KilnModel, build_model, set_standardization

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class LocalPlan:
    """How one client trains in one round (the server's settings, the same for every client)."""

    round_index: int
    local_epochs: int
    batch_size: int
    lr: float
    optimizer: str
    proximal_mu: float = 0.0
    seed: int = 0


def parameter_vector(model: nn.Module) -> np.ndarray:
    """The trainable parameters, flattened in `model.parameters()` order, as float32."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return flat.cpu().numpy().astype(np.float32)


def load_parameter_vector(model: nn.Module, vector: np.ndarray) -> None:
    """The inverse of `parameter_vector` (buffers such as standardisation are left alone)."""
    flat = torch.from_numpy(np.array(vector, dtype=np.float32))  # a copy: refs are read-only
    torch.nn.utils.vector_to_parameters(flat, model.parameters())


def model_with_weights(spec: dict[str, Any], vector: np.ndarray) -> KilnModel:
    model = build_model(spec)
    set_standardization(model, spec)
    load_parameter_vector(model, vector)
    return model


def initial_weights(spec: dict[str, Any], seed: int) -> np.ndarray:
    """The global weights of round 0: the model `kiln train --seed` would start from."""
    torch.manual_seed(seed)
    return parameter_vector(build_model(spec))


def local_config(spec: dict[str, Any], plan: LocalPlan) -> TrainConfig:
    return TrainConfig(
        model=spec["kind"],
        hidden=list(spec.get("hidden", [128, 64])),
        workers=1,
        epochs=plan.local_epochs,
        batch_size=plan.batch_size,
        optimizer=plan.optimizer,
        lr=plan.lr,
        l2=0.0,
        seed=plan.seed,
        gpu="off",
    )


def add_proximal_term(
    optimizer: torch.optim.Optimizer, model: nn.Module, mu: float
) -> torch.utils.hooks.RemovableHandle:
    """Before each step, grad += mu·(w - w_global): FedProx's term in the gradient."""
    anchors = [p.detach().clone() for p in model.parameters()]

    def hook(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        with torch.no_grad():
            for param, anchor in zip(model.parameters(), anchors, strict=True):
                if param.grad is not None:
                    param.grad.add_(param - anchor, alpha=mu)

    return optimizer.register_step_pre_hook(hook)


def local_update(
    spec: dict[str, Any],
    global_weights: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    plan: LocalPlan,
    client_index: int,
) -> tuple[np.ndarray, float]:
    """(client weights - global weights, mean training loss of the last local epoch).

    Batches are shuffled from (seed, round·E + epoch, client): round 0, epoch 0 of client 0 is
    epoch 0 of rank 0 in `kiln train` with the same seed, the same rows in the same order.
    """
    cfg = local_config(spec, plan)
    entropy = np.random.SeedSequence((plan.seed, plan.round_index, client_index))
    torch.manual_seed(int(entropy.generate_state(1)[0]))  # dropout, if the model has any
    model = model_with_weights(spec, global_weights)
    optimizer = make_optimizer(model, cfg)
    if plan.proximal_mu > 0:
        add_proximal_term(optimizer, model, plan.proximal_mu)
    loop = LoopConfig(train=cfg, spec=spec, shards=[], num_train_rows=len(x))
    device = torch.device("cpu")
    totals = torch.zeros(3, dtype=torch.float64)
    for epoch in range(plan.local_epochs):
        step = plan.round_index * plan.local_epochs + epoch
        batches = shard_batches(x, y, plan.batch_size, (plan.seed, step, client_index), device)
        totals = run_epoch(model, optimizer, batches, loop, device)
    update = parameter_vector(model) - np.asarray(global_weights, dtype=np.float32)
    return update, float(totals[0] / max(float(totals[2]), 1.0))
