"""Old spellings of renamed options, kept hidden for one release (issue 34: one spelling per
concept). The name of the version a command registers is `--register` on every command;
`kiln compress --register-as`, `kiln federate --name` and `kiln models import --name` still
work, with a one-line note on stderr."""

from __future__ import annotations

from typing import TypeVar

from kiln.cli.common import console
from kiln.training.errors import KilnError

T = TypeVar("T")


def renamed(new: T, old: T | None, new_flag: str, old_flag: str, default: T | None = None) -> T:
    """The value of `new_flag`, or of its old spelling `old_flag` when only that was given."""
    if old is None:
        return new
    if new is not None and new != default and new != old:
        raise KilnError(
            f'Got "{new}" for {new_flag} and "{old}" for {old_flag}: they are one option now. '
            f"Give {new_flag} only."
        )
    console.print(
        f"[yellow]{old_flag} is now {new_flag}; the old spelling goes in a later release[/]"
    )
    return old
