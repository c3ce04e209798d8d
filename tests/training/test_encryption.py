"""Envelope encryption without Ray: sealing, tampering, wrong keys, key files, AWS KMS through
botocore's Stubber (the real client, its HTTP layer replaced by recorded answers)."""

from __future__ import annotations

import base64
import os

import numpy as np
import pytest

from kiln.training import encryption as enc
from kiln.training.errors import CorruptArtifactError, KilnError


@pytest.fixture
def master() -> enc.LocalMasterKey:
    return enc.LocalMasterKey(os.urandom(32))


def test_seal_hides_the_bytes_and_opens_to_them(master):
    data = np.arange(1000, dtype=np.float32).tobytes()
    sealed, key_file = enc.encrypt_file_bytes(master, "models/a/1/model.safetensors", data)
    assert data[:64] not in sealed and enc.is_sealed(sealed)
    opened = enc.decrypt_file_bytes({master.key_id: master}, "model.safetensors", sealed, key_file)
    assert opened == data


def test_large_files_are_chunked_and_chunks_cannot_be_dropped(master, monkeypatch):
    monkeypatch.setattr(enc, "CHUNK_BYTES", 1000)
    data = os.urandom(3500)
    sealed, key_file = enc.encrypt_file_bytes(master, "w.bin", data)
    masters = {master.key_id: master}
    assert enc.decrypt_file_bytes(masters, "w.bin", sealed, key_file) == data
    truncated = sealed[: enc.HEADER.size + 3 * (1000 + enc.TAG_BYTES)]  # the last chunk gone
    with pytest.raises(CorruptArtifactError, match="w.bin failed authentication"):
        enc.decrypt_file_bytes(masters, "w.bin", truncated, key_file)


def test_a_flipped_byte_fails_naming_the_file(master):
    sealed, key_file = enc.encrypt_file_bytes(master, "spec.json", b'{"kind": "mlp"}' * 50)
    flipped = bytearray(sealed)
    flipped[len(flipped) // 2] ^= 0x01
    with pytest.raises(CorruptArtifactError, match="spec.json failed authentication"):
        enc.decrypt_file_bytes({master.key_id: master}, "spec.json", bytes(flipped), key_file)


def test_a_file_renamed_does_not_open(master):
    sealed, key_file = enc.encrypt_file_bytes(master, "model.safetensors", b"x" * 100)
    with pytest.raises(CorruptArtifactError):
        enc.decrypt_file_bytes({master.key_id: master}, "best.safetensors", sealed, key_file)


def test_another_master_key_is_named_in_the_error(master):
    sealed, key_file = enc.encrypt_file_bytes(master, "a.bin", b"secret")
    other = enc.LocalMasterKey(os.urandom(32))
    with pytest.raises(KilnError, match=f"encrypted under master key {master.key_id}"):
        enc.decrypt_file_bytes({other.key_id: other}, "a.bin", sealed, key_file)


def test_rewrap_changes_only_the_key_file_and_is_idempotent(master):
    sealed, key_file = enc.encrypt_file_bytes(master, "a.bin", b"payload")
    new = enc.LocalMasterKey(os.urandom(32))
    again = enc.rewrap(key_file, "a.bin", master, new)
    assert again is not None and enc.rewrap(again, "a.bin", master, new) is None
    assert enc.decrypt_file_bytes({new.key_id: new}, "a.bin", sealed, again) == b"payload"


def test_master_key_from_file_hex_and_base64(tmp_path):
    raw = os.urandom(32)
    path = tmp_path / "master.key"
    path.write_text(raw.hex() + "\n")
    ids = {
        enc.master_key_from(str(path)).key_id,  # type: ignore[union-attr]
        enc.master_key_from(raw.hex()).key_id,  # type: ignore[union-attr]
        enc.master_key_from(base64.b64encode(raw).decode()).key_id,  # type: ignore[union-attr]
    }
    assert len(ids) == 1
    assert enc.master_key_from(None) is None
    with pytest.raises(KilnError, match="neither a key file nor 32 bytes"):
        enc.master_key_from("not-a-key")
    with pytest.raises(KilnError, match="a file that does not exist"):
        enc.master_key_from(str(tmp_path / "missing.key"))


def test_local_files_sealed_when_encryption_is_on(tmp_path, monkeypatch):
    monkeypatch.setenv(enc.MASTER_KEY_ENV, os.urandom(32).hex())
    monkeypatch.setenv(enc.ENCRYPT_ENV, "1")
    enc.write_local(tmp_path / "state.json", b'{"epoch": 3}')
    assert b"epoch" not in (tmp_path / "state.json").read_bytes()
    assert (tmp_path / "state.json.kkey").is_file()
    assert enc.read_local(tmp_path / "state.json") == b'{"epoch": 3}'
    monkeypatch.delenv(enc.ENCRYPT_ENV)
    enc.write_local(tmp_path / "clear.json", b"{}")
    assert enc.read_local(tmp_path / "clear.json") == b"{}"


def test_aws_kms_key_through_the_stubbed_api():
    boto3 = pytest.importorskip("boto3")
    from botocore.stub import Stubber

    client = boto3.client(
        "kms", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    arn = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    master = enc.AwsKmsMasterKey(arn, client=client)
    data_key_holder: dict[str, bytes] = {}
    with Stubber(client) as stub:
        # Encrypt: KMS returns an opaque blob; Kiln stores it and hands it back to Decrypt
        # with the same encryption context (the file's name).
        stub.add_response(
            "encrypt",
            {"CiphertextBlob": b"kms-blob-1", "KeyId": arn},
            {
                "KeyId": arn,
                "Plaintext": stub_any(data_key_holder),
                "EncryptionContext": {"file": "model.safetensors"},
            },
        )
        sealed, key_file = enc.encrypt_file_bytes(master, "models/m/1/model.safetensors", b"w")
        stub.add_response(
            "decrypt",
            {"Plaintext": data_key_holder["key"], "KeyId": arn},
            {
                "CiphertextBlob": b"kms-blob-1",
                "EncryptionContext": {"file": "model.safetensors"},
                "KeyId": arn,
            },
        )
        masters = {master.key_id: master}
        assert enc.decrypt_file_bytes(masters, "model.safetensors", sealed, key_file) == b"w"
        stub.assert_no_pending_responses()
    assert master.key_id == f"aws-kms:{arn}"


def stub_any(holder: dict[str, bytes]) -> object:
    """Matches any data key in a Stubber expectation and keeps it for the Decrypt answer."""

    class Capture:
        def __eq__(self, other: object) -> bool:
            holder["key"] = bytes(other)  # type: ignore[arg-type]
            return len(holder["key"]) == 32

    return Capture()
