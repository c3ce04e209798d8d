"""FederatedClient: one data holder of a federated run, as a Ray actor.

Each client reads the source itself, deals the partition (deterministic from the seed; see
federated/partition.py) and keeps only its own rows; they never leave the actor. What leaves
is what the server needs: its sample count and column moments (FeatureStats, merged on the
server into the model's standardisation, as ShardStore's are), a fresh public key per round
with secure aggregation, and per round one model-shaped vector: its update, clipped for DP,
masked for secure aggregation. A killed client restarts (max_restarts=-1) and loads its
partition again in its constructor, ready for the next round.

FederatedEvaluator holds the source's test split: the server's public evaluation set, on
which the global model is scored every round. The driver process holds neither.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from kiln.actors.shards import FeatureStats, batch_stats
from kiln.actors.sources import ColumnPlan, SourceSpec, open_shard
from kiln.federated.local import LocalPlan, local_update, model_with_weights
from kiln.federated.partition import PartitionSpec, partition_rows
from kiln.federated.privacy import clip_to_norm
from kiln.federated.secagg import masked_update, new_private_key, public_bytes
from kiln.training.data import ROW_ID, batch_labels, batches_to_arrays, encode_labels
from kiln.training.errors import KilnError
from kiln.training.evaluate import evaluate_model
from kiln.training.loop import label_targets
from kiln.training.tabular import Encoding

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """Who this client is and how the partition is dealt (the same for every client but index)."""

    source: SourceSpec
    partition: str
    index: int
    num_clients: int
    seed: int
    min_partition_size: int = 1


@dataclass(kw_only=True)
class RoundRequest:
    """What the server asks of one client in one round."""

    plan: LocalPlan
    spec: dict[str, Any]
    clip: float | None = None
    """DP: clip the update to this L2 norm."""
    weight: float | None = None
    """Secure aggregation: the client's share of the round's aggregate (w_i, Σ w_i = 1)."""
    peers: dict[int, bytes] = field(default_factory=dict)
    """Secure aggregation: every participant's public key for this attempt, by client index."""
    context: bytes = b""
    attempt: int = 0


@dataclass
class ClientUpdate:
    """A client's answer: a model-shaped vector and its sample count, nothing else about rows."""

    index: int
    update: np.ndarray
    """float32 update (plain or clipped), or uint32 masked fixed point (secure)."""
    num_examples: int
    train_loss: float | None = None
    """Reported only without DP and secure aggregation (it says something about the data)."""


def own_rows(config: ClientConfig) -> tuple[pa.RecordBatch | None, ColumnPlan]:
    """This client's rows of the training split, as one record batch; and the column plan."""
    opened = open_shard(config.source, "train", 0, 1)
    batches = list(opened.batches)
    if not batches:
        raise KilnError(f"{config.source.uri} has no training rows to federate")
    labels = np.concatenate([batch_labels(b) for b in batches])
    parts = partition_rows(
        labels,
        config.num_clients,
        PartitionSpec.parse(config.partition),
        config.seed,
        config.min_partition_size,
    )
    table = pa.Table.from_batches(batches).take(pa.array(parts[config.index]))
    combined = table.combine_chunks().to_batches()
    return (combined[0] if combined else None), opened.plan


def train_rows(source: SourceSpec) -> int:
    """Rows of the source's training split: a count the server checks the partition against
    before any client starts (run as a Ray task; the rows stay in it)."""
    return sum(batch.num_rows for batch in open_shard(source, "train", 0, 1).batches)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class FederatedClient:
    """One client: its partition resident here, trained on when the server asks."""

    def __init__(self, config: ClientConfig) -> None:
        torch.set_num_threads(1)  # many clients share a node's cores
        self.config = config
        self._batch: pa.RecordBatch | None = None
        self._plan: ColumnPlan | None = None
        self._error: KilnError | None = None
        self._arrays: tuple[Any, np.ndarray, np.ndarray] | None = None
        self._keys: dict[tuple[int, int], Any] = {}
        self._cached: tuple[int, np.ndarray, int, float] | None = None
        try:
            self._batch, self._plan = own_rows(config)
        except KilnError as exc:  # raised by `ready`: a constructor error would kill the actor
            self._error = exc
        except pa.ArrowException as exc:
            self._error = KilnError(f"{config.source.uri} could not be read: {exc}")
        # torch imports torch._dynamo on the first optimizer a process makes: measured 3-5 s on
        # 2 cores, which round 0 paid. Paid here instead, beside the partition's loading.
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])

    @ray.method(max_task_retries=-1)
    def ready(self) -> int:
        """Rows this client holds; raises what stopped its loading. Retried while the actor
        restarts (the other methods are not), so the server can wait for a client to be back
        before it asks it to train."""
        if self._error is not None:
            raise self._error
        return 0 if self._batch is None else self._batch.num_rows

    def summary(self) -> FeatureStats:
        """Column moments and labels of this client's rows (merged on the server)."""
        assert self._batch is not None and self._plan is not None, "ready() raised otherwise"
        return batch_stats(self._batch, self._plan)

    def row_ids(self) -> np.ndarray:
        """Source positions of this client's rows, for coverage checks (tests)."""
        assert self._batch is not None
        return self._batch.column(ROW_ID).to_numpy()

    def public_key(self, round_index: int, attempt: int) -> bytes:
        """A fresh X25519 public key for secure aggregation in this round and attempt."""
        self._keys = {k: v for k, v in self._keys.items() if k[0] >= round_index}
        private = new_private_key()
        self._keys[(round_index, attempt)] = private
        return public_bytes(private)

    def fit(self, global_weights: np.ndarray, request: RoundRequest) -> ClientUpdate:
        """Train on my rows from the global weights; return my (clipped, masked) update."""
        plan = request.plan
        update, rows, loss = self._update(global_weights, request)
        if request.clip is not None:
            update = clip_to_norm(update, request.clip)
        if request.weight is None:
            private = request.clip is None
            return ClientUpdate(self.config.index, update, rows, loss if private else None)
        key = self._keys.pop((plan.round_index, request.attempt), None)
        if key is None:
            raise KilnError(f"client {self.config.index} has no key for this round (restarted)")
        masked = masked_update(
            update * request.weight, self.config.index, key, request.peers, request.context
        )
        return ClientUpdate(self.config.index, masked, rows)

    def _update(
        self, global_weights: np.ndarray, request: RoundRequest
    ) -> tuple[np.ndarray, int, float]:
        """The round's local update, trained once: a retried aggregation reuses it."""
        round_index = request.plan.round_index
        if self._cached is not None and self._cached[0] == round_index:
            return self._cached[1], self._cached[2], self._cached[3]
        x, y = self._training_arrays(request.spec)
        update, loss = local_update(
            request.spec, global_weights, x, y, request.plan, self.config.index
        )
        self._cached = (round_index, update, len(y), loss)
        return update, len(y), loss

    def _training_arrays(self, spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None or self._arrays[0] != spec.get("inputs"):
            assert self._batch is not None
            _, x, y = batches_to_arrays([self._batch], Encoding.from_spec(spec))
            self._arrays = (spec.get("inputs"), np.array(x, np.float32), label_targets(y, spec))
        return self._arrays[1], self._arrays[2]


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class FederatedEvaluator:
    """The server's public evaluation set: the source's test split, scored every round."""

    def __init__(self, source: SourceSpec) -> None:
        torch.set_num_threads(1)
        self._batches = list(open_shard(source, "test", 0, 1).batches)
        self._arrays: tuple[Any, np.ndarray, np.ndarray] | None = None

    def num_rows(self) -> int:
        return sum(b.num_rows for b in self._batches)

    def evaluate(self, weights: np.ndarray, spec: dict[str, Any]) -> dict[str, float]:
        x, y = self._test_arrays(spec)
        if len(y) == 0:
            raise KilnError("the test split is empty; use a --test-fraction above 0")
        return evaluate_model(model_with_weights(spec, weights).eval(), spec, x, y)

    def _test_arrays(self, spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None or self._arrays[0] != spec.get("inputs"):
            _, x, y = batches_to_arrays(self._batches, Encoding.from_spec(spec))
            if spec["task"] == "classification":
                unknown = set(y.tolist()) - set(spec["classes"])
                if unknown:
                    raise KilnError(
                        f"the test split has labels no client holds: {sorted(unknown)[:5]}"
                    )
                y = encode_labels(y, spec["classes"])
            self._arrays = (spec.get("inputs"), np.array(x, np.float32), y)
        return self._arrays[1], self._arrays[2]
