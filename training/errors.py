"""User-facing error type shared by every Kiln package.

A `KilnError` carries a message a user can act on ("Got X for --y. --y must be ..."); the CLI
prints it as one line and the HTTP layer maps it to a 4xx. Anything else is a bug.
"""


class KilnError(ValueError):
    """A mistake in user input or configuration, with a message that says how to fix it."""


class CorruptArtifactError(KilnError):
    """An artifact whose bytes do not match the checksum recorded in the catalog."""


class NotFoundError(KilnError, LookupError):
    """A model, version, alias or key that the registry does not hold."""
