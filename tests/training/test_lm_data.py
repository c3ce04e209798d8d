"""The window sampler of language-model training, without Ray or a model."""

import numpy as np
import pytest
import torch

from kiln.training.errors import KilnError
from kiln.training.lm_data import eval_windows, sample_windows


def numbered_streams(lengths: list[int]) -> list[np.ndarray]:
    """Stream i holds i * 10_000 + 0, 1, 2, ...: a window's values say where it came from."""
    return [(i * 10_000 + np.arange(n)).astype(np.int32) for i, n in enumerate(lengths)]


def test_windows_are_contiguous_slices_of_one_stream_and_targets_are_shifted_inputs():
    streams = numbered_streams([50, 80])
    x, y = sample_windows(streams, 8, 64, np.random.default_rng(0))
    assert x.shape == y.shape == (64, 8) and x.dtype == y.dtype == torch.int64
    window = torch.cat([x, y[:, -1:]], dim=1)  # (B, T + 1)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert bool((window.diff(dim=1) == 1).all())  # consecutive tokens of one stream
    offsets, sources = window % 10_000, window // 10_000
    assert bool((sources == sources[:, :1]).all())
    assert bool((offsets[:, -1] < torch.tensor([50, 80])[sources[:, 0]]).all())


def test_streams_weigh_as_the_windows_they_hold_and_short_ones_are_skipped():
    block = 16
    streams = numbered_streams([1000 + block, 3000 + block, block])  # 1000, 3000 and 0 windows
    x, _ = sample_windows(streams, block, 20_000, np.random.default_rng(1))
    drawn = np.bincount((x[:, 0] // 10_000).numpy(), minlength=3)
    assert drawn[2] == 0
    assert 2.8 < drawn[1] / drawn[0] < 3.2
    starts = (x[:, 0] % 10_000).numpy()[(x[:, 0] // 10_000).numpy() == 0]
    assert starts.min() == 0 and starts.max() == 999  # every window, the last one included


def test_uint16_read_only_streams_work_and_a_seed_repeats_the_batch():
    stream = np.arange(500, dtype=np.uint16)
    stream.setflags(write=False)  # as mapped from the object store
    first = sample_windows([stream], 32, 4, np.random.default_rng(7))
    again = sample_windows([stream], 32, 4, np.random.default_rng(7))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_no_stream_long_enough_names_block_size_and_the_longest_stream():
    with pytest.raises(KilnError, match=r'"64" for --block-size.*longest token stream holds 40'):
        sample_windows(numbered_streams([40, 12]), 64, 2, np.random.default_rng(0))
    with pytest.raises(KilnError, match="--batch-size"):
        sample_windows(numbered_streams([400]), 64, 0, np.random.default_rng(0))


def test_eval_windows_score_every_target_once_in_order():
    windows = eval_windows(np.arange(23), 5, max_windows=100)
    assert windows.dtype == np.int64 and windows.shape == (4, 6)
    targets = windows[:, 1:].ravel()
    assert targets.tolist() == list(range(1, 21))  # no target twice, none skipped
    assert np.array_equal(eval_windows(np.arange(23), 5, 100), windows)


def test_eval_windows_spread_over_the_stream_when_capped_and_short_streams_give_none():
    windows = eval_windows(np.arange(10_001), 10, max_windows=5)
    assert windows.shape == (5, 11)
    assert windows[0, 0] == 0 and windows[-1, -1] == 10_000  # first and last window kept
    assert eval_windows(np.arange(5), 8, 10).shape == (0, 9)
