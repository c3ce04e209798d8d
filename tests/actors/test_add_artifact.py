"""RegistryService.add_artifact: an export joins an existing version. No Ray: the registry's own
code on a temp SQLite file and a temp artifact folder."""

import pytest
from onnx import TensorProto, helper

from kiln.actors.registry import RegistryService, artifact_path, read_verified_files
from kiln.training.errors import CorruptArtifactError, KilnError, NotFoundError
from tests.actors.test_registry_service import register


@pytest.fixture
def registry(tmp_path):
    service = RegistryService(str(tmp_path / "registry.db"), str(tmp_path / "storage"))
    yield service
    service.close()


def identity_onnx(graph_name: str = "g") -> bytes:
    """The smallest valid ONNX model: outputs = inputs (a real file, built without torch)."""
    inputs = helper.make_tensor_value_info("inputs", TensorProto.FLOAT, ["batch", 4])
    outputs = helper.make_tensor_value_info("outputs", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["inputs"], ["outputs"])], graph_name, [inputs], [outputs]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return model.SerializeToString()


def test_an_added_file_is_checksummed_readable_and_audited(registry):
    first = register(registry)
    data = identity_onnx()
    added = registry.add_artifact("m", 1, "model.onnx", data, {"format": "onnx"})
    assert set(added.artifacts) == {"spec.json", "model.safetensors", "model.onnx"}
    assert registry.resolve("m@1").artifacts == added.artifacts
    assert {k: added.artifacts[k] for k in first.artifacts} == first.artifacts  # unchanged
    assert read_verified_files(registry.storage_uri, added)["model.onnx"] == data
    (entry,) = registry.audit(action="export")
    assert entry["target"] == "m@1" and entry["key_id"] == "local"
    assert entry["detail"] == {
        "format": "onnx",
        "file": "model.onnx",
        "sha256": added.artifacts["model.onnx"],
        "bytes": len(data),
    }


def test_a_version_s_existing_files_never_change(registry, tmp_path):
    register(registry)
    registry.add_artifact("m", 1, "model.onnx", identity_onnx())
    before = registry.resolve("m@1").artifacts
    for filename in ("model.onnx", "spec.json", "model.safetensors"):
        expected = f"m@1 already has {filename} .sha256 {before[filename]}"
        with pytest.raises(KilnError, match=expected):
            registry.add_artifact("m", 1, filename, identity_onnx("other"))
    assert registry.resolve("m@1").artifacts == before
    read_verified_files(registry.storage_uri, registry.resolve("m@1"))  # bytes as they were
    assert len(registry.audit(action="export")) == 1


@pytest.mark.parametrize(
    "filename,data,error,fragment",
    [
        ("../escape.onnx", identity_onnx(), KilnError, "artifact file name"),
        ("sub/model.onnx", identity_onnx(), KilnError, "artifact file name"),
        ("model.onnx", b"not protobuf at all", KilnError, "not a valid ONNX model"),
    ],
)
def test_bad_names_and_bytes_are_refused_before_anything_is_stored(
    registry, tmp_path, filename, data, error, fragment
):
    register(registry)
    with pytest.raises(error, match=fragment):
        registry.add_artifact("m", 1, filename, data)
    assert sorted(p.name for p in (tmp_path / "storage/models/m/v1").iterdir()) == [
        "model.safetensors",
        "spec.json",
    ]


def test_an_unknown_version_is_refused(registry):
    register(registry)
    with pytest.raises(NotFoundError, match="model m has no version 7"):
        registry.add_artifact("m", 7, "model.onnx", identity_onnx())


def test_a_failed_catalog_update_leaves_the_version_as_it_was_and_a_retry_succeeds(
    registry, monkeypatch
):
    register(registry)
    catalog = registry._catalog

    def crash(*_args, **_kwargs):
        raise RuntimeError("killed between the write and the commit")

    with monkeypatch.context() as patched:
        patched.setattr(catalog, "set_artifacts", crash)
        with pytest.raises(RuntimeError, match="killed"):
            registry.add_artifact("m", 1, "model.onnx", identity_onnx("stale"))
    assert "model.onnx" not in registry.resolve("m@1").artifacts  # rolled back, no audit row
    assert registry.audit(action="export") == []
    added = registry.add_artifact("m", 1, "model.onnx", identity_onnx())
    assert read_verified_files(registry.storage_uri, added)["model.onnx"] == identity_onnx()


def test_a_tampered_export_is_refused_at_load(registry, tmp_path):
    register(registry)
    added = registry.add_artifact("m", 1, "model.onnx", identity_onnx())
    path = tmp_path / "storage" / artifact_path("m", 1, "model.onnx")
    path.write_bytes(identity_onnx("tampered"))  # still a valid model, not the one exported
    with pytest.raises(CorruptArtifactError, match="model.onnx failed its checksum"):
        read_verified_files(registry.storage_uri, added)


def test_adding_a_file_needs_an_admin_key_when_a_key_is_given(registry):
    register(registry)
    reader = registry.create_key(["predict:m"])["secret"]
    with pytest.raises(KilnError, match="lacks the admin scope"):
        registry.add_artifact("m", 1, "model.onnx", identity_onnx(), key=reader)
    admin = registry.create_key(["admin"])
    registry.add_artifact("m", 1, "model.onnx", identity_onnx(), key=admin["secret"])
    assert registry.audit(action="export")[0]["key_id"] == admin["id"]
