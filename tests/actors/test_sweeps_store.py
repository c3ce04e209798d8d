"""Sweep summaries in shared storage: listed newest first, read whole, bad ids refused."""

import json

import pytest

from kiln.actors.storage import ArtifactStore
from kiln.actors.sweeps import list_sweeps, publish_sweep, read_sweep
from kiln.training.errors import KilnError, NotFoundError


def summary(sweep_id: str, created_at: float) -> dict:
    history = [{"epoch": 0, "val_loss": 0.9}, {"epoch": 1, "val_loss": 0.7}]
    return {
        "sweep_id": sweep_id,
        "name": "wine",
        "created_at": created_at,
        "registered": "wine@1",
        "metric": "val_loss",
        "mode": "min",
        "trials": [{"trial_id": "t0", "best": 0.7, "history": history}],
        "heatmap": None,
        "path": None,
    }


@pytest.fixture
def storage(tmp_path):
    """A storage root with two sweeps' summaries and Ray Tune's folder, which has none."""
    store = ArtifactStore(str(tmp_path / "storage"))
    for sweep_id, created_at in (("sweep-old", 100.0), ("sweep-new", 200.0)):
        data = json.dumps(summary(sweep_id, created_at)).encode()
        store.publish(f"sweeps/{sweep_id}/summary.json", data)
    store.write("sweeps/sweep-new-train/tuner.pkl", b"ray tune state")
    return str(tmp_path / "storage")


def test_list_is_newest_first_without_histories(storage):
    listed = list_sweeps(storage)
    assert [s["sweep_id"] for s in listed] == ["sweep-new", "sweep-old"]
    assert listed[0]["registered"] == "wine@1"
    assert listed[0]["trials"] == [{"trial_id": "t0", "best": 0.7}]


def test_read_returns_the_whole_summary(storage):
    sweep = read_sweep(storage, "sweep-old")
    assert sweep == summary("sweep-old", 100.0)
    assert sweep["trials"][0]["history"][1]["val_loss"] == 0.7


def test_published_summary_is_read_back_and_listed(storage):
    publish_sweep(storage, summary("sweep-newest", 300.0))
    assert read_sweep(storage, "sweep-newest") == summary("sweep-newest", 300.0)
    assert list_sweeps(storage)[0]["sweep_id"] == "sweep-newest"


def test_nan_is_refused_when_publishing(storage):
    bad = summary("sweep-nan", 1.0)
    bad["trials"][0]["best"] = float("nan")
    with pytest.raises(ValueError):
        publish_sweep(storage, bad)
    assert [s["sweep_id"] for s in list_sweeps(storage)] == ["sweep-new", "sweep-old"]


def test_unknown_sweep_is_a_not_found_error(storage):
    with pytest.raises(NotFoundError, match="unknown sweep sweep-missing"):
        read_sweep(storage, "sweep-missing")
    with pytest.raises(NotFoundError):  # Tune's folder is not a sweep
        read_sweep(storage, "sweep-new-train")
    with pytest.raises(LookupError):
        read_sweep(storage, "sweep-missing")


@pytest.mark.parametrize("bad", ["", "..", ".", "../sweep-old", "a/b", "a\\b", "x..y"])
def test_ids_that_are_not_one_folder_are_refused(storage, bad):
    with pytest.raises(KilnError, match="sweep id") as caught:
        read_sweep(storage, bad)
    assert not isinstance(caught.value, NotFoundError)


def test_no_sweeps_folder_lists_nothing(tmp_path):
    assert list_sweeps(str(tmp_path / "empty")) == []


def test_a_corrupt_summary_is_skipped_in_the_list(storage):
    ArtifactStore(storage).publish("sweeps/sweep-broken/summary.json", b"{not json")
    assert [s["sweep_id"] for s in list_sweeps(storage)] == ["sweep-new", "sweep-old"]
    with pytest.raises(KilnError, match="not valid JSON"):
        read_sweep(storage, "sweep-broken")
