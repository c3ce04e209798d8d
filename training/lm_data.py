"""Language-model batches from token streams: random training windows, fixed validation ones.

A Train worker is handed its own token streams (each a TextShardStore's split, mapped from the
object store, read-only), and cuts batches from them here, with no Ray: a training batch is
`batch_size` windows of `block_size + 1` tokens drawn uniformly over every window of every
stream, so a stream weighs as much as the windows it holds and none crosses from one stream
into another; validation loss reads fixed, non-overlapping windows so it is comparable between
evaluations. A window's input is its first `block_size` tokens, its target its last ones.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from kiln.training.errors import KilnError, check_options

logger = logging.getLogger(__name__)


def window_counts(lengths: np.ndarray, block_size: int) -> np.ndarray:
    """Windows of `block_size + 1` tokens each stream holds (0 for a stream too short)."""
    return np.maximum(lengths - block_size, 0)


def sample_windows(
    streams: Sequence[np.ndarray], block_size: int, batch_size: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y), each (batch_size, block_size) int64: windows drawn uniformly from all of the
    streams' `block_size + 1`-token windows, y being x shifted by one token."""
    check_options(
        [
            (block_size >= 1, "--block-size", block_size, "at least 1"),
            (batch_size >= 1, "--batch-size", batch_size, "at least 1"),
        ]
    )
    lengths = np.array([len(s) for s in streams], dtype=np.int64)
    counts = window_counts(lengths, block_size)
    if counts.sum() == 0:
        longest = int(lengths.max(initial=0))
        raise KilnError(
            f'Got "{block_size}" for --block-size, but the longest token stream holds {longest} '
            f"tokens and a window needs {block_size + 1}. Lower --block-size or give more text."
        )
    ends = np.cumsum(counts)
    picks = rng.integers(0, ends[-1], size=batch_size)
    which = np.searchsorted(ends, picks, side="right")
    starts = picks - (ends - counts)[which]
    windows = np.empty((batch_size, block_size + 1), dtype=np.int64)  # (B, T + 1)
    span = np.arange(block_size + 1)
    for stream in np.unique(which):
        rows = np.flatnonzero(which == stream)
        windows[rows] = np.asarray(streams[stream])[starts[rows, None] + span]
    return split_windows(windows)


def eval_windows(stream: np.ndarray, block_size: int, max_windows: int) -> np.ndarray:
    """(N, block_size + 1) int64 windows for validation loss, N <= max_windows: those starting
    every `block_size` tokens, so no two share a target and every target token is scored once;
    when there are more than `max_windows`, evenly spaced ones over the whole stream. The same
    every call; (0, block_size + 1) for a stream shorter than one window."""
    check_options(
        [
            (block_size >= 1, "--block-size", block_size, "at least 1"),
            (max_windows >= 1, "max_windows", max_windows, "at least 1"),
        ]
    )
    available = max((len(stream) - 1) // block_size, 0)
    chosen = np.unique(np.linspace(0, available - 1, num=min(available, max_windows)).round())
    starts = chosen.astype(np.int64) * block_size
    windows = np.asarray(stream)[starts[:, None] + np.arange(block_size + 1)]
    return windows.astype(np.int64).reshape(-1, block_size + 1)


def split_windows(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T + 1) windows -> inputs (B, T) and targets (B, T), contiguous int64."""
    tokens = torch.from_numpy(windows)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
