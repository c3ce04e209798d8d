"""DP clipping, noise and accounting without Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kiln.federated.privacy import DPConfig, clip_to_norm, dp_config, epsilon_spent, noisy_mean
from kiln.training.errors import KilnError


def test_clip_to_norm_scales_only_long_updates() -> None:
    long = np.array([3.0, 4.0], np.float32)
    np.testing.assert_allclose(clip_to_norm(long, 1.0), [0.6, 0.8], rtol=1e-6)
    short = np.array([0.3, 0.4], np.float32)
    np.testing.assert_array_equal(clip_to_norm(short, 1.0), short)


def test_noise_has_the_promised_scale() -> None:
    dp = DPConfig(clip=0.5, noise=2.0)
    found = noisy_mean(np.zeros(200_000), 4, dp, np.random.default_rng(0))
    assert found.std() == pytest.approx(2.0 * 0.5 / 4, rel=0.02)


@pytest.mark.slow  # importing Opacus takes 4-8 s here
def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    one = epsilon_spent(1.0, 0.5, 1, 1e-5)
    ten = epsilon_spent(1.0, 0.5, 10, 1e-5)
    quieter = epsilon_spent(2.0, 0.5, 10, 1e-5)
    assert 0 < one < ten and quieter < ten
    assert epsilon_spent(0.0, 0.5, 3, 1e-5) == math.inf
    # Full participation, one round: never worse than the classic RDP bound of the Gaussian
    # mechanism, min over α of α/(2σ²) + log(1/δ)/(α-1).
    sigma, delta = 1.5, 1e-5
    classic = min(
        a / (2 * sigma**2) + math.log(1 / delta) / (a - 1) for a in np.linspace(1.1, 200, 5000)
    )
    assert epsilon_spent(sigma, 1.0, 1, delta) <= classic + 1e-6
    # and what Opacus's RDPAccountant itself says for the same history
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(1.0, 0.5, 10)]
    assert ten == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)


def test_dp_options_are_checked() -> None:
    assert dp_config(None, None, 1e-5) is None
    with pytest.raises(KilnError, match='Got "--dp-noise 1.0" without --dp-clip'):
        dp_config(None, 1.0, 1e-5)
    with pytest.raises(KilnError, match="--dp-clip"):
        dp_config(0.0, 1.0, 1e-5)
    with pytest.raises(KilnError, match="--dp-delta"):
        dp_config(1.0, 1.0, 1.5)
