"""Artifacts are safetensors + spec.json; bad bytes are refused, pickles never run."""

import pickle

import pytest
import torch

from kiln.training.artifacts import (
    SPEC_FILE,
    WEIGHTS_FILE,
    model_from_files,
    model_to_files,
    sha256_hex,
    verify_files,
)
from kiln.training.errors import CorruptArtifactError
from kiln.training.models import build_model

SPEC = {
    "kind": "mlp",
    "task": "classification",
    "num_features": 8,
    "classes": [0, 1, 2],
    "hidden": [16],
}


def test_round_trip_gives_identical_outputs():
    model = build_model(SPEC).eval()
    files = model_to_files(model, SPEC)
    loaded, spec = model_from_files(files)
    x = torch.randn(4, 8)
    assert spec == SPEC
    assert torch.equal(model(x), loaded(x))


def test_checksum_mismatch_names_the_file():
    files = model_to_files(build_model(SPEC), SPEC)
    checksums = {name: sha256_hex(data) for name, data in files.items()}
    files[WEIGHTS_FILE] = files[WEIGHTS_FILE][:-1] + b"\x00"
    with pytest.raises(CorruptArtifactError, match=WEIGHTS_FILE):
        verify_files(files, checksums)


class _CreatesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_in_place_of_weights_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    files = model_to_files(build_model(SPEC), SPEC)
    files[WEIGHTS_FILE] = pickle.dumps(_CreatesFile(str(marker)))
    with pytest.raises(CorruptArtifactError, match=WEIGHTS_FILE):
        model_from_files(files)
    assert not marker.exists()


def test_bad_spec_json_is_refused():
    files = model_to_files(build_model(SPEC), SPEC)
    files[SPEC_FILE] = b"{not json"
    with pytest.raises(CorruptArtifactError, match=SPEC_FILE):
        model_from_files(files)
