"""The console without a Serve deployment: `kiln ui` runs this FastAPI app with uvicorn in its
own process, over the registry actor of the embedded Ray (or a cluster's), so the pages are
there before any model is served. Same routes, same keys and scopes as under `/ui` in Serve.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from kiln.actors.keys import KeyCheck
from kiln.serving.auth import BearerAuth, KeyCache
from kiln.serving.console import routes
from kiln.serving.console.data import Console
from kiln.serving.errors import add_error_handlers


def build_console_app(registry: Any, auth: bool = True) -> FastAPI:
    """The console's routes over `registry` (a Registry actor handle); `auth=False` shows
    every model to anyone who can reach the port."""

    async def verify(secret: str) -> KeyCheck:
        return await registry.verify_key.remote(secret)  # type: ignore[no-any-return]

    console = Console(registry, BearerAuth(verify, KeyCache()) if auth else None)
    app = FastAPI(title="Kiln console", docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)
    app.include_router(routes.router)

    async def this_console() -> Console:
        return console

    app.dependency_overrides[routes.get_console] = this_console

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui")

    return app
