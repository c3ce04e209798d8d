"""Encryption at rest on real files, without Ray: the registry's artifacts and the prediction
log's Parquet are ciphertext on disk (found by a byte search), a flipped byte fails naming the
file, a store without its master key refuses to open, and `kiln keys rotate-master` killed
midway (SIGKILL) is finished by a rerun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest
from safetensors.torch import load as load_safetensors

from kiln.actors.feedback import parquet_bytes
from kiln.actors.registry import RegistryService, read_verified_files, version_dir
from kiln.actors.storage import MARKER_FILE, ArtifactStore
from kiln.training import encryption as enc
from kiln.training.errors import CorruptArtifactError, KilnError
from tests.conftest import TINY_SPEC, tiny_model_files
from tests.e2e.kiln_process import KILN

LOGGED_VALUE = "4242.123456789"
"""An input value no other file holds, logged as a prediction log row would hold it."""


def every_byte(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


@pytest.fixture
def master(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "master.key"
    path.write_text(enc.new_master_key_text())
    monkeypatch.setenv(enc.MASTER_KEY_ENV, str(path))
    monkeypatch.setenv(enc.ENCRYPT_ENV, "1")
    return path


def test_no_plaintext_weights_or_logged_values_on_disk(tmp_path, master):
    service = RegistryService(str(tmp_path / "registry.db"), str(tmp_path / "storage"))
    files = tiny_model_files(seed=3)
    record = service.register("m", files, TINY_SPEC, {}, {})
    weight = next(iter(load_safetensors(files["model.safetensors"]).values()))
    needle = weight.flatten()[:4].numpy().tobytes()  # 16 bytes of real weights
    assert needle in files["model.safetensors"]
    store = ArtifactStore(str(tmp_path / "storage"))
    table = pa.table({"id": ["r-0"], "inputs": [f'{{"x": {LOGGED_VALUE}}}']})
    store.publish("monitoring/m/predictions/day=2026-12-07/s0.parquet", parquet_bytes(table))

    on_disk = every_byte(tmp_path / "storage")
    assert needle not in on_disk
    assert LOGGED_VALUE.encode() not in on_disk
    assert b'"kind": "mlp"' not in on_disk  # spec.json too
    # ... and every file reads back, checked against both of the catalog's checksums.
    assert record.stored_artifacts.keys() == record.artifacts.keys()
    assert read_verified_files(str(tmp_path / "storage"), record) == files
    logged = store.read("monitoring/m/predictions/day=2026-12-07/s0.parquet")
    assert LOGGED_VALUE.encode() in logged
    assert store.list_files("monitoring/m/predictions/day=2026-12-07") == ["s0.parquet"]
    service.close()


def test_a_flipped_byte_fails_loudly_naming_the_file(tmp_path, master):
    service = RegistryService(str(tmp_path / "registry.db"), str(tmp_path / "storage"))
    record = service.register("m", tiny_model_files(), TINY_SPEC, {}, {})
    path = tmp_path / "storage" / version_dir("m", 1) / "model.safetensors"
    flipped = bytearray(path.read_bytes())
    flipped[-40] ^= 0x01
    path.write_bytes(bytes(flipped))
    failed = r"models/m/v1/model.safetensors failed its checksum"
    with pytest.raises(CorruptArtifactError, match=failed):
        read_verified_files(str(tmp_path / "storage"), record)
    # Without the catalog's checksum, AES-GCM's tag catches it by itself.
    store = ArtifactStore(str(tmp_path / "storage"))
    with pytest.raises(CorruptArtifactError, match="model.safetensors failed authentication"):
        store.read(f"{version_dir('m', 1)}/model.safetensors")
    service.close()


def test_an_encrypted_store_refuses_to_open_without_its_master_key(tmp_path, master, monkeypatch):
    ArtifactStore(str(tmp_path / "storage")).write("a/b.bin", b"data")
    monkeypatch.delenv(enc.MASTER_KEY_ENV)
    monkeypatch.delenv(enc.ENCRYPT_ENV)
    with pytest.raises(KilnError, match="holds encrypted files .* set KILN_MASTER_KEY"):
        ArtifactStore(str(tmp_path / "storage"))
    monkeypatch.setenv(enc.MASTER_KEY_ENV, os.urandom(32).hex())
    with pytest.raises(KilnError, match="is encrypted under master key local:"):
        ArtifactStore(str(tmp_path / "storage"))


def test_clear_store_stays_clear_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv(enc.ENCRYPT_ENV, raising=False)
    store = ArtifactStore(str(tmp_path / "storage"))
    store.write("a.bin", b"plain")
    assert (tmp_path / "storage" / "a.bin").read_bytes() == b"plain"
    assert not (tmp_path / "storage" / MARKER_FILE).exists()


def test_encryption_requested_without_a_key_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv(enc.MASTER_KEY_ENV, raising=False)
    with pytest.raises(KilnError, match="KILN_ENCRYPT is on but KILN_MASTER_KEY is not set"):
        ArtifactStore(str(tmp_path / "storage"), encrypt=True)


ROTATE_SLOWLY = textwrap.dedent(
    """
    import sys, time
    from kiln.encryption import rotate_master
    from kiln.settings import Settings
    from kiln.training.encryption import master_key_from

    def tick(path):
        print(path, flush=True)
        time.sleep(0.05)

    rotate_master(Settings(), master_key_from(sys.argv[1]), on_file=tick)
    """
)


def test_rotation_killed_midway_then_finished(tmp_path, master, monkeypatch):
    storage = tmp_path / "storage"
    store = ArtifactStore(str(storage))
    payloads = {f"runs/r/f{i:03d}.bin": os.urandom(64) for i in range(60)}
    for relpath, data in payloads.items():
        store.write(relpath, data)
    new_key = tmp_path / "new.key"
    new_key.write_text(enc.new_master_key_text())
    env = {
        **os.environ,
        "KILN_HOME": str(tmp_path / "home"),
        "KILN_STORAGE": str(storage),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    rotating = subprocess.Popen(
        [sys.executable, "-c", ROTATE_SLOWLY, str(new_key)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert rotating.stdout is not None
    for _ in range(20):  # 20 key files re-wrapped: kill it mid-rotation
        assert rotating.stdout.readline(), "the rotation ended before it could be killed"
    rotating.send_signal(signal.SIGKILL)
    rotating.wait(timeout=30)

    new = enc.master_key_from(str(new_key))
    assert new is not None
    owners = [
        enc.WrappedKey.from_bytes(p.read_bytes(), p.name).master_key_id
        for p in storage.rglob("*.kkey")
    ]
    assert 20 <= owners.count(new.key_id) < len(payloads), "the kill did not land midway"
    # The store still opens with the old key (its marker moves last); the rerun finishes.
    rerun = subprocess.run(
        [*KILN, "keys", "rotate-master", "--new-key", str(new_key), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert '"already": ' in rerun.stdout
    owners = [
        enc.WrappedKey.from_bytes(p.read_bytes(), p.name).master_key_id
        for p in storage.rglob("*.kkey")
    ]
    assert set(owners) == {new.key_id}

    monkeypatch.setenv(enc.MASTER_KEY_ENV, str(new_key))
    reopened = ArtifactStore(str(storage))
    assert {p: reopened.read(p) for p in payloads} == payloads
    # The data files were never rewritten: only key files changed.
    monkeypatch.setenv(enc.MASTER_KEY_ENV, str(master))
    with pytest.raises(KilnError, match=f"encrypted under master key {new.key_id}"):
        ArtifactStore(str(storage))
