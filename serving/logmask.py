"""Masking of the prediction log in the replica, before any row leaves it.

`kiln serve --log-mask FIELD` replaces a named input with a keyed hash: HMAC-SHA256 under the
deployment's secret, cut to 24 bits and stored as a float32 (exact up to 2**24), so equal
values stay equal (counts, categories, drift between windows, retraining on the category) but
the value cannot be read back, nor guessed by hashing candidates, without the secret.
`--log-drop FIELD` stores a missing value (NaN) instead. The log keeps inputs as the model
sees them (a categorical input as its category's code), so both apply to that code.

`--log-mask-text` masks, in a language model's prompts and completions, e-mail addresses,
phone numbers and payment card numbers (Luhn-checked), each replaced by `<KIND:hash8>` (the
same value, the same tag). The pattern set is documented in docs/security.md; Microsoft
Presidio's EmailRecognizer, PhoneRecognizer and CreditCardRecognizer are the anchor (their
entity kinds, the Luhn check on cards); Presidio itself is not a dependency (it brings spaCy).

A model may also carry its own policy in the registry (`kiln models log-policy NAME`,
`LogPolicy`): a replica reads it when it starts and on every reconfigure, and joins it with
serve's options (`LogPolicy.combined`: the union; a field one side masks and the other drops
is dropped, so neither side can weaken the other).

Inputs are named as the model's input schema names them (`input_fields`); a model trained on
bare feature columns (no schema) has positional inputs named `x0`, `x1`, ... as in its drift
reference (cluster/references.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HASH_BITS = 24  # float32 holds every integer below 2**24 exactly
MASK_KEY_BYTES = 32

EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}(?![\w-])"
)
# 13-19 digits, optionally in groups split by single spaces or dashes (then Luhn-checked).
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
# International (+CC ...) or national numbers with 7-15 digits in groups, the common
# separators, an optional (area) code; a bare run of digits must have 10-11 of them. Never a
# part of a longer run of digit groups (a 16-digit number that fails Luhn stays as it is).
PHONE = re.compile(
    r"(?<![\w+])(?<!\d[ .-])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
    r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}"
    r"|\d{3,4}[ .-]\d{3,4}[ .-]\d{3,4}"
    r"|\d{10,11}"
    r")(?![\w])(?![ .-]?\d)"
)
TEXT_KINDS = (("EMAIL", EMAIL), ("CARD", CARD), ("PHONE", PHONE))
"""In this order: a card number is not then also taken for a phone number."""


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def keyed_code(key: bytes, *parts: bytes) -> int:
    """A 24-bit keyed hash of `parts` (HMAC-SHA256)."""
    digest = hmac.new(key, b"\x1f".join(parts), hashlib.sha256).digest()
    return int.from_bytes(digest[:3], "big")


def mask_text(text: str | None, key: bytes) -> str | None:
    """`text` with e-mail addresses, phone numbers and Luhn-valid card numbers replaced by
    `<EMAIL:h>`, `<PHONE:h>`, `<CARD:h>` (h: 8 hex digits of a keyed hash of the value)."""
    if not text:
        return text
    for kind, pattern in TEXT_KINDS:
        text = pattern.sub(_tagger(kind, key), text)
    return text


def _tagger(kind: str, key: bytes) -> Callable[[re.Match[str]], str]:
    return lambda match: _tag(kind, match.group(0), key)


def _tag(kind: str, value: str, key: bytes) -> str:
    digits = re.sub(r"\D", "", value)
    if kind == "CARD" and not luhn_ok(digits):
        return value  # 16 digits that are no card number (an order number, say): kept
    if kind == "PHONE" and not 7 <= len(digits) <= 15:
        return value
    canonical = value.lower() if kind == "EMAIL" else digits
    digest = hmac.new(key, f"{kind}:{canonical}".encode(), hashlib.sha256).hexdigest()
    return f"<{kind}:{digest[:8]}>"


@dataclass(frozen=True)
class LogPolicy:
    """Which inputs of a model the prediction log masks or drops, and whether it masks text."""

    mask: frozenset[str] = frozenset()
    drop: frozenset[str] = frozenset()
    text: bool = False

    @property
    def active(self) -> bool:
        return bool(self.mask or self.drop or self.text)

    def combined(self, other: LogPolicy | None) -> LogPolicy:
        """Both policies at once: the union of their fields, text masked if either asks; a
        field masked by one and dropped by the other is dropped (the stricter of the two)."""
        if other is None:
            return self
        drop = self.drop | other.drop
        return LogPolicy((self.mask | other.mask) - drop, drop, self.text or other.text)

    def to_dict(self) -> dict[str, Any]:
        return {"mask": sorted(self.mask), "drop": sorted(self.drop), "mask_text": self.text}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> LogPolicy:
        data = data or {}
        return cls(
            frozenset(data.get("mask") or ()),
            frozenset(data.get("drop") or ()),
            bool(data.get("mask_text")),
        )


def input_fields(spec: dict[str, Any]) -> list[str] | None:
    """The names the prediction log knows `spec`'s inputs by: its input schema's names, or
    `x0`..`x{n-1}` for positional features; None for a language model (text only)."""
    if spec.get("kind") == "lm":
        return None
    from kiln.training.tabular import Encoding

    encoding = Encoding.from_spec(spec)
    if encoding is not None:
        return list(encoding.names)
    return [f"x{i}" for i in range(int(spec.get("num_features") or 0))]


def describe_fields(names: Sequence[str]) -> str:
    """`age, income` or, for positional inputs, `x0..x63`."""
    if names and list(names) == [f"x{i}" for i in range(len(names))] and len(names) > 3:
        return f"x0..x{len(names) - 1}, the feature positions"
    return ", ".join(names) if names else "none"


def check_fields(fields: Iterable[str], known: dict[str, list[str] | None], what: str) -> None:
    """Raise KilnError for the first of `fields` that none of the models in `known` (model ->
    its input_fields, None for a language model) has; nothing to check without tabular models.
    """
    from kiln.training.errors import KilnError

    tabular = {m: names for m, names in known.items() if names is not None}
    wanted = list(fields)
    if wanted and not tabular:
        models = ", ".join(sorted(known))
        raise KilnError(
            f"{what} {wanted[0]}: {models} takes text, not named inputs; use --mask-text "
            "(kiln serve: --log-mask-text) to mask its prompts and completions"
        )
    every = {n for names in tabular.values() for n in names}
    for name in wanted:
        if name not in every:
            groups: dict[str, list[str]] = {}
            for model, names in sorted(tabular.items()):
                groups.setdefault(describe_fields(names), []).append(model)
            inputs = "; ".join(f"{', '.join(m)} has {d}" for d, m in groups.items())
            raise KilnError(f'{what} "{name}" is not an input of the model: {inputs}')


@dataclass(frozen=True)
class LogMask:
    """What `--log-mask`, `--log-drop` and `--log-mask-text` (and the models' registry
    policies) ask of one replica's log."""

    key: bytes
    mask: frozenset[str] = frozenset()
    drop: frozenset[str] = frozenset()
    text: bool = False
    policies: dict[str, LogPolicy] = field(default_factory=dict)
    """Model name -> its registry policy (`kiln models log-policy`)."""
    columns: dict[str, tuple[tuple[tuple[int, str], ...], tuple[int, ...]]] = field(
        default_factory=dict
    )
    """`name@version` -> ((position, input name) to mask, positions to drop)."""

    @property
    def active(self) -> bool:
        return bool(
            self.mask or self.drop or self.text or any(p.active for p in self.policies.values())
        )

    def policy(self, model: str) -> LogPolicy:
        """Serve's options joined with `model`'s registry policy."""
        return LogPolicy(self.mask, self.drop, self.text).combined(self.policies.get(model))

    def with_policies(self, policies: dict[str, LogPolicy]) -> LogMask:
        """This mask with the registry's policies now in force (positions found again)."""
        return dataclasses.replace(self, policies=dict(policies), columns={})

    def knows(self, model: str, version: int) -> bool:
        return f"{model}@{version}" in self.columns

    def for_model(self, model: str, version: int, input_names: Sequence[str] | None) -> LogMask:
        """This mask with the positions of `model@version`'s inputs it names."""
        names = list(input_names or [])
        policy = self.policy(model)
        positions = (
            tuple((i, n) for i, n in enumerate(names) if n in policy.mask),
            tuple(i for i, n in enumerate(names) if n in policy.drop),
        )
        return dataclasses.replace(self, columns={**self.columns, f"{model}@{version}": positions})

    def mask_inputs(self, model: str, version: int, x: np.ndarray) -> np.ndarray:
        """A masked copy of x (N, num_inputs) float32; x itself when nothing applies. The
        hash covers the input's name and value (not the model), so a value hashes alike in
        every model and version that has that input."""
        masked, dropped = self.columns.get(f"{model}@{version}", ((), ()))
        if not masked and not dropped:
            return x
        out = np.array(x, dtype=np.float32, copy=True)
        for column, name in masked:
            out[:, column] = [
                keyed_code(self.key, name.encode(), value.tobytes()) for value in out[:, column]
            ]
        for column in dropped:
            out[:, column] = np.nan
        return out

    def apply(self, item: Any) -> Any:
        """A logged request (predlog's Logged, or a language model's text entry) masked."""
        if getattr(item, "x", None) is not None and hasattr(item, "predictions"):
            x = self.mask_inputs(item.model, item.version, item.x)
            return dataclasses.replace(item, x=x)
        if hasattr(item, "prompt") and self.policy(getattr(item, "model", "")).text:
            changes: dict[str, Any] = {"prompt": mask_text(item.prompt, self.key)}
            if getattr(item, "completions", None) is not None:
                changes["completions"] = [mask_text(c, self.key) for c in item.completions]
            if hasattr(item, "completion"):
                changes["completion"] = mask_text(item.completion, self.key)
            return dataclasses.replace(item, **changes)
        return item


def parse_fields(values: Iterable[str] | None) -> list[str]:
    """`--log-mask a,b --log-mask c` -> ["a", "b", "c"] (sorted, no duplicates)."""
    fields = {part.strip() for value in values or () for part in value.split(",")}
    return sorted(f for f in fields if f)


def load_mask_key(path: Path) -> str:
    """The deployment's masking secret (hex), made once and kept at `path` (mode 0600): the
    same value hashes alike across restarts, so the log stays joinable for retraining."""
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(MASK_KEY_BYTES)
    path.touch(mode=0o600)
    path.write_text(key)
    return key
