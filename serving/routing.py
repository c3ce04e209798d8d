"""Which loaded model version answers a request: names, versions, aliases and canary splits.

Pure logic, no Ray: the Serve replica builds a new `Router` on every `reconfigure` and swaps
it in with one assignment, so a promote or rollback never leaves a request without a route.
A canary split sends `weight`% of a model's bare-name traffic to the canary; with a sticky key
(a request header) the same caller always lands on the same side.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from kiln.serving.schemas import is_canary_weight


@dataclass(frozen=True)
class Split:
    stable: str
    """Version ref (`name@N`) that takes the rest of the traffic."""
    canary: str
    weight: int
    """Percent of bare-name requests sent to the canary, 0-100."""


@dataclass
class Router:
    routes: dict[str, str] = field(default_factory=dict)
    """`name`, `name@N` and `name@alias` -> version ref."""
    splits: dict[str, Split] = field(default_factory=dict)
    """Model name -> its canary split, when one is live."""

    def add(self, ref: str, *aliases: str, default: bool = False) -> None:
        name = ref.partition("@")[0]
        self.routes[ref] = ref
        for alias in aliases:
            self.routes[f"{name}@{alias}"] = ref
        if default or name not in self.routes:
            self.routes[name] = ref

    def split(self, name: str, canary_ref: str, weight: int) -> None:
        if not is_canary_weight(weight):
            raise ValueError(f"canary weight {weight} is outside 0-100")
        self.splits[name] = Split(self.routes[name], canary_ref, weight)

    def pick(self, requested: str, sticky_key: str | None = None) -> str | None:
        """The version ref for a request, or None when nothing by that name is served."""
        split = self.splits.get(requested)
        if split is None or split.weight == 0:
            return self.routes.get(requested)
        return split.canary if bucket(sticky_key) < split.weight else split.stable

    def served(self) -> list[str]:
        return sorted(self.routes)

    def aliases_of(self, ref: str) -> list[str]:
        return sorted(
            key.partition("@")[2]
            for key, target in self.routes.items()
            if target == ref and "@" in key and not key.partition("@")[2].isdigit()
        )


def bucket(sticky_key: str | None) -> float:
    """0 <= b < 100: stable per sticky key, uniform at random without one."""
    if sticky_key is None:
        return random.random() * 100
    digest = hashlib.sha256(sticky_key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100
