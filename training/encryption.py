"""Encryption at rest: AES-256-GCM with a data key per file, wrapped by a master key.

Envelope encryption, as the AWS S3 Encryption Client does it in its "instruction file" mode:
each file gets a fresh 256-bit data key; the file's bytes are sealed with it, and the data key,
wrapped by the master key, is written beside the file as `NAME.kkey` (JSON). Rotating the
master key (`kiln keys rotate-master`) then rewrites only the small key files, never the
data, one key file at a time and each replaced whole: a rotation killed midway leaves every
file readable by one of the two master keys, and a rerun finishes the rest.

A sealed file is `MAGIC | chunk size (u32) | nonce prefix (7 bytes) | chunks`, each chunk
AES-GCM with nonce `prefix | index (u32) | last (1 byte)` and the file's name as associated
data (the STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár, 2015): chunks keep
AESGCM under its 2 GiB limit, and reordering, truncating or moving a file to another name
fails authentication. A flipped byte anywhere fails loudly, naming the file.

The master key comes from `KILN_MASTER_KEY`: a path to a file holding 32 bytes (raw, hex or
base64), the key itself as 64 hex characters or base64, or `aws-kms:KEY_ID_OR_ARN` for AWS KMS
(the `aws` extra installs boto3). Only this module and `actors/storage.py` know the format.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import posixpath
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kiln.training.errors import CorruptArtifactError, KilnError

MAGIC = b"KILNAE1\n"
KEY_SUFFIX = ".kkey"
"""The wrapped data key of `NAME` lives in `NAME.kkey`."""
CHUNK_BYTES = 16 * 1024 * 1024
NONCE_PREFIX_BYTES = 7
TAG_BYTES = 16
HEADER = struct.Struct(f"<8sI{NONCE_PREFIX_BYTES}s")
MASTER_KEY_ENV = "KILN_MASTER_KEY"
ENCRYPT_ENV = "KILN_ENCRYPT"
KMS_PREFIX = "aws-kms:"
KEY_FILE_VERSION = 1


class MasterKey(Protocol):
    """What wraps and unwraps data keys: a local key or a KMS key."""

    key_id: str
    """Names the master key in every key file it wrapped (never the key itself)."""

    def wrap(self, data_key: bytes, context: dict[str, str]) -> bytes: ...

    def unwrap(self, wrapped: bytes, context: dict[str, str]) -> bytes: ...


class LocalMasterKey:
    """A 256-bit key held by this process; wraps with AES-256-GCM, the context as AAD."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise KilnError(
                f"the master key is {len(key)} bytes; {MASTER_KEY_ENV} must hold 32 bytes "
                "(make one with `kiln keys new-master FILE`)"
            )
        self._aead = AESGCM(key)
        self.key_id = "local:" + hashlib.sha256(b"kiln-master-key-id\0" + key).hexdigest()[:16]

    def wrap(self, data_key: bytes, context: dict[str, str]) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, data_key, context_bytes(context))

    def unwrap(self, wrapped: bytes, context: dict[str, str]) -> bytes:
        try:
            return self._aead.decrypt(wrapped[:12], wrapped[12:], context_bytes(context))
        except InvalidTag as exc:
            raise CorruptArtifactError(
                f"the data key of {context.get('file')} does not open with master key "
                f"{self.key_id}: its key file was changed"
            ) from exc


class AwsKmsMasterKey:
    """A key in AWS KMS: data keys are wrapped by its Encrypt and unwrapped by its Decrypt,
    with the file name as the encryption context. `client` is a boto3 KMS client."""

    def __init__(self, kms_key_id: str, client: Any = None) -> None:
        if client is None:
            try:
                import boto3
            except ImportError as exc:
                raise KilnError(
                    f"{MASTER_KEY_ENV}={KMS_PREFIX}... needs boto3: pip install 'kiln-maas[aws]'"
                ) from exc
            client = boto3.client("kms")
        self._client = client
        self._kms_key_id = kms_key_id
        self.key_id = KMS_PREFIX + kms_key_id

    def wrap(self, data_key: bytes, context: dict[str, str]) -> bytes:
        answer = self._client.encrypt(
            KeyId=self._kms_key_id, Plaintext=data_key, EncryptionContext=context
        )
        return bytes(answer["CiphertextBlob"])

    def unwrap(self, wrapped: bytes, context: dict[str, str]) -> bytes:
        answer = self._client.decrypt(
            CiphertextBlob=wrapped, EncryptionContext=context, KeyId=self._kms_key_id
        )
        return bytes(answer["Plaintext"])


def context_bytes(context: dict[str, str]) -> bytes:
    return json.dumps(context, sort_keys=True).encode()


def parse_key_text(text: bytes) -> bytes:
    """32 raw bytes, 64 hex characters or base64 of 32 bytes (surrounding whitespace ignored)."""
    if len(text) == 32:
        return text
    stripped = text.strip()
    try:
        if len(stripped) == 64:
            return binascii.unhexlify(stripped)
        return base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KilnError(
            f"{MASTER_KEY_ENV} is neither a key file nor 32 bytes in hex or base64; "
            "make one with `kiln keys new-master FILE`"
        ) from exc


def master_key_from(value: str | None) -> MasterKey | None:
    """The master key a `KILN_MASTER_KEY` value names; None when unset."""
    if not value:
        return None
    if value.startswith(KMS_PREFIX):
        return AwsKmsMasterKey(value[len(KMS_PREFIX) :])
    path = Path(value).expanduser()
    if path.is_file():
        return LocalMasterKey(parse_key_text(path.read_bytes()))
    if "/" in value and not value.endswith("="):
        raise KilnError(f'Got "{value}" for {MASTER_KEY_ENV}, a file that does not exist.')
    return LocalMasterKey(parse_key_text(value.encode()))


def env_master_key() -> MasterKey | None:
    return master_key_from(os.environ.get(MASTER_KEY_ENV))


def encryption_requested() -> bool:
    """Whether `KILN_ENCRYPT` asks new files to be sealed (the CLI sets it for its workers)."""
    return os.environ.get(ENCRYPT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def new_master_key_text() -> str:
    return secrets.token_bytes(32).hex() + "\n"


# ----------------------------------------------------------------------------- sealing


def is_sealed(data: bytes) -> bool:
    return data[: len(MAGIC)] == MAGIC


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + struct.pack(">I?", index, last)


def seal(data: bytes, data_key: bytes, name: str) -> bytes:
    """`data` sealed under `data_key`, bound to the file name `name` (its basename)."""
    aead = AESGCM(data_key)
    prefix = secrets.token_bytes(NONCE_PREFIX_BYTES)
    aad = posixpath.basename(name).encode()
    parts = [HEADER.pack(MAGIC, CHUNK_BYTES, prefix)]
    view = memoryview(data)
    count = max(1, -(-len(data) // CHUNK_BYTES))
    for index in range(count):
        chunk = view[index * CHUNK_BYTES : (index + 1) * CHUNK_BYTES]
        parts.append(aead.encrypt(_nonce(prefix, index, index == count - 1), chunk, aad))
    return b"".join(parts)


def open_sealed(sealed: bytes, data_key: bytes, name: str) -> bytes:
    """The plaintext of a sealed file; CorruptArtifactError naming it when any byte changed."""
    try:
        magic, chunk_bytes, prefix = HEADER.unpack_from(sealed)
        if magic != MAGIC:
            raise ValueError("not a sealed file")
        aead = AESGCM(data_key)
        aad = posixpath.basename(name).encode()
        step = chunk_bytes + TAG_BYTES
        view = memoryview(sealed)[HEADER.size :]
        count = max(1, -(-len(view) // step))
        return b"".join(
            aead.decrypt(_nonce(prefix, i, i == count - 1), view[i * step : (i + 1) * step], aad)
            for i in range(count)
        )
    except (InvalidTag, ValueError, struct.error) as exc:
        raise CorruptArtifactError(
            f"{name} failed authentication: its encrypted bytes were changed on storage"
        ) from exc


@dataclass(frozen=True)
class WrappedKey:
    """The content of a `.kkey` file."""

    master_key_id: str
    wrapped: bytes
    file: str

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "version": KEY_FILE_VERSION,
                "cipher": "AES-256-GCM",
                "master_key": self.master_key_id,
                "file": self.file,
                "wrapped_key": base64.b64encode(self.wrapped).decode(),
            },
            indent=1,
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes, name: str) -> WrappedKey:
        try:
            raw = json.loads(data)
            return cls(raw["master_key"], base64.b64decode(raw["wrapped_key"]), raw["file"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptArtifactError(f"the key file of {name} is not valid: {exc}") from exc


def new_data_key(master: MasterKey, name: str) -> tuple[bytes, WrappedKey]:
    data_key = AESGCM.generate_key(bit_length=256)
    base = posixpath.basename(name)
    return data_key, WrappedKey(master.key_id, master.wrap(data_key, {"file": base}), base)


def unwrap_data_key(masters: Mapping[str, MasterKey], key: WrappedKey, name: str) -> bytes:
    master = masters.get(key.master_key_id)
    if master is None:
        held = ", ".join(sorted(masters)) or "none"
        raise KilnError(
            f"{name} is encrypted under master key {key.master_key_id}, but {MASTER_KEY_ENV} "
            f"holds {held}; set it to that key (or finish `kiln keys rotate-master`)"
        )
    return master.unwrap(key.wrapped, {"file": key.file})


def decrypt_with_env_key(name: str, sealed: bytes, key_file: bytes) -> bytes:
    """A sealed file's plaintext, opened with `KILN_MASTER_KEY`."""
    master = env_master_key()
    if master is None:
        raise KilnError(f"{name} is encrypted; set {MASTER_KEY_ENV} to its master key")
    return decrypt_file_bytes({master.key_id: master}, name, sealed, key_file)


def encrypt_file_bytes(master: MasterKey, name: str, data: bytes) -> tuple[bytes, bytes]:
    """(sealed data, key file bytes) for a file called `name`."""
    data_key, wrapped = new_data_key(master, name)
    return seal(data, data_key, name), wrapped.to_bytes()


def decrypt_file_bytes(
    masters: Mapping[str, MasterKey], name: str, sealed: bytes, key_file: bytes
) -> bytes:
    wrapped = WrappedKey.from_bytes(key_file, name)
    return open_sealed(sealed, unwrap_data_key(masters, wrapped, name), name)


def rewrap(key_file: bytes, name: str, old: MasterKey, new: MasterKey) -> bytes | None:
    """The key file re-wrapped under `new`; None when it already is (a rerun skips it)."""
    wrapped = WrappedKey.from_bytes(key_file, name)
    if wrapped.master_key_id == new.key_id:
        return None
    data_key = unwrap_data_key({old.key_id: old}, wrapped, name)
    again = new.wrap(data_key, {"file": wrapped.file})
    return WrappedKey(new.key_id, again, wrapped.file).to_bytes()


# ------------------------------------------------------------------- local files (checkpoints)


def write_local(path: str | Path, data: bytes, master: MasterKey | None = None) -> None:
    """Write `data` to a local file, sealed when encryption is on (`KILN_ENCRYPT` and a master
    key); the key file is written first, so a sealed file never lacks its key."""
    target = Path(path)
    if master is None and encryption_requested():
        master = env_master_key()
        if master is None:
            raise KilnError(f"{ENCRYPT_ENV} is on but {MASTER_KEY_ENV} is not set")
    if master is None:
        target.write_bytes(data)
        return
    sealed, key_file = encrypt_file_bytes(master, target.name, data)
    Path(str(target) + KEY_SUFFIX).write_bytes(key_file)
    target.write_bytes(sealed)


def read_local(path: str | Path) -> bytes:
    """A local file's plaintext, opened with `KILN_MASTER_KEY` when it is sealed."""
    target = Path(path)
    data = target.read_bytes()
    if not is_sealed(data):
        return data
    key_file = Path(str(target) + KEY_SUFFIX).read_bytes()
    return decrypt_with_env_key(target.name, data, key_file)
