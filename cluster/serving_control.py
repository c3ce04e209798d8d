"""Deploying Kiln's Serve application on the connected Ray instance."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import ray
from ray import serve

from cluster.runtime import registry_for
from cluster.settings import Settings
from serving.app import AUTH_OFF_WARNING, build_app

APP_NAME = "kiln"

logger = logging.getLogger(__name__)


def deploy_models(
    settings: Settings, refs: list[str], key: str | None = None, **serve_args: Any
) -> str:
    """Serve `refs` at settings' host and port; returns the base URL once it answers.

    Deploying is an admin action: it is audited first, which also refuses a `key` without the
    admin scope before anything changes. `auth=False` in `serve_args` turns key checks off.
    """
    registry = registry_for(settings)
    auth = bool(serve_args.get("auth", True))
    ray.get(registry.record_event.remote("deploy", ",".join(refs), {"auth": auth}, key))
    if not auth:
        logger.warning(AUTH_OFF_WARNING)
    serve.start(
        http_options={"host": settings.kiln_http_host, "port": settings.kiln_http_port},
    )
    serve.run(build_app({"models": refs, **serve_args}), name=APP_NAME, route_prefix="/")
    base_url = f"http://{settings.kiln_http_host}:{settings.kiln_http_port}"
    # serve.run returns once replicas are healthy; check the proxy routes to them too.
    httpx.get(f"{base_url}/docs", timeout=30).raise_for_status()
    return base_url
