"""User-facing error types shared by every Kiln package.

They live in `training/`, the bottom package that every other package may import. A
`KilnError` carries a message a user can act on ("Got X for --y. --y must be ..."); the CLI
prints it as one line and the HTTP layer maps it to a 4xx. Anything else is a bug. Membership
is by type alone (`isinstance`, through Ray's wrappers): a subclass defined in any package is
a user error too. Messages name the `kiln` flags; the Python client adds a note saying so.
"""

from typing import Any


class KilnError(ValueError):
    """A mistake in user input or configuration, with a message that says how to fix it."""

    http_status: int | None = None
    """The HTTP status a served Kiln app answered with, when the Python client raised this."""
    retry_after_s: float | None = None
    """The server's `Retry-After`, in seconds, on a 429 or 503 the client gave up on."""


class CorruptArtifactError(KilnError):
    """An artifact whose bytes do not match the checksum recorded in the catalog."""


class NotFoundError(KilnError, LookupError):
    """A model, version, alias or key that the registry does not hold."""


OptionCheck = tuple[bool, str, Any, str]
"""(holds, the option's flag, the value given, the rule it must follow)."""


def check_options(checks: list[OptionCheck]) -> None:
    """A KilnError naming the first option that breaks its rule, and the rule."""
    for holds, flag, value, rule in checks:
        if not holds:
            raise KilnError(f'Got "{value}" for {flag}. {flag} must be {rule}.')
