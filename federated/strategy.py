"""Aggregation strategies: how the server turns the clients' updates into new global weights.

Each strategy is a small object in the manner of Flower's: `aggregate(updates, num_examples)`
is a pure function of the clients' updates (client weights minus the global weights, flat
float vectors) and their sample counts; `apply(weights, update)` steps the global weights.
FedAvg and FedProx average by samples and add; FedProx differs on the clients (a proximal
term mu/2·||w - w_global||² in the local loss, `proximal_mu`); FedAdam (Reddi et al. 2021,
"Adaptive Federated Optimization") treats the averaged update as a pseudo-gradient and takes
a server-side Adam step, its moments kept in `state` (checkpointed with the weights).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from kiln.training.errors import KilnError

logger = logging.getLogger(__name__)

STRATEGY_USAGE = "Use fedavg, fedprox:MU (e.g. fedprox:0.01) or fedadam (or fedadam:ETA)."


class Strategy(Protocol):
    name: str
    proximal_mu: float

    def aggregate(self, updates: list[np.ndarray], num_examples: list[int]) -> np.ndarray: ...

    def apply(self, weights: np.ndarray, update: np.ndarray) -> np.ndarray: ...

    def state(self) -> dict[str, np.ndarray]: ...

    def load_state(self, state: dict[str, np.ndarray]) -> None: ...


def weighted_mean(updates: list[np.ndarray], num_examples: list[int]) -> np.ndarray:
    """Σ n_i·u_i / Σ n_i, accumulated in float64; float32 out."""
    if not updates or len(updates) != len(num_examples):
        raise ValueError("aggregate needs one sample count per update, and at least one update")
    total = float(sum(num_examples))
    if total <= 0:
        raise ValueError("aggregate needs a positive total sample count")
    acc = np.zeros(updates[0].shape, dtype=np.float64)
    for update, count in zip(updates, num_examples, strict=True):
        acc += update.astype(np.float64) * (count / total)
    return acc.astype(np.float32)


@dataclass
class FedAvg:
    """McMahan et al. (2017): the sample-weighted mean of the client updates, added."""

    name: str = "fedavg"
    proximal_mu: float = 0.0

    def aggregate(self, updates: list[np.ndarray], num_examples: list[int]) -> np.ndarray:
        return weighted_mean(updates, num_examples)

    def apply(self, weights: np.ndarray, update: np.ndarray) -> np.ndarray:
        return (weights + update).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        del state


@dataclass
class FedProx(FedAvg):
    """Li et al. (2020): FedAvg's server; the clients add mu/2·||w - w_global||² to their loss."""

    name: str = "fedprox"
    proximal_mu: float = 0.01


@dataclass
class FedAdam:
    """Reddi et al. (2021), FedOpt with Adam on the server (Flower's FedAdam update):
    m ← β1·m + (1-β1)·Δ;  v ← β2·v + (1-β2)·Δ²;  w ← w + η·m / (√v + τ)."""

    name: str = "fedadam"
    proximal_mu: float = 0.0
    eta: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    m: np.ndarray | None = field(default=None, repr=False)
    v: np.ndarray | None = field(default=None, repr=False)

    def aggregate(self, updates: list[np.ndarray], num_examples: list[int]) -> np.ndarray:
        return weighted_mean(updates, num_examples)

    def apply(self, weights: np.ndarray, update: np.ndarray) -> np.ndarray:
        delta = update.astype(np.float64)
        m = np.zeros_like(delta) if self.m is None else self.m
        v = np.zeros_like(delta) if self.v is None else self.v
        self.m = self.beta_1 * m + (1 - self.beta_1) * delta
        self.v = self.beta_2 * v + (1 - self.beta_2) * delta**2
        return (weights + self.eta * self.m / (np.sqrt(self.v) + self.tau)).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        if self.m is None or self.v is None:
            return {}
        return {"m": self.m, "v": self.v}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.m = state.get("m")
        self.v = state.get("v")


def parse_strategy(text: str) -> FedAvg | FedProx | FedAdam:
    """--strategy: fedavg | fedprox:MU | fedadam[:ETA]."""
    name, _, arg = text.strip().partition(":")
    number = parse_float(arg)
    if name == "fedavg" and not arg:
        return FedAvg()
    if name == "fedprox" and number is not None:
        if not number >= 0:
            raise KilnError(f'Got "{text}" for --strategy. FedProx\'s MU must be 0 or more.')
        return FedProx(proximal_mu=number)
    if name == "fedadam" and (number is not None or not arg):
        eta = FedAdam.eta if number is None else number
        if not eta > 0:
            raise KilnError(f'Got "{text}" for --strategy. FedAdam\'s ETA must be above 0.')
        return FedAdam(eta=eta)
    raise KilnError(f'Got "{text}" for --strategy. {STRATEGY_USAGE}')


def parse_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
