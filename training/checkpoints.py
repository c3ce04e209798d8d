"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder holds the latest weights (to resume), the best weights so far (what early
stopping keeps), the optimizer's and scheduler's state (so a resumed run continues the same
optimisation), and `state.json` with the epoch and early-stopping counters. With encryption on
(`KILN_ENCRYPT`), each file is sealed before it touches the disk (training/encryption.py), so
Ray Train uploads only ciphertext to the run's storage.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from kiln.training.encryption import read_local, write_local

WEIGHTS_FILE = "model.safetensors"
BEST_WEIGHTS_FILE = "best.safetensors"
OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


@dataclass
class LoopState:
    """Where a run stands; saved with every checkpoint."""

    epoch: int = -1
    best_epoch: int = -1
    best_score: float = float("inf")
    epochs_since_best: int = 0


def state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def optimizer_to_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (safetensors) and JSON-able values."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_parts(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    per_param: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = name.split(".", 1)
        per_param.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})


@dataclass
class TrainingState:
    """Everything a checkpoint saves and a resumed worker restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loop: LoopState = field(default_factory=LoopState)
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """A safetensors file, sealed when encryption is on."""
    write_local(path, save_safetensors(tensors, metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file written by `save_tensors`, sealed or clear."""
    return load_safetensors(read_local(path))


def save_training_checkpoint(directory: str | Path, state: TrainingState) -> None:
    folder = Path(directory)
    save_tensors(state_tensors(state.model), folder / WEIGHTS_FILE)
    save_tensors(state.best_weights, folder / BEST_WEIGHTS_FILE)
    tensors, meta = optimizer_to_parts(state.optimizer)
    save_tensors(tensors, folder / OPTIMIZER_TENSORS_FILE)
    meta["scheduler"] = state.scheduler.state_dict()
    meta["loop"] = asdict(state.loop)
    write_local(folder / STATE_FILE, json.dumps(meta).encode())


def load_training_checkpoint(directory: str | Path, state: TrainingState) -> None:
    """Restore model, optimizer, scheduler, loop counters and best weights in place."""
    folder = Path(directory)
    state.model.load_state_dict(load_tensors(folder / WEIGHTS_FILE))
    meta = json.loads(read_local(folder / STATE_FILE))
    optimizer_from_parts(state.optimizer, load_tensors(folder / OPTIMIZER_TENSORS_FILE), meta)
    state.scheduler.load_state_dict(meta["scheduler"])
    state.loop = LoopState(**meta["loop"])
    state.best_weights = load_tensors(folder / BEST_WEIGHTS_FILE)
