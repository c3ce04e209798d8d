"""`kiln federate` on a real local Ray: client actors, rounds, registration, faults, resume.

Every test here starts client actors (about 20 s on 2 cores before round 0), so all are slow.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import ray

from kiln.actors.sources import SourceSpec, open_shard
from kiln.federated.privacy import epsilon_spent
from kiln.training.errors import KilnError

pytestmark = pytest.mark.slow

DIGITS = SourceSpec(uri="sklearn:digits")


def request_for(**changes: Any):
    from kiln.federation import FederateRequest

    base: dict[str, Any] = dict(
        data="sklearn:digits",
        source=DIGITS,
        clients=3,
        rounds=3,
        local_epochs=1,
        lr=5e-3,
        name="fed-digits",
    )
    return FederateRequest(**{**base, **changes})


def parameters_of(settings, registry, record) -> np.ndarray:
    from kiln.actors.registry import read_verified_files
    from kiln.federated.local import parameter_vector
    from kiln.training.artifacts import model_from_files

    model, _ = model_from_files(read_verified_files(settings.storage_uri, record))
    return parameter_vector(model)


@pytest.fixture(scope="module")
def federated_digits(ray_local, settings_session, registry_session):
    """3 iid clients, 3 rounds; the clients' row ids read during round 0 (for coverage)."""
    from kiln.federation import federate_and_register

    seen: dict[str, Any] = {}

    def on_dispatch(round_index: int, clients: list[Any]) -> None:
        if round_index == 0:
            seen["row_ids"] = ray.get([c.row_ids.remote() for c in clients])

    done = federate_and_register(
        settings_session, request_for(), registry_session, on_dispatch=on_dispatch
    )
    return done, seen


def test_partitions_are_disjoint_and_cover_the_training_split(federated_digits):
    _, seen = federated_digits
    parts = seen["row_ids"]
    train_ids = np.concatenate(
        [b.column("row_id").to_numpy() for b in open_shard(DIGITS, "train", 0, 1).batches]
    )
    together = np.concatenate(parts)
    assert len(together) == len(set(together.tolist())) == len(train_ids)
    assert set(together.tolist()) == set(train_ids.tolist())


def test_only_model_shaped_vectors_reach_the_server(federated_digits):
    done, _ = federated_digits
    assert done.parameters == 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    for facts in done.history:
        assert facts["update_sizes"] == [done.parameters]
        assert facts["bytes_up"] == 4 * done.parameters * len(facts["answered"])
        assert facts["answered"] == [0, 1, 2] and facts["dropped"] == []


def test_the_global_model_learns_and_is_registered_with_lineage(federated_digits):
    done, _ = federated_digits
    accuracies = [h["test_accuracy"] for h in done.history]
    assert accuracies[-1] > accuracies[0] and accuracies[-1] > 0.85
    assert done.record.metrics["accuracy"] == pytest.approx(accuracies[-1])
    federated = done.record.lineage["federated"]
    assert federated["clients"] == 3 and federated["partition"] == "iid"
    assert federated["strategy"] == "fedavg" and federated["rounds"] == 3
    assert [r["test_accuracy"] for r in federated["per_round"]] == pytest.approx(accuracies)
    assert sum(federated["client_rows"]) == done.record.lineage["train_rows"] == 1437
    assert done.record.lineage["dataset_sha256"]


def test_more_clients_than_rows_fails_before_any_client_starts(
    ray_local, settings_session, registry_session
):
    from kiln.federation import federate_and_register

    with pytest.raises(KilnError, match='Got "2000" for --clients.*1437 rows'):
        federate_and_register(settings_session, request_for(clients=2000), registry_session)


# ----------------------------------------------------------------------------- slow


def test_one_client_one_epoch_equals_kiln_train_for_one_epoch(
    ray_local, settings_session, registry_session
):
    from kiln.federation import federate_and_register
    from kiln.pipeline import train_and_register
    from kiln.requests import TrainRequest
    from kiln.training.config import TrainConfig

    fed = federate_and_register(
        settings_session,
        request_for(clients=1, rounds=1, lr=1e-3, name="fed-one-client"),
        registry_session,
    )
    cfg = TrainConfig(model="mlp", workers=1, epochs=1, batch_size=32, lr=1e-3, l2=0.0, seed=0)
    central = train_and_register(
        settings_session,
        TrainRequest(data="sklearn:digits", source=DIGITS, train=cfg, name="fed-one-central"),
        registry_session,
    )
    federated_weights = parameters_of(settings_session, registry_session, fed.record)
    central_weights = parameters_of(settings_session, registry_session, central.record)
    moved = np.abs(central_weights - parameters_of_init()).max()
    assert moved > 1e-3  # one epoch did move the weights
    np.testing.assert_allclose(federated_weights, central_weights, atol=2e-5)


def parameters_of_init() -> np.ndarray:
    """kiln train's starting weights for digits with seed 0 (the spec's shape is all it needs)."""
    from kiln.federated.local import initial_weights

    spec = {
        "kind": "mlp",
        "task": "classification",
        "num_features": 64,
        "classes": list(range(10)),
        "hidden": [128, 64],
    }
    return initial_weights(spec, 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_secure_aggregation_reaches_the_same_accuracy(
    ray_local, settings_session, registry_session, seed
):
    from kiln.federation import federate_and_register

    plain = federate_and_register(
        settings_session, request_for(clients=4, seed=seed), registry_session
    )
    secure = federate_and_register(
        settings_session, request_for(clients=4, seed=seed, secure_agg=True), registry_session
    )
    assert abs(secure.test_metrics["accuracy"] - plain.test_metrics["accuracy"]) <= 0.005
    assert secure.record.lineage["federated"]["secure_agg"] is True
    for facts in secure.history:
        assert facts["update_sizes"] == [secure.parameters] and facts["attempts"] == 1
    # The fixed-point sum differs from the float one by quantisation (2^-21 per client and
    # coordinate); three rounds of Adam amplify it a little, nowhere near a changed model.
    gap = parameters_of(settings_session, registry_session, secure.record) - parameters_of(
        settings_session, registry_session, plain.record
    )
    assert np.abs(gap).mean() < 1e-4 and np.abs(gap).max() < 0.01


def test_dp_reports_the_privacy_spent_and_noise_moves_the_model(
    ray_local, settings_session, registry_session
):
    from kiln.federation import federate_and_register

    quiet = federate_and_register(
        settings_session,
        request_for(rounds=2, dp_clip=0.5, dp_noise=0.0, secure_agg=True),
        registry_session,
    )
    noisy = federate_and_register(
        settings_session,
        request_for(rounds=2, dp_clip=0.5, dp_noise=1.0, secure_agg=True),
        registry_session,
    )
    privacy = noisy.privacy
    assert privacy is not None and privacy["level"] == "client"
    assert privacy["epsilon"] == pytest.approx(epsilon_spent(1.0, 1.0, 2, 1e-5))
    assert [h["epsilon"] for h in noisy.history] == pytest.approx(
        [epsilon_spent(1.0, 1.0, r, 1e-5) for r in (1, 2)]
    )
    assert noisy.record.lineage["federated"]["privacy"]["epsilon"] == privacy["epsilon"]
    gap = parameters_of(settings_session, registry_session, noisy.record) - parameters_of(
        settings_session, registry_session, quiet.record
    )
    # noise of std σ·C/K = 1·0.5/3 per coordinate and round, twice
    assert np.std(gap) == pytest.approx(0.5 / 3 * np.sqrt(2), rel=0.2)


@pytest.mark.chaos
def test_a_client_killed_mid_round_drops_out_and_rejoins(
    ray_local, settings_session, registry_session
):
    from kiln.federation import federate_and_register

    def kill_client_2(round_index: int, clients: list[Any]) -> None:
        if round_index == 1:
            ray.kill(clients[2], no_restart=False)

    base = request_for(clients=4, rounds=5, round_timeout_s=120.0)
    undisturbed = federate_and_register(settings_session, base, registry_session)
    killed = federate_and_register(
        settings_session,
        dataclasses.replace(base, run_name=base.run_name + "-kill"),
        registry_session,
        on_dispatch=kill_client_2,
    )
    rounds = killed.history
    assert rounds[1]["dropped"] == [2] and rounds[1]["answered"] == [0, 1, 3]
    assert all(r["answered"] == [0, 1, 2, 3] for r in rounds[2:])  # restarted and rejoined
    gap = abs(killed.test_metrics["accuracy"] - undisturbed.test_metrics["accuracy"])
    assert gap <= 0.01


def test_resume_after_the_driver_died_computes_the_uninterrupted_run(
    ray_local, settings_session, registry_session
):
    from kiln.federation import federate_and_register, load_request

    class DriverDied(Exception):
        pass

    def die_after_round_1(facts: dict[str, Any]) -> None:
        if facts["round"] == 1:
            raise DriverDied

    base = request_for(rounds=4, strategy="fedadam", fraction=0.5)
    whole = federate_and_register(settings_session, base, registry_session)
    broken = dataclasses.replace(base, run_name=base.run_name + "-broken")
    with pytest.raises(DriverDied):
        federate_and_register(
            settings_session, broken, registry_session, on_round=die_after_round_1
        )
    resumed_request = load_request(settings_session, broken.run_name)
    rounds_seen: list[int] = []
    resumed = federate_and_register(
        settings_session,
        resumed_request,
        registry_session,
        on_round=lambda f: rounds_seen.append(f["round"]),
    )
    assert rounds_seen == [2, 3]  # rounds 0 and 1 came from the checkpoint
    assert [h["round"] for h in resumed.history] == [0, 1, 2, 3]
    assert [h["sampled"] for h in resumed.history] == [h["sampled"] for h in whole.history]
    np.testing.assert_allclose(
        parameters_of(settings_session, registry_session, resumed.record),
        parameters_of(settings_session, registry_session, whole.record),
        atol=1e-6,
    )
