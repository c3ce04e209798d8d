"""What the routes depend on: the replica's model host, its key checker, a caller's key.

The `Annotated` aliases below are the routes' only way to the deployment, so a test swaps
them with `api.dependency_overrides[get_host] = ...` and runs the routes without Serve. Every
dependency is `async def`: FastAPI runs a plain `def` one on a worker thread, a hand-off per
request that the handlers avoid by running on Serve's loop (serving/app.py).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve

from kiln.serving.auth import BearerAuth
from kiln.serving.host import ModelHost

# Reads the header only; whether the key is live and allowed is the registry's call (below).
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="KilnKey",
    description="An API key from `kiln keys create`: kiln_<id>_<secret>.",
)
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def serving_replica() -> Any:
    """The KilnServer instance that handles this request (Serve's own lookup for class routes)."""
    return serve.get_replica_context().servable_object


async def get_host() -> ModelHost:
    return serving_replica().host  # type: ignore[no-any-return]


async def get_auth() -> BearerAuth | None:
    """The replica's key checker; None when auth is off."""
    return serving_replica().auth  # type: ignore[no-any-return]


HostDep = Annotated[ModelHost, Depends(get_host)]
AuthDep = Annotated[BearerAuth | None, Depends(get_auth)]


async def authorize(name: str, host: HostDep, auth: AuthDep, credentials: BearerDep) -> None:
    """401/403 unless the key may predict with model `name`; 429 past its rate (auth on)."""
    if auth is None:
        return
    await check_predict_key(name, host, auth, credentials.credentials if credentials else None)


async def check_predict_key(
    name: str, host: ModelHost, auth: BearerAuth, secret: str | None
) -> None:
    """`authorize` on the secret itself (serving/lean.py takes it from the header)."""
    model = name.partition("@")[0]
    check = auth.cached_allow(secret, "predict", model) or await auth.authorize(
        secret, "predict", model
    )
    wait_s = host.limiter.wait_s(check.key_id or "unknown")
    if wait_s > 0:
        raise HTTPException(
            429,
            f"rate limit of {host.args.rate_limit_per_s:g} requests/s for this key exceeded",
            headers={"Retry-After": str(max(1, round(wait_s + 0.5)))},
        )


Authorized = Annotated[None, Depends(authorize)]
"""A route with this parameter runs only for a caller allowed to use its `{name}` model."""
