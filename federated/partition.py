"""How a dataset's training rows are dealt to federated clients: iid, Dirichlet, shards.

Every client computes the whole partition itself from the labels and the seed, and keeps its
own part: the same seed gives every client the same answer, so the parts are disjoint and
cover the rows without anyone sending a row anywhere. Pure numpy, tested without Ray.

- `iid`: a seeded permutation cut into near-equal parts.
- `dirichlet:ALPHA`: label skew as Flower Datasets' `DirichletPartitioner` draws it: for each
  class, client shares from Dirichlet(ALPHA, ..., ALPHA), the class's rows cut by those
  shares; redrawn (up to 10 times) until every client holds `min_partition_size` rows.
- `shards:S`: McMahan et al. (2017)'s pathological split: rows sorted by label, cut into
  clients×S shards of equal size, S random shards per client (`shards:2`: two classes each).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.training.errors import KilnError

logger = logging.getLogger(__name__)

PARTITION_KINDS = ("iid", "dirichlet", "shards")
MAX_DIRICHLET_DRAWS = 10
"""Flower Datasets' DirichletPartitioner also redraws at most 10 times."""


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed --partition: kind and its one parameter (alpha, or shards per client)."""

    kind: str = "iid"
    alpha: float = 0.0
    shards_per_client: int = 0

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        kind, _, arg = text.strip().partition(":")
        usage = "Use iid, dirichlet:ALPHA (e.g. dirichlet:0.5) or shards:S (e.g. shards:2)."
        if kind == "iid" and not arg:
            return cls("iid")
        if kind == "dirichlet":
            alpha = parse_number(arg, float)
            if alpha is not None and not (alpha > 0 and np.isfinite(alpha)):
                raise KilnError(
                    f'Got "{text}" for --partition. Dirichlet\'s alpha must be greater '
                    "than 0, e.g. dirichlet:0.5."
                )
            if alpha is not None:
                return cls("dirichlet", alpha=alpha)
        if kind == "shards":
            shards = parse_number(arg, int)
            if shards is not None and shards < 1:
                raise KilnError(
                    f'Got "{text}" for --partition. Shards per client must be at least 1, '
                    "e.g. shards:2."
                )
            if shards is not None:
                return cls("shards", shards_per_client=shards)
        raise KilnError(f'Got "{text}" for --partition. {usage}')

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "shards":
            return f"shards:{self.shards_per_client}"
        return "iid"


def parse_number(text: str, kind: type) -> Any:
    """`kind(text)`, or None when it is not such a number."""
    try:
        return kind(text)
    except ValueError:
        return None


def check_partition_fits(
    spec: PartitionSpec, num_rows: int, num_clients: int, min_partition_size: int
) -> None:
    """The partition can give every client rows: said before any client trains."""
    if num_clients > num_rows:
        raise KilnError(
            f'Got "{num_clients}" for --clients, but the training split has {num_rows} rows. '
            f"Use at most {num_rows} clients."
        )
    if spec.kind == "shards" and num_clients * spec.shards_per_client > num_rows:
        raise KilnError(
            f'Got "{spec}" for --partition with {num_clients} clients: {num_clients} x '
            f"{spec.shards_per_client} shards is more than the {num_rows} training rows. "
            "Use fewer clients or shards."
        )
    if min_partition_size * num_clients > num_rows:
        raise KilnError(
            f'Got "{min_partition_size}" for --min-partition-size: {num_clients} clients x '
            f"{min_partition_size} rows is more than the {num_rows} training rows. "
            "Lower it or use fewer clients."
        )


def partition_rows(
    labels: np.ndarray,
    num_clients: int,
    spec: PartitionSpec,
    seed: int,
    min_partition_size: int = 1,
) -> list[np.ndarray]:
    """Sorted row positions (into `labels`) of each client's part; disjoint, covering."""
    check_partition_fits(spec, len(labels), num_clients, min_partition_size)
    rng = np.random.default_rng((seed, 17))
    if spec.kind == "dirichlet":
        parts = dirichlet_parts(labels, num_clients, spec.alpha, rng, min_partition_size)
    elif spec.kind == "shards":
        parts = shard_parts(labels, num_clients, spec.shards_per_client, rng)
    else:
        parts = np.array_split(rng.permutation(len(labels)), num_clients)
    return [np.sort(p).astype(np.int64) for p in parts]


def dirichlet_parts(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_partition_size: int,
) -> list[np.ndarray]:
    """Per class, shares drawn from Dirichlet(alpha); redrawn until every part is big enough."""
    classes = np.unique(labels)
    smallest = 0
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for label in classes:
            rows = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(np.int64)
            for client, piece in enumerate(np.split(rows, cuts)):
                parts[client].append(piece)
        found = [np.concatenate(p) for p in parts]
        smallest = min(len(p) for p in found)
        if smallest >= min_partition_size:
            return found
    raise KilnError(
        f"dirichlet:{alpha:g} over {num_clients} clients left a client with {smallest} rows in "
        f"{MAX_DIRICHLET_DRAWS} draws (--min-partition-size {min_partition_size}). Use a larger "
        "alpha, fewer clients or a smaller --min-partition-size."
    )


def shard_parts(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Rows sorted by label (ties in a seeded order), cut into equal shards, dealt at random."""
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, num_clients * shards_per_client)
    order = rng.permutation(len(shards)).reshape(num_clients, shards_per_client)
    return [np.concatenate([shards[s] for s in row]) for row in order]


def label_counts(labels: np.ndarray, parts: list[np.ndarray]) -> list[dict[int, int]]:
    """Rows of each label in each part (for reports and tests)."""
    found = []
    for part in parts:
        values, counts = np.unique(labels[part], return_counts=True)
        found.append({int(v): int(c) for v, c in zip(values, counts, strict=True)})
    return found
