"""Sweeps on the shared local Ray: ASHA really stops trials, Optuna runs, reports and lineage."""

import json
import struct
from pathlib import Path

import pytest

from kiln.actors.sources import SourceSpec
from kiln.actors.storage import ArtifactStore
from kiln.actors.sweeps import list_sweeps
from kiln.requests import SweepRequest
from kiln.training.config import TrainConfig
from kiln.tune_pipeline import tune_and_register
from kiln.tuning.config import SweepConfig
from kiln.tuning.space import SearchSpace


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def sweep_request(search: str, scheduler: str, trials: int, epochs: int, name: str):
    return SweepRequest(
        data="sklearn:wine",
        source=SourceSpec(uri="sklearn:wine", val_fraction=0.2),
        train=TrainConfig(model="logistic", solver="adam", workers=1, epochs=epochs, batch_size=16),
        sweep=SweepConfig(
            space=SearchSpace.from_dict({"lr": "1e-4:1e-1", "l2": "0,1e-3:10"}),
            scheduler=scheduler,
            search=search,
            num_trials=trials,
            max_epochs=epochs,
        ),
        name=name,
    )


@pytest.mark.slow  # about 30-60 s: `make test` keeps to about 10 minutes
def test_asha_stops_bad_trials_early_and_registers_the_best(
    ray_local, settings_session, registry_session
):
    request = sweep_request("random", "asha", trials=8, epochs=6, name="wine-tuned")
    request.refit = False  # register the best trial's own weights (kiln tune --no-refit)
    seen: list[str] = []
    outcome = tune_and_register(
        settings_session, request, registry_session, on_result=lambda t, c, r: seen.append(t)
    )
    epochs = sorted(t.epochs for t in outcome.trials)
    assert len(outcome.trials) == 8 and len(set(seen)) == 8  # the live table saw every trial
    assert epochs[0] < 6 and epochs[-1] == 6, epochs  # ASHA cut some trials, kept the best
    assert outcome.trial_epochs < 8 * 6
    assert outcome.best.epochs == 6 and outcome.test_metrics["accuracy"] >= 0.85
    lineage = outcome.record.lineage
    assert lineage["sweep_id"] == request.sweep_id and lineage["trial_id"] == outcome.best.trial_id
    assert (
        lineage["trial_config"] == outcome.best.config and lineage["dataset_uri"] == "sklearn:wine"
    )
    assert lineage["refit"] is None and lineage["train_rows"] == 113  # the trials' rows only
    assert png_size(Path(outcome.artifacts["heatmap"])) == (700, 500)
    assert png_size(Path(outcome.artifacts["curves"])) == (700, 500)
    rows = Path(outcome.artifacts["csv"]).read_text().splitlines()
    assert len(rows) == 1 + 8 and rows[0].startswith("trial_id,status,epochs")


@pytest.mark.slow  # about 30-60 s: `make test` keeps to about 10 minutes
def test_optuna_search_runs_distinct_trials(ray_local, settings_session, registry_session):
    request = sweep_request("optuna", "none", trials=4, epochs=3, name="wine-optuna")
    outcome = tune_and_register(settings_session, request, registry_session)
    assert len(outcome.trials) == 4 and outcome.trial_epochs == 4 * 3
    assert len({t.config["lr"] for t in outcome.trials}) == 4
    assert outcome.record.lineage["sweep"]["search"] == "optuna"
    # The console's copy, in shared storage rather than the driver's KILN_HOME.
    store = ArtifactStore(settings_session.storage_uri)
    summary = json.loads(store.read(f"sweeps/{request.sweep_id}/summary.json"))
    assert summary["registered"] == outcome.record.ref and summary["name"] == "wine-optuna"
    assert summary["sweep_id"] == request.sweep_id and summary["search"] == "optuna"
    assert summary["best_trial_id"] == outcome.best.trial_id and summary["path"] is None
    assert len(summary["trials"]) == 4 and summary["test_metrics"] == outcome.test_metrics
    assert [len(t["history"]) for t in summary["trials"]] == [3, 3, 3, 3]
    assert all("val_loss" in h for t in summary["trials"] for h in t["history"])
    cells = [v for row in summary["heatmap"]["cells"] for v in row if v is not None]
    assert outcome.best.best in cells
    assert request.sweep_id in [s["sweep_id"] for s in list_sweeps(settings_session.storage_uri)]


def test_kiln_tune_json_is_the_contract_and_the_refit_is_in_the_lineage(
    ray_local, settings_session, registry_session, tmp_path, monkeypatch, capsys
):
    """`kiln tune --json` in-process: exactly the issue's keys; the registered model was refit
    on train + validation rows, which its lineage says."""
    from kiln.cli import main
    from kiln.client import Kiln

    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    args = ["tune", "--data", "sklearn:wine", "--model", "logistic", "--solver", "adam"]
    args += ["--trials", "2"]
    args += ["--epochs", "3", "--scheduler", "none", "--val-fraction", "0.2", "--json"]
    main([*args, "--register", "wine-refit", "--refit"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {
        "best_config",
        "best_metrics",
        "num_trials",
        "trial_epochs",
        "model",
        "version",
        "elapsed_s",
        "artifacts",
        "solver",
        "searched",
        "selection",
        "converged",
        "final_rel_loss_change",
        "notes",
    }
    assert set(result["artifacts"]) == {"csv", "heatmap", "curves"}
    assert result["num_trials"] == 2 and result["trial_epochs"] == 2 * 3
    assert set(result["best_config"]) == {"lr", "l2"} and result["model"] == "wine-refit"
    assert {"accuracy", "best_val_loss"} <= set(result["best_metrics"])
    assert result["selection"].endswith("then refitted on train + validation")

    # This Ray's one Registry actor (the session's) holds what the in-process CLI registered.
    kiln = Kiln(settings=settings_session)
    refit = kiln.show(f"wine-refit@{result['version']}")["lineage"]
    # wine: 178 rows, 20% test -> 142, of which 20% validation -> 113 train + 29 validation.
    assert refit["refit"]["rows"] == refit["train_rows"] == 113 + 29
    assert 1 <= refit["refit"]["epochs"] <= 3
    assert refit["refit"]["trial_id"] == refit["trial_id"]


@pytest.mark.slow  # two TorchTrainers of 2 workers each: 1-3 minutes on 2 cores
def test_trials_with_two_workers_each_train_on_two_ray_train_workers(
    ray_local, settings_session, registry_session
):
    # 6 epochs: two ranks of 16-row batches take half the steps of one process per epoch, and
    # the registered model is the best trial's own weights (no refit on more rows).
    request = sweep_request("random", "none", trials=2, epochs=6, name="wine-two-workers")
    request.sweep.workers_per_trial = request.train.workers = 2
    outcome = tune_and_register(settings_session, request, registry_session)
    assert len(outcome.trials) == 2 and outcome.trial_epochs == 2 * 6
    for trial in outcome.trials:
        workers = trial.metrics["workers"]  # gathered from every rank by train_func
        assert trial.metrics["num_workers"] == 2 and len({w["pid"] for w in workers}) == 2
        assert sum(w["rows"] for w in workers) == 113  # every training row, split in two
    assert outcome.test_metrics["accuracy"] >= 0.8


def sklearn_mlp_accuracy(seed: int) -> float:
    """scikit-learn's MLPClassifier() on the rows `kiln tune` fits (train + validation) of
    Kiln's own split at tune's defaults, scored on the same test rows."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    from kiln.actors.sources import read_shard
    from kiln.training.data import batches_to_arrays

    source = SourceSpec(uri="sklearn:digits", test_fraction=0.2, val_fraction=0.15, seed=seed)
    _, x_fit, y_fit = batches_to_arrays(
        [*read_shard(source, "train", 0, 1), *read_shard(source, "val", 0, 1)]
    )
    _, x_test, y_test = batches_to_arrays(read_shard(source, "test", 0, 1))
    scaler = StandardScaler().fit(x_fit)
    model = MLPClassifier(random_state=seed).fit(scaler.transform(x_fit), y_fit)
    return float(model.score(scaler.transform(x_test), y_test))


@pytest.mark.slow
def test_kiln_tune_defaults_on_digits_mlp_match_sklearn_on_two_splits(
    ray_local, tmp_path, monkeypatch, capsys
):
    """No flags but the data, the model and the seed: the defaults must give a good model.

    Measured (2026-12-01): seed 0 0.964 against scikit-learn's 0.972, seed 1 0.978 / 0.983,
    with the best trial's own weights (the default). Refitted on train + validation (the
    default before), seed 0 gave 0.942 here: the winning lr, 0.008, left the fixed-length
    refit's last epoch wherever it landed.
    """
    from kiln.cli import main

    gaps = []
    for seed in (0, 1):
        monkeypatch.setenv("KILN_HOME", str(tmp_path / f"home{seed}"))
        main(["tune", "--data", "sklearn:digits", "--model", "mlp", "--seed", str(seed), "--json"])
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["num_trials"] == 16 and result["trial_epochs"] < 16 * 20  # ASHA cut some
        assert result["selection"].endswith("the best trial's weights")  # no refit by default
        accuracy, reference = result["best_metrics"]["accuracy"], sklearn_mlp_accuracy(seed)
        assert accuracy >= 0.94 and accuracy >= reference - 0.03, (seed, result, reference)
        gaps.append(accuracy - reference)
    assert sum(gaps) / len(gaps) >= -0.015, gaps
