"""`kiln retrain`: pure parts without Ray, and a retrain on shifted digits with real Ray Train."""

import json
import time

import numpy as np
import pytest

from kiln.actors.feedback import FeedbackService, table_to_ipc
from kiln.retrain import RetrainRequest, heldout_mask
from kiln.serving.predlog import Logged, rows_table
from kiln.training.data import batch_inputs, inputs_to_batch
from kiln.training.errors import KilnError
from kiln.training.tabular import Encoding


def shift_right(x: np.ndarray) -> np.ndarray:
    """Digits images moved one pixel right: the model loses ~40 points of accuracy."""
    images = x.reshape(-1, 8, 8)
    out = np.zeros_like(images)
    out[:, :, 1:] = images[:, :, :-1]
    return out.reshape(-1, 64)


def test_held_out_feedback_is_whole_requests_and_stable():
    ids = [f"r{i // 4}" for i in range(4000)]  # 1000 requests of 4 rows
    mask = heldout_mask(ids, 0.3, seed=0)
    assert 0.25 < mask.mean() < 0.35
    for start in range(0, 4000, 4):
        assert len(set(mask[start : start + 4].tolist())) == 1
    assert np.array_equal(mask, heldout_mask(ids, 0.3, seed=0))
    assert not np.array_equal(mask, heldout_mask(ids, 0.3, seed=1))


def test_logged_inputs_become_shard_rows_again():
    encoding = Encoding.from_spec(
        {
            "inputs": [
                {"name": "age", "kind": "numeric", "type": "double", "impute": 0.0},
                {
                    "name": "city",
                    "kind": "categorical",
                    "type": "string",
                    "categories": ["lyon", "paris"],
                },
            ]
        }
    )
    assert encoding is not None
    x = np.array([[31.0, 0], [40.0, 1], [np.nan, 2], [22.0, 3]], dtype=np.float32)
    batch = inputs_to_batch(x, ["a", "b", "a", "b"], encoding)
    assert np.array_equal(batch_inputs(batch, encoding), x, equal_nan=True)
    assert batch.column("label").to_pylist() == ["a", "b", "a", "b"]


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"since": "yesterday"}, "--since"),
        ({"feedback_weight": 0}, "--feedback-weight"),
        ({"canary_weight": 101}, "--canary-weight"),
        ({"holdout": 1.0}, "--holdout"),
        ({"epochs": 0}, "--epochs"),
    ],
)
def test_bad_options_name_the_flag(options, flag):
    with pytest.raises(KilnError, match=flag):
        RetrainRequest(name="m", **options)


@pytest.mark.slow
def test_retrain_on_shifted_feedback_recovers_accuracy(
    trained_digits, settings_session, registry_session
):
    import ray

    from kiln.actors.shards import load_shards
    from kiln.actors.sources import SourceSpec
    from kiln.retrain import retrain_and_register

    # A copy under its own name: other tests serve digits-mlp.
    parent = trained_digits.record
    files = {}
    from kiln.actors.registry import read_verified_files

    files = read_verified_files(settings_session.storage_uri, parent)
    copy = ray.get(
        registry_session.register.remote(
            "digits-drift", files, parent.spec, parent.metrics, parent.lineage
        )
    )
    train = load_shards(SourceSpec(uri="sklearn:digits"), "train", 1)
    try:
        _, x, y = train.read_arrays()
    finally:
        train.release()
    shifted = shift_right(x[:600])
    store = FeedbackService(settings_session.storage_uri, shard=7)  # files of its own
    now = time.time()
    items = [
        Logged(
            "digits-drift",
            copy.version,
            f"q{i}",
            now - 1,
            200,
            2.0,
            10,
            shifted[i * 10 : (i + 1) * 10],
            np.zeros(10),
        )
        for i in range(60)
    ]
    store.append("digits-drift", table_to_ipc(rows_table(items)))
    ids = [f"q{i}-{j}" for i in range(60) for j in range(10)]
    store.add_labels("digits-drift", ids, [json.dumps(int(v)) for v in y[:600]])

    request = RetrainRequest(name="digits-drift", since="1h", deploy=False)
    done = retrain_and_register(settings_session, request, registry_session)
    assert done["parent"] == copy.ref and done["version"] == copy.version + 1
    assert done["feedback_rows"] == 600 and done["canary"] is None
    before, after = done["heldout_before"]["accuracy"], done["heldout_after"]["accuracy"]
    assert before < 0.75 and after >= before + 0.15, (before, after)
    assert done["test_metrics"]["accuracy"] >= parent.metrics["accuracy"] - 0.05
    record = ray.get(registry_session.resolve.remote("digits-drift"))
    assert record.lineage["parent"] == copy.ref
    assert record.lineage["feedback"]["rows"] == 600
    assert "reference.safetensors" in record.artifacts
