"""Key revocation, expiry and rotation on every replica of a 2-replica deployment, timed
against the replicas' key cache period, and last use reported in batches. Each replica is
called on its own direct-ingress port (the ports Serve's HAProxy forwards to), so a replica
that kept trusting a dead key could not hide behind the other."""

from __future__ import annotations

import time

import httpx
import pytest
import ray

from kiln.serving.schemas import ServeArgs
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

ROW = {"instances": [[0.0] * 64]}
TTL_S = ServeArgs.model_fields["auth_cache_ttl_s"].default
SLACK_S = 3.0  # request time on a busy 2-core machine
REPORT_S = 0.5


@pytest.fixture(scope="module")
def replica_urls(trained_digits, settings_session, registry_session) -> list[str]:
    from ray.serve.context import _get_global_client

    from kiln.serving_control import APP_NAME, deploy_models

    deploy_models(
        settings_session, ["digits-mlp"], auth=True, num_replicas=2, key_use_report_s=REPORT_S
    )
    controller = _get_global_client()._controller

    def ports() -> list[str]:
        groups = ray.get(controller.get_target_groups.remote(APP_NAME, True))
        return sorted(
            # Every replica runs on this machine, listening on Serve's host (loopback).
            {
                f"http://127.0.0.1:{t.port}"
                for g in groups
                if g.protocol == "HTTP"
                for t in g.targets
            }
        )

    assert wait_for(lambda: len(ports()) == 2, 60), ports()
    return ports()


def predict(url: str, secret: str) -> int:
    headers = {"Authorization": f"Bearer {secret}"}
    reply = httpx.post(f"{url}/v1/models/digits-mlp:predict", json=ROW, headers=headers, timeout=30)
    return reply.status_code


def refused_after(urls: list[str], secret: str, since: float, deadline_s: float) -> list[float]:
    """Seconds from `since` (time.time()) until each replica answered 401, polled together."""
    took: dict[str, float] = {}
    end = time.monotonic() + deadline_s
    while len(took) < len(urls) and time.monotonic() < end:
        for url in urls:
            if url not in took and predict(url, secret) == 401:
                took[url] = time.time() - since
        time.sleep(0.05)
    assert len(took) == len(urls), f"still accepted by {set(urls) - set(took)}"
    return [took[url] for url in urls]


def test_revocation_reaches_every_replica_within_the_cache_period(
    replica_urls, registry_session
) -> None:
    key = ray.get(registry_session.create_key.remote(["predict:digits-mlp"]))
    assert [predict(url, key["secret"]) for url in replica_urls] == [200, 200]  # cached on both
    revoked_at = time.time()
    ray.get(registry_session.revoke_key.remote(key["id"]))
    took = refused_after(replica_urls, key["secret"], revoked_at, 30)
    print(f"\nrevocation took effect per replica after {[round(t, 2) for t in took]} s")
    assert max(took) <= TTL_S + SLACK_S


def test_expiry_reaches_every_replica_at_the_expiry(replica_urls, registry_session) -> None:
    key = ray.get(registry_session.create_key.remote(["predict:digits-mlp"], 4.0))
    assert [predict(url, key["secret"]) for url in replica_urls] == [200, 200]
    took = refused_after(replica_urls, key["secret"], key["expires_at"], 30)
    print(f"\nexpiry took effect per replica {[round(t, 2) for t in took]} s after expires_at")
    assert max(took) <= SLACK_S  # the cache never trusts a key past its own expiry


def test_rotation_keeps_the_old_secret_for_the_grace_only(replica_urls, registry_session) -> None:
    old = ray.get(registry_session.create_key.remote(["predict:digits-mlp"]))
    assert [predict(url, old["secret"]) for url in replica_urls] == [200, 200]
    new = ray.get(registry_session.rotate_key.remote(old["id"], 3.0))
    assert [predict(url, new["secret"]) for url in replica_urls] == [200, 200]
    took = refused_after(replica_urls, old["secret"], new["old_expires_at"], 30)
    print(f"\nthe rotated-out secret ended per replica {[round(t, 2) for t in took]} s after grace")
    assert max(took) <= TTL_S + SLACK_S
    assert [predict(url, new["secret"]) for url in replica_urls] == [200, 200]


def test_last_use_is_reported_in_batches(replica_urls, registry_session) -> None:
    key = ray.get(registry_session.create_key.remote(["predict:digits-mlp"]))
    before = time.time()
    for _ in range(5):
        for url in replica_urls:
            assert predict(url, key["secret"]) == 200

    def last_used() -> float | None:
        rows = ray.get(registry_session.list_keys.remote())
        return next(r["last_used_at"] for r in rows if r["id"] == key["id"])

    assert wait_for(lambda: last_used() is not None, REPORT_S + 10)
    assert before <= (last_used() or 0) <= time.time()
