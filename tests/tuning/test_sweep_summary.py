"""A sweep's JSON summary: valid JSON (no NaN), the PNG's heatmap cells, a sorted λ path."""

import json
import math

import numpy as np

from kiln.tuning.report import MAX_HISTORY_ENTRIES, heatmap_bins, heatmap_grid, sweep_summary
from kiln.tuning.tuner import TrialSummary


def trial(trial_id: str, lr: float, l2: float, best: float, epochs: int = 3) -> TrialSummary:
    history = [
        {
            "epoch": e,
            "training_iteration": e + 1,
            "val_loss": best + 1.0 / (e + 1),
            "train_loss": float("nan") if e == 0 else 0.5,
            "pid": 1234,  # Ray's bookkeeping: left out
            "config/lr": lr,  # Ray's flattened config: left out
            "hostname": "node-1",  # not a number: left out
        }
        for e in range(epochs)
    ]
    return TrialSummary(
        trial_id=trial_id,
        config={"lr": lr, "l2": l2, "optimizer": "adam", "batch_size": np.int64(16)},
        metrics={**history[-1], "done": True, "converged": np.bool_(True)} if history else {},
        best=best,
        epochs=epochs,
        history=history,
        status="TERMINATED" if math.isfinite(best) else "ERROR",
    )


TRIALS = [
    trial("t0", 1e-3, 0.0, 0.40),
    trial("t1", 1e-2, 1e-3, 0.25),
    trial("t2", 1e-1, 1.0, float("nan"), epochs=1),  # diverged: no score
    trial("t3", 3e-3, 1e-2, 0.31),
    trial("t4", 3e-2, 10.0, float("inf")),
    trial("t5", 5e-4, 0.1, 0.55),
]


def roundtrip(summary: dict) -> dict:
    return json.loads(json.dumps(summary, allow_nan=False))


def test_minibatch_summary_is_json_and_its_cells_are_heatmap_grids():
    summary = roundtrip(sweep_summary(TRIALS, "val_loss", "min", path=False))
    assert summary["metric"] == "val_loss" and summary["mode"] == "min"
    assert summary["path"] is None
    assert [t["trial_id"] for t in summary["trials"]] == ["t0", "t1", "t2", "t3", "t4", "t5"]

    scored = [t for t in TRIALS if math.isfinite(t.best)]
    cells, lr_edges, l2_edges, has_zero = heatmap_grid(scored, "min", heatmap_bins(len(scored)))
    heatmap = summary["heatmap"]
    assert heatmap["x"] == "lr" and heatmap["y"] == "l2" and has_zero
    expected = [[None if math.isnan(v) else v for v in row] for row in cells.tolist()]
    assert heatmap["cells"] == expected
    assert len(heatmap["x_labels"]) == len(lr_edges) - 1 == cells.shape[1]
    assert heatmap["y_labels"][0] == "0" and len(heatmap["y_labels"]) == cells.shape[0]
    assert len(heatmap["y_labels"]) == 1 + len(l2_edges) - 1
    # λ = 0's row holds t0's score; every scored trial's value is in some cell.
    assert 0.40 in heatmap["cells"][0]
    flat = [v for row in heatmap["cells"] for v in row if v is not None]
    assert sorted(flat) == sorted(t.best for t in scored)


def test_trials_keep_finite_numbers_only():
    by_id = {
        t["trial_id"]: t
        for t in roundtrip(sweep_summary(TRIALS, "val_loss", "min", path=False))["trials"]
    }
    assert by_id["t2"]["best"] is None and by_id["t4"]["best"] is None
    assert by_id["t2"]["status"] == "ERROR" and by_id["t1"]["best"] == 0.25
    assert by_id["t1"]["config"] == {"lr": 1e-2, "l2": 1e-3, "optimizer": "adam", "batch_size": 16}
    first, last = by_id["t1"]["history"][0], by_id["t1"]["history"][-1]
    assert set(first) == {"epoch", "training_iteration", "val_loss", "train_loss"}
    assert first["train_loss"] is None and last["train_loss"] == 0.5
    assert len(by_id["t1"]["history"]) == 3 and by_id["t1"]["epochs"] == 3
    metrics = by_id["t1"]["metrics"]
    assert metrics["converged"] is True and "done" not in metrics and "hostname" not in metrics


def test_long_histories_are_capped_keeping_both_ends():
    long = trial("long", 1e-3, 1e-2, 0.1, epochs=MAX_HISTORY_ENTRIES * 3)
    (entry,) = roundtrip(sweep_summary([long], "val_loss", "min", path=False))["trials"]
    epochs = [h["epoch"] for h in entry["history"]]
    assert len(epochs) == MAX_HISTORY_ENTRIES
    assert epochs[0] == 0 and epochs[-1] == MAX_HISTORY_ENTRIES * 3 - 1
    assert epochs == sorted(set(epochs))


def test_lambda_path_is_sorted_by_lambda_and_has_no_heatmap():
    path_trials = [
        TrialSummary(
            trial_id=f"l2_{i:03d}",
            config={"l2": l2},
            metrics={"loo_mse": v},
            best=v,
            epochs=0,
            history=[],
            status="TERMINATED",
        )
        for i, (l2, v) in enumerate([(1.0, 3.0), (0.0, 5.0), (1e-3, float("nan")), (10.0, 4.0)])
    ]
    summary = roundtrip(sweep_summary(path_trials, "loo_mse", "min", path=True))
    assert summary["heatmap"] is None
    assert summary["path"] == [
        {"l2": 0.0, "value": 5.0},
        {"l2": 1e-3, "value": None},
        {"l2": 1.0, "value": 3.0},
        {"l2": 10.0, "value": 4.0},
    ]
    assert len(summary["trials"]) == 4 and summary["trials"][0]["history"] == []


def test_a_sweep_without_any_score_has_no_heatmap():
    failed = [trial("a", 1e-3, 0.1, float("nan")), trial("b", 1e-2, 0.0, float("nan"))]
    summary = roundtrip(sweep_summary(failed, "val_accuracy", "max", path=False))
    assert summary["heatmap"] is None and len(summary["trials"]) == 2
