"""A Train worker killed mid-run, and a run continued by its name (real Ray Train)."""

import os
import signal
import uuid

import pytest

from kiln.actors.shards import load_dataset
from kiln.actors.sources import SourceSpec
from kiln.pipeline import (
    evaluate_on,
    fit,
    load_best_model,
    make_spec,
    train_and_register,
)
from kiln.requests import TrainRequest, load_run_request
from kiln.training.config import TrainConfig


@pytest.mark.slow  # about 30-60 s: `make test` keeps to about 10 minutes
@pytest.mark.chaos
def test_a_killed_worker_resumes_from_a_recent_checkpoint(ray_local, settings_session):
    data = load_dataset(SourceSpec(uri="sklearn:digits"), 2)
    cfg = TrainConfig(model="mlp", workers=2, epochs=10, batch_size=32, lr=2e-3)
    killed: dict[str, int] = {}

    def kill_rank_1_after_epoch_3(metrics):
        if metrics["epoch"] == 3 and not killed:
            killed["pid"] = metrics["workers"][1]["pid"]
            os.kill(killed["pid"], signal.SIGKILL)

    try:
        spec = make_spec(cfg, data.train)
        result, history = fit(
            cfg,
            spec,
            data,
            settings_session,
            f"chaos-{uuid.uuid4().hex[:8]}",
            kill_rank_1_after_epoch_3,
        )
        model = load_best_model(result.checkpoint, spec)
        accuracy = evaluate_on(model, spec, data.test)["accuracy"]
    finally:
        data.release()
    epochs = [m["epoch"] for m in history]
    assert killed, "the victim was never killed"
    assert epochs[-1] == 9 and set(epochs) == set(range(10))
    assert len(epochs) - len(set(epochs)) <= 2  # at most 2 epochs redone
    assert killed["pid"] not in {w["pid"] for w in history[-1]["workers"]}  # a new worker group
    assert accuracy >= 0.95


@pytest.mark.slow  # about 30-60 s: `make test` keeps to about 10 minutes
def test_a_run_continues_by_its_name(ray_local, settings_session, registry_session):
    run_name = f"resume-{uuid.uuid4().hex[:8]}"
    first = TrainRequest(
        data="sklearn:iris",
        source=SourceSpec(uri="sklearn:iris"),
        train=TrainConfig(model="logistic", solver="adam", workers=1, epochs=3, lr=0.05),
        name="iris-resume",
        run_name=run_name,
    )
    train_and_register(settings_session, first, registry_session)
    again = load_run_request(settings_session, run_name)  # what `kiln train --resume` reads
    assert again == first
    again.train.epochs = 6
    outcome = train_and_register(settings_session, again, registry_session)
    assert [m["epoch"] for m in outcome.history] == [3, 4, 5]  # epochs 0-2 were not redone
    assert outcome.record.version == 2 and outcome.epochs_run == 6
