"""Aggregation strategies as pure functions of (updates, sample counts), without Ray."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.federated.strategy import FedAdam, FedAvg, FedProx, parse_strategy, weighted_mean
from kiln.training.errors import KilnError


def test_weighted_mean_of_uneven_clients_is_the_mean_over_all_rows() -> None:
    # Each client's "update" is the mean of its rows: the weighted mean must be the mean of all.
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(1000, 7))
    cuts = [0, 13, 400, 401, 1000]
    parts = [rows[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    found = weighted_mean(
        [p.mean(axis=0).astype(np.float32) for p in parts], [len(p) for p in parts]
    )
    np.testing.assert_allclose(found, rows.mean(axis=0), atol=1e-6)


def test_fedavg_adds_the_weighted_update() -> None:
    weights = np.ones(3, np.float32)
    update = FedAvg().aggregate(
        [np.array([1, 0, 0], np.float32), np.array([0, 2, 0], np.float32)], [3, 1]
    )
    np.testing.assert_allclose(FedAvg().apply(weights, update), [1.75, 1.5, 1.0])


def test_fedadam_follows_reddi_et_al() -> None:
    strategy = FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    delta = np.array([0.5, -0.2], np.float32)
    weights = np.zeros(2, np.float32)
    first = strategy.apply(weights, delta)
    m, v = 0.1 * delta.astype(np.float64), 0.01 * delta.astype(np.float64) ** 2
    np.testing.assert_allclose(first, 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-6)
    saved = {k: a.copy() for k, a in strategy.state().items()}
    second = strategy.apply(first, delta)
    resumed = FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    resumed.load_state(saved)
    np.testing.assert_array_equal(resumed.apply(first, delta), second)


def test_parse_strategy() -> None:
    assert isinstance(parse_strategy("fedavg"), FedAvg)
    prox = parse_strategy("fedprox:0.1")
    assert isinstance(prox, FedProx) and prox.proximal_mu == 0.1
    adam = parse_strategy("fedadam:0.05")
    assert isinstance(adam, FedAdam) and adam.eta == 0.05
    for bad in ("fedprox", "fedprox:-1", "fedsgd", "fedadam:0"):
        with pytest.raises(KilnError, match=f'Got "{bad}" for --strategy'):
            parse_strategy(bad)
