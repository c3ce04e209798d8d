"""The errors a caller of Kiln's Python client catches, one class per thing to do about it.

Every one is a `KilnError` (training/errors.py), so `except KilnError` catches all of them,
registry errors raised in-process included. `NotFoundError` is the registry's own class: an
unknown model answers the same type whether the catalog said so or a served app's 404 did.
A served app's answer sets `http_status` and, on a 429 or 503 the client stopped retrying,
`retry_after_s`; `str(exc)` is the server's `{"error": ...}` message (the `message` of
OpenAI's error shape on the language-model routes).

| class | raised for | what to do |
|---|---|---|
| `BadRequestError` | 400, 409, 413, 422: the request itself | fix the input the message names |
| `AuthError` | 401, 403 | a key (`kiln keys create --scope predict:NAME`) with the scope |
| `NotFoundError` | 404 | a model that is served (`GET /v1/models`) |
| `RateLimitError` | 429 after the client's retries | slow down, or a higher `--rate-limit` |
| `UnavailableError` | 503 after retries, no connection, no answer in time | wait; restart |
| `ServerError` | any other 5xx | a bug of Kiln's: the replica's log says more |
"""

from __future__ import annotations

from kiln.training.errors import KilnError, NotFoundError

__all__ = [
    "AuthError",
    "BadRequestError",
    "KilnError",
    "NotFoundError",
    "RateLimitError",
    "ServerError",
    "UnavailableError",
    "error_for_status",
]


class AuthError(KilnError, PermissionError):
    """401 (no key, an unknown, expired or revoked one) or 403 (a key without the scope)."""


class BadRequestError(KilnError):
    """The server refused the request as sent: 400, 409, 413 or 422."""


class RateLimitError(KilnError):
    """Still 429 after the client's retries: the key's rate limit or a full generation queue."""


class UnavailableError(KilnError, ConnectionError):
    """Still 503 after the retries, a server that cannot be reached, or no answer in time."""


class ServerError(KilnError):
    """A 5xx other than 503: a bug of Kiln's, never the caller's input."""


def error_for_status(status: int, message: str, retry_after_s: float | None = None) -> KilnError:
    """The client's exception for an HTTP error status, carrying the server's message."""
    kind: type[KilnError]
    if status in (401, 403):
        kind = AuthError
    elif status == 404:
        kind = NotFoundError
    elif status == 429:
        kind = RateLimitError
    elif status == 503:
        kind = UnavailableError
    elif status >= 500:
        kind = ServerError
    elif status >= 400:
        kind = BadRequestError
    else:
        kind = KilnError
    error = kind(message)
    error.http_status = status
    error.retry_after_s = retry_after_s
    return error
