"""RowChunks and label_targets: the zero-copy views concurrent trials read shards through."""

import numpy as np

from kiln.training.loop import RowChunks, label_targets


def test_row_chunks_gather_rows_across_chunks_in_one_and_two_dimensions():
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.arange(10, dtype=np.int64)
    xs, ys = RowChunks([x[:3], x[3:7], x[7:]]), RowChunks([y[:3], y[3:7], y[7:]])
    rows = np.array([0, 2, 3, 6, 9])
    assert xs.shape == (10, 2) and ys.shape == (10,) and len(ys) == 10
    np.testing.assert_array_equal(xs[rows], x[rows])
    np.testing.assert_array_equal(ys[rows], y[rows])
    np.testing.assert_array_equal(ys[2:8], y[2:8])
    assert ys[np.array([], dtype=np.int64)].shape == (0,)


def test_labels_that_are_class_indices_stay_views_others_are_encoded():
    spec = {"task": "classification", "classes": [0, 1, 2]}
    y = np.array([2, 0, 1], dtype=np.int64)
    assert label_targets(y, spec) is y  # no private copy per trial
    np.testing.assert_array_equal(
        label_targets(np.array([5, 9, 7]), {"task": "classification", "classes": [5, 7, 9]}),
        [0, 2, 1],
    )
    target = np.array([0.5, 1.5], dtype=np.float32)
    assert label_targets(target, {"task": "regression"}) is target


def test_row_chunks_match_the_whole_array_for_sorted_gathers_of_any_spread():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 3)).astype(np.float32)
    cuts = [0, 1, 250, 251, 700, 1000]  # a one-row chunk among them
    xs = RowChunks([x[a:b] for a, b in zip(cuts, cuts[1:], strict=False)])
    for size in (1, 7, 256, 1000):
        rows = np.sort(rng.choice(1000, size, replace=False)).astype(np.int32)
        np.testing.assert_array_equal(xs[rows], x[rows])
    np.testing.assert_array_equal(xs[np.array([999])], x[[999]])  # the last row alone
