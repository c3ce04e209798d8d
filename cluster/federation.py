"""`kiln federate`: train one model across FederatedClient actors that keep their data.

Reads as its steps: start the clients (each loads its own partition) and the evaluator (the
test split, the server's public evaluation set); merge the clients' column moments into the
model's spec; then round after round: sample clients, put the global weights in the object
store once, collect the clients' updates (relaying keys first under secure aggregation),
aggregate them with the strategy (clipped and noised under DP), score the new global model,
write a checkpoint; at the end register the model with the run's lineage.

The driver never holds a data row: what it receives from a client is a sample count, column
moments, a public key, or one vector of the model's parameter size (`ClientUpdate.update`).

Faults: a client that dies or misses `round_timeout_s` is left out of the round (with secure
aggregation the round's aggregation is redone without it, fresh keys, same local updates);
the actor restarts and is asked again next round. The driver itself dying loses at most the
round in flight: `--resume RUN` reloads the request and the last checkpoint (weights,
strategy state, metrics) and continues; sampling and local training are seeded per round, so
a resumed run computes what the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from kiln.actors.catalog import VersionRecord, validate_name
from kiln.actors.lineage import code_version, dataset_sha256
from kiln.actors.shards import FeatureStats, ShardSet, looks_like_dataset_name
from kiln.actors.sources import SourceSpec, check_source
from kiln.federated.client import (
    ClientConfig,
    ClientUpdate,
    FederatedClient,
    FederatedEvaluator,
    RoundRequest,
    train_rows,
)
from kiln.federated.local import LocalPlan, initial_weights, model_with_weights
from kiln.federated.partition import PartitionSpec, check_partition_fits
from kiln.federated.privacy import DPConfig, dp_config, epsilon_spent, noisy_mean
from kiln.federated.secagg import round_context, unmasked_sum
from kiln.federated.strategy import FedAdam, FedAvg, FedProx, parse_strategy
from kiln.pipeline import make_spec, register_model
from kiln.requests import unique_name
from kiln.settings import Settings
from kiln.training.config import MODEL_KINDS, OPTIMIZERS, TrainConfig, require_choice
from kiln.training.encryption import read_local, write_local
from kiln.training.errors import KilnError

logger = logging.getLogger(__name__)

MAX_SECURE_ATTEMPTS = 3
"""Aggregations tried per round under secure aggregation before the round is skipped."""
CHECKPOINT_FILE = "checkpoint.safetensors"
STATE_FILE = "state.json"
REQUEST_FILE = "request.json"

RoundFn = Callable[[dict[str, Any]], None]
DispatchFn = Callable[[int, list[Any]], None]


@dataclass(kw_only=True)
class FederateRequest:
    """One `kiln federate`; every field is the option of the same name. Saved for --resume."""

    data: str
    source: SourceSpec
    clients: int = 10
    partition: str = "iid"
    min_partition_size: int = 1
    rounds: int = 10
    fraction: float = 1.0
    min_clients: int = 1
    local_epochs: int = 5
    """McMahan et al.'s E=5. Measured (benchmarks/federated.py, digits, Dirichlet(0.5), 10
    clients, 30 rounds): E=1 ended 4.0 points below central `kiln train`, E=5 within 2."""
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    model: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    strategy: str = "fedavg"
    secure_agg: bool = False
    dp_clip: float | None = None
    dp_noise: float | None = None
    dp_delta: float = 1e-5
    round_timeout_s: float = 300.0
    seed: int = 0
    name: str = "federated"
    run_name: str = field(default_factory=lambda: unique_name("federate"))

    def __post_init__(self) -> None:
        if looks_like_dataset_name(self.data):
            raise KilnError(
                f'Got "{self.data}" for --data. Each client reads its own partition from a '
                "source: give a URI (sklearn:digits, a parquet/csv path, synthetic:...)."
            )
        for option, value, least in (
            ("--clients", self.clients, 1),
            ("--rounds", self.rounds, 1),
            ("--min-clients", self.min_clients, 1),
            ("--local-epochs", self.local_epochs, 1),
            ("--batch-size", self.batch_size, 1),
            ("--min-partition-size", self.min_partition_size, 1),
        ):
            if value < least:
                raise KilnError(f'Got "{value}" for {option}. {option} must be at least {least}.')
        if not 0 < self.fraction <= 1:
            raise KilnError(
                f'Got "{self.fraction}" for --fraction. Use a share of clients in (0, 1], e.g. 0.5.'
            )
        if self.min_clients > self.clients:
            raise KilnError(
                f'Got "{self.min_clients}" for --min-clients with {self.clients} clients. '
                "Use at most --clients."
            )
        if not 0 < self.lr < 10:
            raise KilnError(f'Got "{self.lr}" for --lr. --lr must be greater than 0 and below 10.')
        if not self.round_timeout_s > 0:
            raise KilnError(f'Got "{self.round_timeout_s}" for --round-timeout-s. Use above 0.')
        require_choice(self.optimizer, OPTIMIZERS, "--optimizer")
        require_choice(self.model, MODEL_KINDS, "--model")
        PartitionSpec.parse(self.partition)
        parse_strategy(self.strategy)
        dp_config(self.dp_clip, self.dp_noise, self.dp_delta)
        validate_name(self.name)

    @property
    def dp(self) -> DPConfig | None:
        return dp_config(self.dp_clip, self.dp_noise, self.dp_delta)

    @property
    def sampled_per_round(self) -> int:
        return min(self.clients, max(self.min_clients, math.ceil(self.fraction * self.clients)))

    def train_config(self) -> TrainConfig:
        """The model and optimiser settings as `kiln train` would record them (lineage)."""
        return TrainConfig(
            model=self.model,
            hidden=list(self.hidden),
            workers=1,
            epochs=self.local_epochs,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            lr=self.lr,
            l2=0.0,
            seed=self.seed,
            gpu="off",
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> FederateRequest:
        raw = json.loads(text)
        return cls(**{**raw, "source": SourceSpec.from_dict(raw["source"])})


@dataclass
class FederateOutcome:
    record: VersionRecord
    test_metrics: dict[str, Any]
    history: list[dict[str, Any]]
    run_name: str
    parameters: int
    client_rows: list[int]
    privacy: dict[str, Any] | None
    elapsed_s: float = 0.0


@dataclass
class RunState:
    """What a checkpoint holds: the global weights, the strategy's state, rounds done."""

    weights: np.ndarray
    strategy_state: dict[str, np.ndarray]
    history: list[dict[str, Any]]

    @property
    def next_round(self) -> int:
        return len(self.history)


# ----------------------------------------------------------------------------- checkpoints


def run_dir(settings: Settings, run_name: str) -> Path:
    return settings.kiln_home.expanduser() / "federated" / run_name


def load_request(settings: Settings, run_name: str) -> FederateRequest:
    path = run_dir(settings, run_name) / REQUEST_FILE
    if not path.exists():
        known = sorted(p.name for p in path.parent.parent.glob("*") if p.is_dir())[-5:]
        raise KilnError(
            f'Got "{run_name}" for --resume, which is not a federated run of this KILN_HOME. '
            f"Recent runs: {', '.join(known) or 'none'}."
        )
    return FederateRequest.from_json(path.read_text())


def save_checkpoint(folder: Path, state: RunState) -> None:
    """Weights and strategy state (safetensors, sealed with encryption on), then the metrics;
    each file replaced atomically, the state last, so a driver killed midway leaves the
    previous round whole. The state (round metrics and the round file's name, no weights)
    stays clear: a sealed file and its key file cannot be replaced together atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "weights": state.weights,
        **{f"strategy.{k}": v for k, v in state.strategy_state.items()},
    }
    round_file = folder / f"round-{state.next_round:04d}.safetensors"
    # Sealed under its final name (its key is bound to it); each round has a name of its own.
    write_local(
        round_file, save_safetensors({k: np.ascontiguousarray(v) for k, v in tensors.items()})
    )
    tmp_state = folder / f"{STATE_FILE}.tmp"
    tmp_state.write_text(json.dumps({"history": state.history, "checkpoint": round_file.name}))
    os.replace(tmp_state, folder / STATE_FILE)
    for old in folder.glob("round-*.safetensors*"):
        if not old.name.startswith(round_file.name):
            old.unlink(missing_ok=True)


def load_checkpoint(folder: Path) -> RunState | None:
    path = folder / STATE_FILE
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    tensors = load_safetensors(read_local(folder / saved["checkpoint"]))
    strategy_state = {
        k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("strategy.")
    }
    return RunState(tensors["weights"], strategy_state, saved["history"])


# ----------------------------------------------------------------------------- rounds


def sample_clients(request: FederateRequest, round_index: int) -> list[int]:
    """The round's clients: seeded by (seed, round), so a resumed run samples the same."""
    rng = np.random.default_rng((request.seed, round_index, 1))
    return sorted(rng.choice(request.clients, request.sampled_per_round, replace=False).tolist())


@dataclass
class Collected:
    updates: list[ClientUpdate]
    dropped: list[int]


def collect(refs: dict[int, Any], timeout_s: float) -> Collected:
    """The answers that came back within the timeout; the others are dropped."""
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    updates, dropped = [], []
    for index, ref in refs.items():
        if ref not in done:
            dropped.append(index)
            continue
        try:
            updates.append(ray.get(ref))
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            logger.warning("client %d dropped out: %s", index, type(exc).__name__)
            dropped.append(index)
    return Collected(updates, dropped)


def round_plan(request: FederateRequest, round_index: int, mu: float) -> LocalPlan:
    return LocalPlan(
        round_index=round_index,
        local_epochs=request.local_epochs,
        batch_size=request.batch_size,
        lr=request.lr,
        optimizer=request.optimizer,
        proximal_mu=mu,
        seed=request.seed,
    )


def plain_round(
    clients: list[Any],
    sampled: list[int],
    weights_ref: Any,
    base: RoundRequest,
    request: FederateRequest,
    on_dispatch: DispatchFn | None,
) -> Collected:
    refs = {i: clients[i].fit.remote(weights_ref, base) for i in sampled}
    if on_dispatch is not None:
        on_dispatch(base.plan.round_index, [clients[i] for i in sampled])
    return collect(refs, request.round_timeout_s)


def secure_round(
    clients: list[Any],
    sampled: list[int],
    weights_ref: Any,
    base: RoundRequest,
    request: FederateRequest,
    counts: list[int],
    on_dispatch: DispatchFn | None,
) -> tuple[Collected, int]:
    """Relay fresh public keys, collect masked updates; if anyone drops after the keys were
    relayed, redo the aggregation with those who answered (they reuse their local update)."""
    round_index = base.plan.round_index
    participants, dropped = list(sampled), []
    for attempt in range(MAX_SECURE_ATTEMPTS):
        keyed = collect(
            {i: clients[i].public_key.remote(round_index, attempt) for i in participants},
            request.round_timeout_s,
        )
        dropped += keyed.dropped
        peers: dict[int, bytes] = {u_index: key for u_index, key in key_pairs(participants, keyed)}
        participants = sorted(peers)
        if len(participants) < request.min_clients:
            return Collected([], dropped), attempt + 1
        weights = client_weights(participants, counts, uniform=request.dp is not None)
        context = round_context(request.run_name, round_index, attempt)
        refs = {
            i: clients[i].fit.remote(
                weights_ref,
                dataclasses.replace(
                    base, weight=weights[i], peers=peers, context=context, attempt=attempt
                ),
            )
            for i in participants
        }
        if on_dispatch is not None and attempt == 0:
            on_dispatch(round_index, [clients[i] for i in participants])
        got = collect(refs, request.round_timeout_s)
        if not got.dropped:
            return Collected(got.updates, dropped), attempt + 1
        logger.warning(
            "round %d: clients %s dropped after masking; redoing", round_index, got.dropped
        )
        dropped += got.dropped
        participants = [i for i in participants if i not in got.dropped]
    return Collected([], dropped), MAX_SECURE_ATTEMPTS


def key_pairs(participants: list[int], keyed: Collected) -> list[tuple[int, bytes]]:
    """(client, public key) of those that answered, in the order asked."""
    answered = [i for i in participants if i not in keyed.dropped]
    return list(zip(answered, keyed.updates, strict=True))  # type: ignore[arg-type]


def client_weights(participants: list[int], counts: list[int], uniform: bool) -> dict[int, float]:
    """Each participant's share of the aggregate: by samples, or uniform under DP."""
    if uniform:
        return {i: 1.0 / len(participants) for i in participants}
    total = float(sum(counts[i] for i in participants))
    return {i: counts[i] / total for i in participants}


def aggregate(
    strategy: FedAvg | FedProx | FedAdam,
    got: Collected,
    request: FederateRequest,
    rng: np.random.Generator,
) -> np.ndarray:
    """The round's mean update: the strategy's weighted mean, or (secure) the unmasked sum of
    pre-weighted updates, or (DP) the noisy uniform mean of clipped updates."""
    dp = request.dp
    count = len(got.updates)
    if request.secure_agg:
        mean = unmasked_sum([u.update for u in got.updates])
        if dp is None:
            return mean
        return noisy_mean(mean.astype(np.float64) * count, count, dp, rng)
    if dp is not None:
        total = np.sum([u.update.astype(np.float64) for u in got.updates], axis=0)
        return noisy_mean(total, count, dp, rng)
    return strategy.aggregate(
        [u.update for u in got.updates], [u.num_examples for u in got.updates]
    )


# ----------------------------------------------------------------------------- the run


def start_clients(request: FederateRequest) -> list[Any]:
    return [
        FederatedClient.options(  # type: ignore[attr-defined]
            name=f"kiln-federate:{request.run_name}:{i}", scheduling_strategy="SPREAD"
        ).remote(
            ClientConfig(
                source=request.source,
                partition=request.partition,
                index=i,
                num_clients=request.clients,
                seed=request.seed,
                min_partition_size=request.min_partition_size,
            )
        )
        for i in range(request.clients)
    ]


def federated_spec(
    request: FederateRequest, stats: list[FeatureStats]
) -> tuple[dict[str, Any], FeatureStats]:
    """The model's spec from the clients' merged column moments (Chan's merge, as shards')."""
    merged = stats[0]
    for part in stats[1:]:
        merged = merged.merge(part)
    rows = [s.count for s in stats]
    shards = ShardSet(request.source, "train", [], rows, merged)
    spec = make_spec(request.train_config(), shards, merged, request.source.min_category_count)
    return spec, merged


def privacy_report(request: FederateRequest, rounds_done: int) -> dict[str, Any] | None:
    dp = request.dp
    if dp is None:
        return None
    rate = request.sampled_per_round / request.clients
    return {
        "clip": dp.clip,
        "noise_multiplier": dp.noise,
        "delta": dp.delta,
        "sample_rate": rate,
        "epsilon_per_round": epsilon_spent(dp.noise, rate, 1, dp.delta),
        "epsilon": epsilon_spent(dp.noise, rate, rounds_done, dp.delta),
        "level": "client",
    }


def run_round(
    round_index: int,
    state: RunState,
    clients: list[Any],
    counts: list[int],
    spec: dict[str, Any],
    strategy: FedAvg | FedProx | FedAdam,
    request: FederateRequest,
    on_dispatch: DispatchFn | None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """One round: the new global weights and the round's facts (evaluation comes after)."""
    started = time.perf_counter()
    sampled = sample_clients(request, round_index)
    weights_ref = ray.put(state.weights)  # once per round, however many clients read it
    dp = request.dp
    base = RoundRequest(
        plan=round_plan(request, round_index, strategy.proximal_mu),
        spec=spec,
        clip=dp.clip if dp is not None else None,
    )
    # A client that is restarting (killed in an earlier round) is waited for, up to the
    # timeout: its `ready` is retried until the actor is back, then it trains this round.
    alive = collect({i: clients[i].ready.remote() for i in sampled}, request.round_timeout_s)
    present = [i for i in sampled if i not in alive.dropped]
    attempts = 1
    if request.secure_agg:
        got, attempts = secure_round(
            clients, present, weights_ref, base, request, counts, on_dispatch
        )
    else:
        got = plain_round(clients, present, weights_ref, base, request, on_dispatch)
    got.dropped = sorted({*alive.dropped, *got.dropped})
    answered = sorted(u.index for u in got.updates)
    facts: dict[str, Any] = {
        "round": round_index,
        "sampled": sampled,
        "answered": answered,
        "dropped": sorted(set(got.dropped)),
        "attempts": attempts,
        "update_sizes": sorted({int(u.update.size) for u in got.updates}),
        "bytes_down": int(state.weights.nbytes) * len(present) * attempts,
        "bytes_up": int(sum(u.update.nbytes for u in got.updates)),
    }
    losses = [u.train_loss for u in got.updates if u.train_loss is not None]
    if losses:
        facts["train_loss"] = float(
            np.average(losses, weights=[u.num_examples for u in got.updates])
        )
    if len(got.updates) < request.min_clients:
        logger.warning(
            "round %d: %d clients answered, fewer than --min-clients; skipped",
            round_index,
            len(got.updates),
        )
        facts.update(skipped=True, round_s=time.perf_counter() - started)
        return state.weights, facts
    rng = np.random.default_rng((request.seed, round_index, 2))
    mean_update = aggregate(strategy, got, request, rng)
    new_weights = strategy.apply(state.weights, mean_update)
    facts.update(skipped=False, round_s=time.perf_counter() - started)
    return new_weights, facts


def federate_and_register(
    settings: Settings,
    request: FederateRequest,
    registry: Any,
    on_round: RoundFn | None = None,
    on_dispatch: DispatchFn | None = None,
) -> FederateOutcome:
    """The whole of `kiln federate` (see the module docstring). `on_dispatch(round, clients)`
    runs right after a round's updates were asked for (tests kill a client there)."""
    started = time.perf_counter()
    folder = run_dir(settings, request.run_name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REQUEST_FILE).write_text(request.to_json())
    check_source(request.source)
    data_hash = ray.remote(num_cpus=0)(dataset_sha256).remote(request.source.uri)
    num_rows = ray.get(ray.remote(num_cpus=0)(train_rows).remote(request.source))
    partition = PartitionSpec.parse(request.partition)
    check_partition_fits(partition, num_rows, request.clients, request.min_partition_size)
    clients = start_clients(request)
    evaluator = FederatedEvaluator.remote(request.source)  # type: ignore[attr-defined]
    try:
        # 1. Clients load their partitions; their column moments make the spec.
        counts = ray.get([c.ready.remote() for c in clients])
        spec, merged = federated_spec(request, ray.get([c.summary.remote() for c in clients]))
        strategy = parse_strategy(request.strategy)
        state = load_checkpoint(folder) or RunState(initial_weights(spec, request.seed), {}, [])
        strategy.load_state(state.strategy_state)
        if state.history:
            logger.info("resuming %s after round %d", request.run_name, state.next_round - 1)
        # 2. Rounds: train, aggregate, evaluate, checkpoint.
        for round_index in range(state.next_round, request.rounds):
            weights, facts = run_round(
                round_index, state, clients, counts, spec, strategy, request, on_dispatch
            )
            scored = ray.get(evaluator.evaluate.remote(weights, spec))
            facts.update({f"test_{k}": v for k, v in scored.items()})
            privacy = privacy_report(request, round_index + 1 - skipped(state.history, facts))
            if privacy is not None:
                facts["epsilon"] = privacy["epsilon"]
            state = RunState(weights, strategy.state(), [*state.history, facts])
            save_checkpoint(folder, state)
            if on_round is not None:
                on_round({**facts, "rounds": request.rounds})
        # 3. Register the global model with the run's lineage.
        final = ray.get(evaluator.evaluate.remote(state.weights, spec))
        model = model_with_weights(spec, state.weights).eval()
        privacy = privacy_report(request, sum(not h.get("skipped") for h in state.history))
        lineage = federated_lineage(request, merged, counts, state.history, privacy)
        lineage.update(
            dataset_sha256=ray.get(data_hash), test_rows=ray.get(evaluator.num_rows.remote())
        )
        metrics = {**final, "history": [round_metrics(h) for h in state.history]}
        record = register_model(registry, request.name, model, spec, metrics, lineage)
    finally:
        for actor in [*clients, evaluator]:
            ray.kill(actor)
    return FederateOutcome(
        record=record,
        test_metrics=final,
        history=state.history,
        run_name=request.run_name,
        parameters=int(state.weights.size),
        client_rows=counts,
        privacy=privacy,
        elapsed_s=time.perf_counter() - started,
    )


def skipped(history: list[dict[str, Any]], facts: dict[str, Any]) -> int:
    """Rounds so far (this one included) in which no aggregate was released."""
    return sum(bool(h.get("skipped")) for h in [*history, facts])


def round_metrics(facts: dict[str, Any]) -> dict[str, Any]:
    """Per-round metrics worth keeping with the version (no timings of this machine)."""
    keep = (
        "round",
        "answered",
        "dropped",
        "skipped",
        "train_loss",
        "test_accuracy",
        "test_r2",
        "epsilon",
    )
    return {k: facts[k] for k in keep if k in facts}


def federated_lineage(
    request: FederateRequest,
    stats: FeatureStats,
    counts: list[int],
    history: list[dict[str, Any]],
    privacy: dict[str, Any] | None,
) -> dict[str, Any]:
    source = request.source
    return {
        "dataset_uri": source.uri,
        "schema": stats.plan.to_dict() if stats.plan else None,
        "code_version": code_version(),
        "dataset_name": None,
        "test_fraction": source.test_fraction,
        "val_fraction": 0.0,
        "split_seed": source.seed,
        "train_rows": int(sum(counts)),
        "train_config": request.train_config().to_dict(),
        "solver": f"federated:{request.strategy}",
        "run_name": request.run_name,
        "federated": {
            "clients": request.clients,
            "client_rows": counts,
            "partition": request.partition,
            "min_partition_size": request.min_partition_size,
            "strategy": request.strategy,
            "rounds": request.rounds,
            "fraction": request.fraction,
            "min_clients": request.min_clients,
            "local_epochs": request.local_epochs,
            "batch_size": request.batch_size,
            "lr": request.lr,
            "optimizer": request.optimizer,
            "seed": request.seed,
            "secure_agg": request.secure_agg,
            "privacy": privacy,
            "evaluated_on": "the source's test split, held by the server (FederatedEvaluator)",
            "per_round": [round_metrics(h) for h in history],
        },
    }
