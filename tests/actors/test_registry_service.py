"""The registry's operations as plain Python (what the Registry actor runs), on real files.

No Ray here: RegistryService is the actor's code, run in-process on a temp SQLite file and a
temp artifact folder.
"""

import multiprocessing
import pickle
import time
from pathlib import Path

import pytest

from kiln.actors.registry import RegistryService, read_verified_files, version_dir
from kiln.training.artifacts import WEIGHTS_FILE, model_from_files
from kiln.training.errors import CorruptArtifactError, KilnError
from tests.conftest import TINY_SPEC, tiny_model_files, wait_for


@pytest.fixture
def registry(tmp_path):
    service = RegistryService(str(tmp_path / "registry.db"), str(tmp_path / "storage"))
    yield service
    service.close()


def register(service: RegistryService, name: str = "m", seed: int = 0, **kwargs):
    return service.register(name, tiny_model_files(seed), TINY_SPEC, {"seed": seed}, {}, **kwargs)


def folders(tmp_path: Path, name: str = "m") -> set[str]:
    root = tmp_path / "storage" / "models" / name
    return {p.name for p in root.iterdir()} if root.exists() else set()


class CreatesFile:
    """Unpickling this creates a file: the proof that a pickle was (or was not) executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# --------------------------------------------------------------------------- versions


def test_registered_versions_load_and_carry_lineage(registry, tmp_path):
    first = register(registry)
    second = registry.register(
        "m", tiny_model_files(1), TINY_SPEC, {}, {"parent": "m", "sweep_id": "s1"}
    )
    assert (first.version, second.version) == (1, 2)
    assert second.lineage["parent"] == "m@1"  # stored as the exact version it meant
    assert second.lineage["sweep_id"] == "s1" and second.lineage["trial_id"] is None
    assert second.lineage["code_version"]  # filled in when the caller did not say
    model, spec = model_from_files(read_verified_files(registry.storage_uri, second))
    assert spec == TINY_SPEC
    assert folders(tmp_path) == {"v1", "v2"}


def test_a_retried_registration_with_the_same_request_id_registers_once(registry):
    a = register(registry, request_id="req-1")
    b = register(registry, request_id="req-1")
    assert a == b
    assert [r.version for r in registry.list_versions("m")] == [1]


def test_leftovers_of_an_interrupted_registration_never_mix_into_a_version(registry, tmp_path):
    register(registry)
    # What a writer killed while writing v2 leaves: a partial file and a stray one, no row.
    leftover = tmp_path / "storage" / version_dir("m", 2)
    leftover.mkdir(parents=True)
    (leftover / WEIGHTS_FILE).write_bytes(b"partial")
    (leftover / "stray.bin").write_bytes(b"x")
    record = register(registry, seed=2)
    assert record.version == 2
    assert sorted(p.name for p in leftover.iterdir()) == sorted(record.artifacts)
    read_verified_files(registry.storage_uri, record)


def test_start_up_removes_version_folders_no_row_points_at(tmp_path):
    service = RegistryService(str(tmp_path / "registry.db"), str(tmp_path / "storage"))
    register(service)
    orphan = tmp_path / "storage" / version_dir("m", 7)
    orphan.mkdir(parents=True)
    (orphan / "model.safetensors").write_bytes(b"partial")
    service.close()
    restarted = RegistryService(str(tmp_path / "registry.db"), str(tmp_path / "storage"))
    assert folders(tmp_path) == {"v1"}
    read_verified_files(restarted.storage_uri, restarted.resolve("m@1"))
    restarted.close()


def test_delete_removes_the_files_and_never_reuses_the_number(registry, tmp_path):
    register(registry)
    register(registry)
    result = registry.delete_version("m", 2)
    assert result["aliases_removed"] == [] and folders(tmp_path) == {"v1"}
    assert register(registry).version == 3


def test_list_versions_of_an_unknown_model_names_it(registry):
    with pytest.raises(LookupError, match="no model named ghost"):
        registry.list_versions("ghost")


@pytest.mark.parametrize("filename", ["../escape", "a/b", ".hidden", ""])
def test_unsafe_artifact_names_are_refused(registry, filename):
    files = {**tiny_model_files(), filename: b"x"}
    with pytest.raises(KilnError, match="artifact file name"):
        registry.register("m", files, TINY_SPEC, {}, {})


# --------------------------------------------------------------------------- no pickle


def test_a_pickle_offered_as_weights_is_refused_at_registration(registry, tmp_path):
    marker = tmp_path / "pwned-at-register"
    files = {**tiny_model_files(), WEIGHTS_FILE: pickle.dumps(CreatesFile(str(marker)))}
    with pytest.raises(CorruptArtifactError, match=WEIGHTS_FILE):
        registry.register("m", files, TINY_SPEC, {}, {})
    assert not marker.exists()
    assert registry.list_models() == [] and folders(tmp_path) == set()


def test_a_pickle_swapped_in_on_disk_is_refused_and_never_executed(registry, tmp_path):
    from kiln.actors.replica import ModelReplica

    record = register(registry)
    marker = tmp_path / "pwned-at-load"
    stored = tmp_path / "storage" / version_dir("m", record.version) / WEIGHTS_FILE
    stored.write_bytes(pickle.dumps(CreatesFile(str(marker))))
    with pytest.raises(CorruptArtifactError, match=WEIGHTS_FILE):
        read_verified_files(registry.storage_uri, record)
    with pytest.raises(CorruptArtifactError, match=WEIGHTS_FILE):
        ModelReplica(record, registry.storage_uri)
    # Even past the checksum (someone rewrote the catalog too), loading parses, never unpickles.
    with pytest.raises(CorruptArtifactError, match=WEIGHTS_FILE):
        model_from_files({**tiny_model_files(), WEIGHTS_FILE: stored.read_bytes()})
    assert not marker.exists()


# --------------------------------------------------------------------------- keys


def test_key_checks_say_why_a_key_is_refused(registry):
    made = registry.create_key(["predict:m"])
    assert registry.verify_key(made["secret"]).ok
    assert registry.verify_key(made["secret"]).scopes == ("predict:m",)
    wrong = made["secret"][:-2] + ("AA" if not made["secret"].endswith("AA") else "BB")
    assert registry.verify_key(wrong).reason == "invalid"
    assert registry.verify_key("kiln_0123456789ab_whatever").reason == "unknown"
    assert registry.verify_key("not-a-key").reason == "malformed"
    registry.revoke_key(made["id"])
    check = registry.verify_key(made["secret"])
    assert (check.ok, check.reason) == (False, "revoked")


def test_an_expired_key_is_refused(registry):
    made = registry.create_key(["predict:*"], expires_in_s=1.0)
    assert registry.verify_key(made["secret"]).ok
    assert wait_for(lambda: registry.verify_key(made["secret"]).reason == "expired", 10)
    assert [k["status"] for k in registry.list_keys()] == ["expired"]


def test_the_sqlite_files_never_hold_a_plaintext_secret(registry, tmp_path):
    secrets = [registry.create_key(["admin"])["secret"] for _ in range(3)]
    registry.revoke_key(secrets[0].split("_")[1])
    for secret in secrets:
        assert registry.verify_key(secret).reason in {"ok", "revoked"}
    db_files = [p for p in tmp_path.glob("registry.db*") if p.is_file()]
    assert any(p.name == "registry.db" for p in db_files)
    blob = b"".join(p.read_bytes() for p in db_files)
    for secret in secrets:
        key_id, random_part = secret.split("_")[1], secret.split("_", 2)[2]
        assert key_id.encode() in blob  # the right file was scanned
        assert secret.encode() not in blob and random_part.encode() not in blob


def test_a_key_acting_on_the_registry_needs_admin_and_is_audited(registry):
    register(registry)
    admin = registry.create_key(["admin"])
    reader = registry.create_key(["predict:*"])
    with pytest.raises(KilnError, match="lacks the admin scope"):
        registry.set_alias("m", "production", 1, key=reader["secret"])
    with pytest.raises(KilnError, match="is malformed"):
        registry.create_key(["admin"], key="nope")
    registry.set_alias("m", "production", 1, key=admin["secret"])
    registry.revoke_key(reader["id"], key=admin["secret"])
    actions = [(e["key_id"], e["action"], e["target"]) for e in registry.audit()]
    assert actions == [
        ("local", "register", "m@1"),
        ("local", "key.create", admin["id"]),
        ("local", "key.create", reader["id"]),
        (admin["id"], "alias", "m@production"),
        (admin["id"], "key.revoke", reader["id"]),
    ]


# --------------------------------------------------------------------------- processes


def register_many(db_path: str, storage: str, worker: int, count: int) -> None:
    service = RegistryService(db_path, storage, recover=False)
    files = tiny_model_files(worker)
    for i in range(count):
        tagged = {**files, "tag.txt": f"{worker}-{i}".encode()}
        service.register("shared", tagged, TINY_SPEC, {"worker": worker, "i": i}, {})
    service.close()


@pytest.mark.slow
def test_eight_processes_on_one_catalog_file_lose_and_duplicate_nothing(tmp_path):
    """The local CLI and a Registry actor may share a file: SQLite's lock must serialize them."""
    db, storage = str(tmp_path / "registry.db"), str(tmp_path / "storage")
    RegistryService(db, storage).close()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=register_many, args=(db, storage, w, 25)) for w in range(8)]
    started = time.perf_counter()
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=300)
    assert [p.exitcode for p in workers] == [0] * 8
    service = RegistryService(db, storage)
    records = service.list_versions("shared")
    assert [r.version for r in records] == list(range(1, 201))
    tags = set()
    for record in records:
        files = read_verified_files(storage, record)
        model_from_files(files)
        tag = files["tag.txt"].decode()
        assert tag == f"{record.metrics['worker']}-{record.metrics['i']}"
        tags.add(tag)
    assert len(tags) == 200
    print(f"8 processes x 25 registrations: {time.perf_counter() - started:.1f} s")
