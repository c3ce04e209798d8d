"""Deploying Kiln's Serve application on the connected Ray instance."""

from __future__ import annotations

import logging
from typing import Any

import httpx
from ray import serve

from cluster.settings import Settings
from serving.app import build_app

APP_NAME = "kiln"

logger = logging.getLogger(__name__)


def deploy_models(settings: Settings, refs: list[str], **serve_args: Any) -> str:
    """Serve `refs` at settings' host and port; returns the base URL once it answers."""
    serve.start(
        http_options={"host": settings.kiln_http_host, "port": settings.kiln_http_port},
    )
    serve.run(build_app({"models": refs, **serve_args}), name=APP_NAME, route_prefix="/")
    base_url = f"http://{settings.kiln_http_host}:{settings.kiln_http_port}"
    # serve.run returns once replicas are healthy; check the proxy routes to them too.
    httpx.get(f"{base_url}/v1/models", timeout=30).raise_for_status()
    return base_url
