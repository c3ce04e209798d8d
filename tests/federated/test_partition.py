"""Partitions without Ray: disjoint, covering, deterministic, skewed as each kind promises."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.federated.partition import PartitionSpec, label_counts, partition_rows
from kiln.training.errors import KilnError


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    # digits-like: 10 classes of uneven size, in a shuffled order
    rng = np.random.default_rng(3)
    return rng.permutation(
        np.repeat(np.arange(10), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    )


@pytest.mark.parametrize("text", ["iid", "dirichlet:0.5", "dirichlet:0.1", "shards:2"])
@pytest.mark.parametrize("clients", [1, 3, 10])
def test_parts_are_disjoint_and_cover(labels: np.ndarray, text: str, clients: int) -> None:
    parts = partition_rows(labels, clients, PartitionSpec.parse(text), seed=0)
    assert len(parts) == clients
    together = np.concatenate(parts)
    assert len(together) == len(labels)
    assert np.array_equal(np.sort(together), np.arange(len(labels)))
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats


def test_same_seed_same_parts_other_seed_other_parts(labels: np.ndarray) -> None:
    spec = PartitionSpec.parse("dirichlet:0.5")
    first = partition_rows(labels, 10, spec, seed=1)
    again = partition_rows(labels, 10, spec, seed=1)
    other = partition_rows(labels, 10, spec, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def classes_per_client(labels: np.ndarray, text: str, seed: int) -> list[int]:
    parts = partition_rows(labels, 10, PartitionSpec.parse(text), seed=seed)
    return [len(c) for c in label_counts(labels, parts)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shards_2_gives_at_most_two_classes_a_client(labels: np.ndarray, seed: int) -> None:
    # 20 shards of ~90 rows over classes of ~180 rows: a shard straddles at most 2 classes,
    # and most lie inside one; iid gives every client all 10.
    found = classes_per_client(labels, "shards:2", seed)
    assert max(found) <= 4
    assert np.mean(found) <= 3.0
    assert min(classes_per_client(labels, "iid", seed)) == 10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dirichlet_skew_grows_as_alpha_shrinks(labels: np.ndarray, seed: int) -> None:
    def dominant_share(text: str) -> float:
        parts = partition_rows(labels, 10, PartitionSpec.parse(text), seed=seed)
        return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))

    iid, half, tenth = (
        dominant_share("iid"),
        dominant_share("dirichlet:0.5"),
        dominant_share("dirichlet:0.1"),
    )
    assert iid < 0.2 < half < tenth


def test_dirichlet_respects_min_partition_size(labels: np.ndarray) -> None:
    parts = partition_rows(
        labels, 10, PartitionSpec.parse("dirichlet:0.5"), 0, min_partition_size=40
    )
    assert min(len(p) for p in parts) >= 40
    with pytest.raises(KilnError, match="min-partition-size"):
        partition_rows(labels, 50, PartitionSpec.parse("dirichlet:0.01"), 0, min_partition_size=30)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("dirichlet:0", "alpha must be greater than 0"),
        ("dirichlet:-1", "alpha must be greater than 0"),
        ("dirichlet:x", "Use iid, dirichlet:ALPHA"),
        ("shards:0", "at least 1"),
        ("stripes", "Use iid, dirichlet:ALPHA"),
    ],
)
def test_bad_partitions_are_one_line_errors(text: str, needle: str) -> None:
    with pytest.raises(KilnError, match=needle) as caught:
        PartitionSpec.parse(text)
    assert text in str(caught.value) and "\n" not in str(caught.value)


def test_more_clients_than_rows_is_an_error() -> None:
    with pytest.raises(KilnError, match='Got "11" for --clients.*10 rows'):
        partition_rows(np.arange(10) % 2, 11, PartitionSpec(), seed=0)


def test_spec_round_trips_through_text() -> None:
    for text in ("iid", "dirichlet:0.5", "shards:2"):
        assert str(PartitionSpec.parse(text)) == text
