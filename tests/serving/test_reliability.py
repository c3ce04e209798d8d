"""Serving under faults and load: a killed replica, and autoscaling up and back down."""

from collections import Counter

import numpy as np
import pytest
import ray

from kiln.actors.replica import ModelReplica
from tests.conftest import wait_for
from tests.serving.load import Load

REPLICA_PREFIX = "SERVE_REPLICA::kiln#KilnServer#"


def live_replicas() -> list[str]:
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith(REPLICA_PREFIX)
    ]


@pytest.fixture(scope="module")
def rows_and_answers(trained_digits, settings_session):
    x = np.random.default_rng(3).uniform(0, 16, size=(4, 64)).astype(np.float32)
    expected = ModelReplica(trained_digits.record, settings_session.storage_uri, "off").predict(x)
    return x.tolist(), expected["predictions"]


@pytest.mark.chaos
def test_a_killed_replica_under_load_loses_under_one_percent(
    trained_digits, settings_session, rows_and_answers
):
    from kiln.serving_control import deploy_models

    rows, answers = rows_and_answers
    url = deploy_models(settings_session, ["digits-mlp"], auth=False, num_replicas=2, num_cpus=0.5)
    assert wait_for(lambda: len(live_replicas()) == 2, timeout_s=60)
    with Load(url, rows, threads=4) as load:
        assert wait_for(lambda: len(load.results) >= 50, timeout_s=60)
        victim = live_replicas()[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        mark = len(load.results)
        assert wait_for(lambda: len(load.results) >= mark + 300, timeout_s=120)
        assert wait_for(
            lambda: len(live_replicas()) == 2 and victim not in live_replicas(), timeout_s=90
        )
    statuses = Counter(status for status, _, _ in load.results)
    assert statuses[200] / len(load.results) >= 0.99, statuses
    assert all(p == answers for status, _, p in load.results if status == 200)  # all right


@pytest.mark.slow
def test_autoscaling_adds_replicas_under_load_and_removes_them_after(
    trained_digits, settings_session, rows_and_answers
):
    from kiln.serving_control import deploy_models

    rows, _ = rows_and_answers
    url = deploy_models(
        settings_session,
        ["digits-mlp"],
        auth=False,
        num_cpus=0.25,
        min_replicas=1,
        max_replicas=3,
        target_ongoing_requests=1,
        upscale_delay_s=0.5,
        downscale_delay_s=2,
        max_batch_size=1,
        batch_wait_timeout_s=0.05,
    )
    assert wait_for(lambda: len(live_replicas()) == 1, timeout_s=60)
    with Load(url, rows, threads=8):
        assert wait_for(lambda: len(live_replicas()) > 1, timeout_s=90), "no upscale under load"
    assert wait_for(lambda: len(live_replicas()) == 1, timeout_s=120), "no downscale after load"
