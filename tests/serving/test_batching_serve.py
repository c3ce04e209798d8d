"""A served model reports the batching its replica chose from its latency profile, and a
user's values replace it live; requests through the model's own batch queue are answered
(real Ray, Serve and HTTP on loopback)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import ray

from kiln.serving.batching import choose_batching
from tests.conftest import TINY_SPEC, tiny_model_files, wait_for

NAME = "batching-tiny"


def metadata(url: str) -> dict:
    return httpx.get(f"{url}/v1/models/{NAME}", timeout=30).json()


def test_the_replica_chooses_batching_from_the_profile_and_the_user_overrides_it(
    ray_local, settings_session, registry_session
):
    from kiln.serving_control import deploy_models

    ray.get(registry_session.register.remote(NAME, tiny_model_files(7), TINY_SPEC, {}, {}))
    url = deploy_models(settings_session, [NAME], auth=False)

    chosen = metadata(url)["batching"]
    assert chosen["source"] == "profile"
    profile = {int(rows): ms / 1000 for rows, ms in chosen["profile_ms"].items()}
    assert 1 in profile and len(profile) >= 2
    size, wait = choose_batching(profile)
    assert (chosen["max_batch_size"], chosen["batch_wait_timeout_s"]) == (size, wait)
    config = httpx.get(f"{url}/v2/models/{NAME}/config", timeout=30).json()
    assert config["max_batch_size"] == size
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == round(wait * 1e6)

    # The user's values win, live (user_config): a wait makes every request take the batch
    # queue, which must answer them all.
    deploy_models(
        settings_session, [NAME], auth=False, max_batch_size=3, batch_wait_timeout_s=0.004
    )
    assert wait_for(lambda: metadata(url)["batching"]["source"] == "user", 60)
    user = metadata(url)["batching"]
    assert (user["max_batch_size"], user["batch_wait_timeout_s"]) == (3, 0.004)

    def predict(i: int) -> httpx.Response:
        body = {"instances": [[float(i), 0.0, 1.0, 2.0]]}
        return httpx.post(f"{url}/v1/models/{NAME}:predict", json=body, timeout=30)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(predict, range(16)))
    assert [a.status_code for a in answers] == [200] * 16
    assert all(a.json()["predictions"][0] in TINY_SPEC["classes"] for a in answers)
