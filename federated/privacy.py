"""Central differential privacy for federated rounds: fixed clipping, Gaussian noise, and the
(ε, δ) spent, from Opacus's RDP accountant.

DP-FedAvg with fixed clipping (McMahan et al. 2018; Flower's DifferentialPrivacy*FixedClipping):
each sampled client's update is clipped to L2 norm C on the client; the server adds Gaussian
noise of standard deviation σ·C to the sum and divides by the number of clients that answered,
so each client's weight is uniform (its data's size is not used: one client moves the sum by
at most C, the sensitivity the noise is calibrated to). The guarantee is client-level: the
whole of one client's data, not one row. Accounting is the sampled Gaussian mechanism's RDP
with sampling rate q = clients sampled / clients, one step per round.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np

from kiln.training.errors import KilnError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPConfig:
    """--dp-clip C, --dp-noise SIGMA, --dp-delta."""

    clip: float
    noise: float
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise KilnError(f'Got "{self.clip}" for --dp-clip. Use an L2 norm above 0, e.g. 1.0.')
        if not (self.noise >= 0 and math.isfinite(self.noise)):
            raise KilnError(f'Got "{self.noise}" for --dp-noise. Use 0 or more, e.g. 1.0.')
        if not 0 < self.delta < 1:
            raise KilnError(f'Got "{self.delta}" for --dp-delta. Use a value in (0, 1), e.g. 1e-5.')


def dp_config(clip: float | None, noise: float | None, delta: float) -> DPConfig | None:
    """The DP settings the options ask for, or None; --dp-noise needs --dp-clip."""
    if noise is not None and clip is None:
        raise KilnError(
            f'Got "--dp-noise {noise}" without --dp-clip. The noise is SIGMA x the clipping '
            "norm: add --dp-clip C (e.g. --dp-clip 1.0)."
        )
    if clip is None:
        return None
    return DPConfig(clip=clip, noise=0.0 if noise is None else noise, delta=delta)


def clip_to_norm(update: np.ndarray, clip: float) -> np.ndarray:
    """update·min(1, C/||update||₂)."""
    norm = float(np.linalg.norm(update.astype(np.float64)))
    if norm <= clip:
        return update.astype(np.float32)
    return (update * (clip / norm)).astype(np.float32)


def noisy_mean(total: np.ndarray, count: int, dp: DPConfig, rng: np.random.Generator) -> np.ndarray:
    """(Σ clipped updates + N(0, (σC)²)) / count."""
    noise = rng.normal(0.0, dp.noise * dp.clip, size=total.shape)
    return ((total.astype(np.float64) + noise) / count).astype(np.float32)


def epsilon_spent(noise: float, sample_rate: float, rounds: int, delta: float) -> float:
    """ε after `rounds` rounds of the sampled Gaussian mechanism, from Opacus's RDP analysis
    (what its RDPAccountant computes for the history [(noise, sample_rate, rounds)]); inf
    without noise."""
    if rounds <= 0:
        return 0.0
    if noise <= 0:
        return math.inf
    from opacus.accountants.analysis import rdp as analysis

    orders, one_round = rdp_of_one_round(noise, min(sample_rate, 1.0))
    epsilon, _ = analysis.get_privacy_spent(orders=orders, rdp=one_round * rounds, delta=delta)
    return float(epsilon)


@functools.cache
def rdp_of_one_round(noise: float, sample_rate: float) -> tuple[list[float], np.ndarray]:
    """RDP at Opacus's default orders of one round (RDP adds up over rounds)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    orders = list(RDPAccountant.DEFAULT_ALPHAS)
    rdp = analysis.compute_rdp(q=sample_rate, noise_multiplier=noise, steps=1, orders=orders)
    return orders, np.asarray(rdp)
