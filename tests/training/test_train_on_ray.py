"""Ray Train on resident shards, then the registry round trip (real Ray, real SQLite)."""

import numpy as np
import pytest
import ray
import torch

from kiln.actors.registry import artifact_path, read_verified_files
from kiln.actors.replica import ModelReplica
from kiln.actors.shards import load_shards
from kiln.actors.sources import SourceSpec
from kiln.training.artifacts import WEIGHTS_FILE, model_from_files
from kiln.training.errors import CorruptArtifactError


def test_two_workers_really_ran_and_loss_fell(trained_digits):
    workers = trained_digits.workers
    assert trained_digits.num_workers == 2
    assert len({w["pid"] for w in workers}) == 2  # two processes, one per rank
    assert sum(w["rows"] for w in workers) == trained_digits.record.lineage["train_rows"]
    losses = [m["train_loss"] for m in trained_digits.history]
    assert len(losses) == trained_digits.epochs_run == 8
    assert losses[-1] < 0.5 * losses[0]
    assert trained_digits.test_metrics["accuracy"] > 0.9


def test_registered_version_loads_and_predicts_like_the_evaluated_model(
    trained_digits, settings_session, registry_session
):
    record = ray.get(registry_session.resolve.remote(trained_digits.record.ref))
    assert record.version == trained_digits.record.version
    assert record.metrics["accuracy"] == pytest.approx(trained_digits.test_metrics["accuracy"])
    replica = ModelReplica(record, settings_session.storage_uri, gpu="off")
    test = load_shards(SourceSpec(uri="sklearn:digits"), "test", 1)
    try:
        _, x, y = test.read_arrays()
    finally:
        test.release()
    accuracy = np.mean(np.asarray(replica.predict(x)["predictions"]) == y)
    assert accuracy == pytest.approx(trained_digits.test_metrics["accuracy"])


def test_a_corrupted_artifact_is_refused_naming_the_file(trained_digits, settings_session):
    record = trained_digits.record
    path = (
        f"{settings_session.storage_uri}/{artifact_path(record.name, record.version, WEIGHTS_FILE)}"
    )
    original = open(path, "rb").read()
    before, _ = model_from_files(read_verified_files(settings_session.storage_uri, record))
    try:
        with open(path, "r+b") as f:
            f.seek(len(original) // 2)
            f.write(b"\xff\xff\xff\xff")
        with pytest.raises(CorruptArtifactError, match=WEIGHTS_FILE):
            read_verified_files(settings_session.storage_uri, record)
    finally:
        open(path, "wb").write(original)
    # The restored bytes verify again and load as the very same weights.
    model, _ = model_from_files(read_verified_files(settings_session.storage_uri, record))
    restored, expected = model.state_dict(), before.state_dict()
    assert restored.keys() == expected.keys() and len(restored) > 0
    for name, tensor in expected.items():
        assert torch.equal(restored[name], tensor), name
