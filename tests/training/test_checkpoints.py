"""Checkpoints without pickle: a resumed optimisation continues exactly where it stopped."""

import json
import pickle
import pickletools
import struct
import zipfile

import numpy as np
import pytest
import safetensors.numpy
import torch

from kiln.training.checkpoints import (
    LoopState,
    TrainingState,
    load_training_checkpoint,
    save_training_checkpoint,
    state_tensors,
)
from kiln.training.config import TrainConfig
from kiln.training.loop import make_lr_scheduler, make_optimizer, update_early_stopping
from kiln.training.models import build_model

SPEC = {"kind": "mlp", "task": "regression", "num_features": 4, "hidden": [8]}


def steps(model, optimizer, scheduler, x, y, n):
    for _ in range(n):
        loss = ((model(x).squeeze(-1) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam", "adamw"])
def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path, optimizer_name):
    cfg = TrainConfig(
        model="mlp", optimizer=optimizer_name, lr=0.05, lr_schedule="cosine", epochs=10
    )
    x, y = torch.randn(32, 4), torch.randn(32)

    torch.manual_seed(0)
    straight = build_model(SPEC)
    opt = make_optimizer(straight, cfg)
    steps(straight, opt, make_lr_scheduler(opt, cfg), x, y, 6)

    torch.manual_seed(0)
    first = build_model(SPEC)
    opt1 = make_optimizer(first, cfg)
    sched1 = make_lr_scheduler(opt1, cfg)
    steps(first, opt1, sched1, x, y, 3)
    saved = TrainingState(first, opt1, sched1, LoopState(epoch=2), state_tensors(first))
    save_training_checkpoint(tmp_path, saved)

    resumed = build_model(SPEC)
    opt2 = make_optimizer(resumed, cfg)
    state = TrainingState(resumed, opt2, make_lr_scheduler(opt2, cfg))
    load_training_checkpoint(tmp_path, state)
    steps(resumed, opt2, state.scheduler, x, y, 3)

    assert state.loop.epoch == 2 and set(state.best_weights) == set(state_tensors(first))
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_checkpoint_folder_holds_no_pickle(tmp_path):
    model = build_model(SPEC)
    cfg = TrainConfig(model="mlp")
    opt = make_optimizer(model, cfg)
    state = TrainingState(
        model, opt, make_lr_scheduler(opt, cfg), LoopState(), state_tensors(model)
    )
    save_training_checkpoint(tmp_path, state)
    suffixes = sorted(p.suffix for p in tmp_path.iterdir())
    assert suffixes == [".json", ".safetensors", ".safetensors", ".safetensors"]
    for path in tmp_path.iterdir():
        data = path.read_bytes()
        assert not zipfile.is_zipfile(path), path  # torch.save's format
        assert not is_pickle_stream(data), path
        if path.suffix == ".json":
            json.loads(data)  # plain data: a JSON parser cannot run code
            continue
        # safetensors: an 8-byte header length, a JSON header, then raw tensor bytes. The
        # header accounts for every byte of the file, so nothing else can hide in it.
        header_length = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + header_length])
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
        assert 8 + header_length + max(ends, default=0) == len(data), path
        assert set(safetensors.numpy.load_file(path)) == set(header) - {"__metadata__"}


def is_pickle_stream(data: bytes) -> bool:
    """Whether `data` parses as a complete pickle (opcodes up to STOP); pickle runs code."""
    try:
        return [op.name for op, _, _ in pickletools.genops(data)][-1:] == ["STOP"]
    except (ValueError, IndexError, EOFError):
        return False


def test_the_checks_would_see_torch_save_and_pickle(tmp_path):
    assert is_pickle_stream(pickle.dumps({"epoch": 2}))
    legacy, zipped = tmp_path / "legacy.pt", tmp_path / "zipped.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    torch.save({"w": torch.zeros(2)}, zipped)
    assert is_pickle_stream(legacy.read_bytes()) and zipfile.is_zipfile(zipped)


def test_early_stopping_counts_epochs_without_improvement():
    state = LoopState()
    scores = [3, 2, 2.5, 1, 1.5, 1.2]
    improved = [update_early_stopping(state, score, epoch) for epoch, score in enumerate(scores)]
    assert improved == [True, True, False, True, False, False]
    assert (state.best_epoch, state.best_score, state.epochs_since_best) == (3, 1, 2)
    assert np.isfinite(state.best_score)
