"""Secure aggregation's maths without Ray: masks hide each update and cancel in the sum."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.federated.secagg import (
    FRACTION_BITS,
    dequantize,
    masked_update,
    new_private_key,
    pair_seed,
    public_bytes,
    quantize,
    round_context,
    unmasked_sum,
)


def mask_round(updates: list[np.ndarray], context: bytes) -> list[np.ndarray]:
    keys = [new_private_key() for _ in updates]
    publics = {i: public_bytes(k) for i, k in enumerate(keys)}
    return [masked_update(u, i, keys[i], publics, context) for i, u in enumerate(updates)]


@pytest.mark.parametrize("seed", [0, 1])
def test_unmasked_sum_is_the_weighted_sum_up_to_quantisation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    updates = [rng.normal(0, 0.05, size=5000).astype(np.float32) for _ in range(6)]
    counts = rng.integers(10, 300, size=6)
    weights = counts / counts.sum()
    masked = mask_round([w * u for w, u in zip(weights, updates, strict=True)], b"ctx")
    plain = sum(w * u.astype(np.float64) for w, u in zip(weights, updates, strict=True))
    err = np.abs(unmasked_sum(masked) - plain).max()
    assert err <= 6 * 2.0 ** -(FRACTION_BITS + 1) + 1e-7


@pytest.mark.parametrize("seed", [0, 1])
def test_a_masked_update_reveals_nothing_recognisable(seed: int) -> None:
    rng = np.random.default_rng(seed)
    updates = [rng.normal(0, 0.05, size=20000).astype(np.float32) for _ in range(3)]
    masked = mask_round(updates, round_context("run", 0, 0))
    for plain, hidden in zip(updates, masked, strict=True):
        as_float = hidden.view(np.int32).astype(np.float64)
        assert abs(np.corrcoef(plain, as_float)[0, 1]) < 0.05
        # and it is not the plain fixed-point update either
        assert np.mean(hidden == quantize(plain)) < 0.01


def test_without_one_client_the_masks_do_not_cancel() -> None:
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 0.05, size=1000).astype(np.float32) for _ in range(4)]
    masked = mask_round(updates, b"ctx")
    partial = unmasked_sum(masked[:3])
    assert np.abs(partial - sum(updates[:3])).mean() > 1.0  # garbage, not the three's sum


def test_pair_seeds_agree_and_depend_on_the_context() -> None:
    a, b = new_private_key(), new_private_key()
    ab = pair_seed(a, public_bytes(b), b"r1")
    assert ab == pair_seed(b, public_bytes(a), b"r1")
    assert ab != pair_seed(a, public_bytes(b), b"r2")


def test_quantisation_round_trips_signed_values() -> None:
    values = np.array([-3.5, -1e-6, 0.0, 2.25, 1000.0], np.float32)
    np.testing.assert_allclose(dequantize(quantize(values)), values, atol=2.0**-FRACTION_BITS)
