"""API keys: secrets, salted scrypt hashes, scopes and lifetimes. No Ray and no SQLite here.

A key's secret is `kiln_<id>_<random>`. The id is public (it appears in `kiln keys list` and
in the audit table) and lets the catalog find the row in one lookup; the random part is 256
bits from `secrets`, and only its salted scrypt hash is stored. Checking a presented secret
recomputes the hash and compares with `hmac.compare_digest`, in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from kiln.actors.catalog import NAME_PATTERN
from kiln.training.errors import KilnError

SECRET_PREFIX = "kiln"
KEY_ID_BYTES = 6  # 12 hex characters: unique enough to index, short enough to type
SECRET_BYTES = 32
SALT_BYTES = 16
# scrypt's interactive-login cost. The secrets are 256-bit random, so the hash is not what
# stops guessing; it keeps a leaked catalog from being usable. Measured here: about 0.1 s.
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_DKLEN = 2**14, 8, 1, 32
KDF = f"scrypt:n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P},dklen={SCRYPT_DKLEN}"

ADMIN = "admin"
SCOPE_KINDS = ("predict", "feedback")
DURATION_UNITS_S = {"d": 86_400, "h": 3_600, "m": 60}
DURATION_PATTERN = re.compile(r"^(\d+)([dhm])$")
MAX_LIFETIME_S = 3650 * 86_400
UNUSED_WARNING_DAYS = 90
"""`kiln keys list` flags a live key not used (nor, if never used, created) for this long."""
SECRET_PATTERN = re.compile(rf"^{SECRET_PREFIX}_([0-9a-f]{{{2 * KEY_ID_BYTES}}})_([A-Za-z0-9_-]+)$")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewKey:
    """A freshly made key: the secret (shown once) and what the catalog stores instead."""

    key_id: str
    secret: str
    salt: str
    hash: str


@dataclass(frozen=True)
class KeyCheck:
    """The answer to "may this secret be used?", without the secret or its hash."""

    ok: bool
    reason: str
    """"ok", "malformed", "unknown", "invalid", "expired" or "revoked"."""
    key_id: str | None = None
    scopes: tuple[str, ...] = field(default_factory=tuple)
    expires_at: float | None = None

    def allows(self, kind: str, model: str) -> bool:
        return self.ok and scope_allows(self.scopes, kind, model)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "reason": self.reason,
            "key_id": self.key_id,
            "scopes": list(self.scopes),
            "expires_at": self.expires_at,
        }


def hash_secret(secret: str, salt_hex: str) -> str:
    digest = hashlib.scrypt(
        secret.encode(),
        salt=bytes.fromhex(salt_hex),
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        dklen=SCRYPT_DKLEN,
        maxmem=64 * 1024 * 1024,
    )
    return digest.hex()


def new_key() -> NewKey:
    key_id = secrets.token_hex(KEY_ID_BYTES)
    secret = f"{SECRET_PREFIX}_{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"
    salt = secrets.token_hex(SALT_BYTES)
    return NewKey(key_id=key_id, secret=secret, salt=salt, hash=hash_secret(secret, salt))


def key_id_of(secret: str) -> str | None:
    """The id inside a well-formed secret, or None: malformed secrets never reach the catalog."""
    match = SECRET_PATTERN.match(secret or "")
    return match.group(1) if match else None


def secret_matches(secret: str, salt_hex: str, stored_hash_hex: str) -> bool:
    return hmac.compare_digest(hash_secret(secret, salt_hex), stored_hash_hex)


def parse_scope(scope: str) -> str:
    """`predict:<model|*>`, `feedback:<model|*>` or `admin`, else a KilnError saying so."""
    if scope == ADMIN:
        return scope
    kind, _, target = scope.partition(":")
    if kind in SCOPE_KINDS and (target == "*" or NAME_PATTERN.match(target)):
        return scope
    raise KilnError(
        f'Got "{scope}" for --scope. Use predict:<model|*>, feedback:<model|*> or admin, '
        "e.g. --scope predict:digits-mlp."
    )


def parse_scopes(scopes: list[str] | tuple[str, ...]) -> list[str]:
    if not scopes:
        raise KilnError(
            "Got no --scope. Give at least one: predict:<model|*>, feedback:<model|*> or admin."
        )
    return sorted({parse_scope(s) for s in scopes})


def scope_allows(scopes: tuple[str, ...] | list[str], kind: str, model: str) -> bool:
    """admin allows everything; `kind:*` any model; `kind:<model>` that model only."""
    return ADMIN in scopes or f"{kind}:*" in scopes or f"{kind}:{model}" in scopes


def parse_duration_s(text: str, option: str = "--expires") -> float:
    """`30d`, `12h` or `90m` -> seconds."""
    match = DURATION_PATTERN.match(text.strip()) if text else None
    if match is None or int(match.group(1)) == 0:
        raise KilnError(f'Got "{text}" for {option}. Use a number and a unit: 30d, 12h or 90m.')
    seconds = float(int(match.group(1)) * DURATION_UNITS_S[match.group(2)])
    if seconds > MAX_LIFETIME_S:
        raise KilnError(f'Got "{text}" for {option}. Use at most 3650d (ten years).')
    return seconds


def with_last_use(public: dict[str, Any], last_used_at: float | None, now: float) -> dict[str, Any]:
    """A key's listing with `last_used_at` (None: never, as far as replicas reported) and
    `unused_warning`: a live key idle for UNUSED_WARNING_DAYS is one to revoke."""
    since = last_used_at if last_used_at is not None else public["created_at"]
    idle_days = (now - since) / 86_400
    return {
        **public,
        "last_used_at": last_used_at,
        "unused_warning": public["status"] == "active" and idle_days >= UNUSED_WARNING_DAYS,
    }


def parse_grace_s(text: str) -> float:
    """`--grace`: 0 (the old secret ends now) or a duration (`1h`, `30m`, `7d`)."""
    if text.strip() == "0":
        return 0.0
    return parse_duration_s(text, "--grace")
