"""Kiln: train, tune, register and serve models on one Ray cluster.

`from kiln import Kiln` is the Python client. `kiln` is the repository's cluster/ folder (the
front door: settings, connecting to Ray, the `kiln` CLI and the client); kiln.actors,
kiln.training, kiln.tuning, kiln.serving and kiln.federated are the other five folders.

The names below load on first use (PEP 562): a Ray worker importing kiln.training.lm gets
this module but not the client, httpx or the CLI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.client import Kiln
    from kiln.errors import (
        AuthError,
        BadRequestError,
        RateLimitError,
        ServerError,
        UnavailableError,
    )
    from kiln.http_client import AsyncKiln, RetryPolicy
    from kiln.training.errors import CorruptArtifactError, KilnError, NotFoundError

# Where each exported name lives.
_HOMES = {
    "Kiln": "kiln.client",
    "RetryPolicy": "kiln.http_client",
    "AsyncKiln": "kiln.http_client",
    "KilnError": "kiln.training.errors",
    "CorruptArtifactError": "kiln.training.errors",
    "NotFoundError": "kiln.training.errors",
    "AuthError": "kiln.errors",
    "BadRequestError": "kiln.errors",
    "RateLimitError": "kiln.errors",
    "UnavailableError": "kiln.errors",
    "ServerError": "kiln.errors",
}
__all__ = [
    "Kiln",
    "RetryPolicy",
    "AsyncKiln",
    "KilnError",
    "CorruptArtifactError",
    "NotFoundError",
    "AuthError",
    "BadRequestError",
    "RateLimitError",
    "UnavailableError",
    "ServerError",
]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("kiln-maas")
        except PackageNotFoundError:  # run from a checkout that was never installed
            return "0+unknown"
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'kiln' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__, "__version__"])
