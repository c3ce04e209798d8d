"""Acceptance quality of `kiln train` against scikit-learn, on real Ray Train runs."""

import json

import numpy as np
import pytest

from kiln.actors.shards import attach_dataset, drop_dataset, load_dataset
from kiln.actors.sources import SourceSpec
from kiln.pipeline import train_and_register
from kiln.requests import TrainRequest
from kiln.training.config import TrainConfig
from kiln.training.grad_sync import shared_memory_usable

pytestmark = pytest.mark.slow


def test_logistic_on_breast_cancer_from_a_named_dataset(
    ray_local, settings_session, registry_session
):
    load_dataset(
        SourceSpec(uri="sklearn:breast_cancer", val_fraction=0.1), 2, name="bc", detached=True
    )
    try:
        request = TrainRequest(
            data="bc",
            source=SourceSpec(uri="unused:the-named-dataset-is-used"),
            train=TrainConfig(model="logistic"),  # the defaults: L-BFGS, λ = 1
            name="bc-logistic",
        )
        outcome = train_and_register(settings_session, request, registry_session)
        assert outcome.test_metrics["accuracy"] >= 0.95 and outcome.converged
        lineage = outcome.record.lineage
        assert lineage["dataset_name"] == "bc" and lineage["solver"] == "lbfgs"
        assert lineage["dataset_uri"] == "sklearn:breast_cancer"
        shared = attach_dataset("bc")
        assert shared is not None and shared.val is not None
        assert lineage["train_rows"] == shared.train.num_rows + shared.val.num_rows
        assert attach_dataset("bc") is not None  # the shared shards outlive the run
    finally:
        drop_dataset("bc")


def test_kiln_train_cli_mlp_on_digits_at_its_defaults(ray_local, tmp_path, monkeypatch, capsys):
    """The CLI end to end with no tuning flag, in-process on the session's Ray (the demo test
    covers a fresh one)."""
    from kiln.cli import main

    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    main(
        [
            "train",
            "--data",
            "sklearn:digits",
            "--model",
            "mlp",
            "--register",
            "digits-cli",
            "--json",
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model"] == "digits-cli" and summary["num_workers"] == 2
    # Two workers on this one machine average their gradients in shared memory (x86 CI).
    assert summary["grad_sync"] == ("shm" if shared_memory_usable(1 << 20) else "ddp")
    assert summary["metrics"]["accuracy"] >= 0.95, summary
    assert set(summary["metrics"]) >= {"accuracy", "precision", "recall", "macro_f1"}
    assert np.isfinite(summary["elapsed_s"]) and summary["run"].startswith("digits-cli-")
