"""Flower's side of benchmarks/federated.py: the same federated problem in Flower's simulation.

Runs in its own venv (.venv-bench-flwr: `flwr[simulation]==1.42.0` pins ray 2.55, which must not
replace Kiln's 2.60), with Kiln's torch and numpy reached through a .pth file and this
repository on PYTHONPATH. The problem is Kiln's, piece by piece: the spec (model and
standardisation) that `kiln federate` built, written by the caller to --spec; Kiln's
Dirichlet(0.5) partitioner with the same seed; the same initial weights; each client's local
training is `kiln.federated.local.local_update`, the function Kiln's FederatedClient calls. Only
the framework differs: Flower's ClientApp/ServerApp, its FedAvg, its Ray simulation engine
(one CPU per virtual client, Flower's own resource model).

Round time: from the end of one round's centralised evaluation to the start of the next one's
(Flower's evaluate_fn runs after each round's fit and aggregation), so it counts the round's
sampling, transfers, local training and aggregation, as Kiln's round_s does.

Prints one JSON line last: final_acc, round_s, accuracy per round, flwr_version.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

# The repository before this script's folder: benchmarks/federated.py would shadow the
# `federated` package (here, and in Ray's workers, which get the driver's cwd first).
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

DATA = "sklearn:digits"
CLIENTS = 10
PARTITION = "dirichlet:0.5"
CACHE: dict[str, Any] = {}


def client_arrays(spec: dict[str, Any], index: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Client `index`'s rows, dealt exactly as a Kiln FederatedClient deals them."""
    key = f"client-{index}"
    if key not in CACHE:
        from kiln.actors.sources import SourceSpec, open_shard
        from kiln.federated.partition import PartitionSpec, partition_rows
        from kiln.training.data import batch_labels, batches_to_arrays
        from kiln.training.loop import label_targets
        from kiln.training.tabular import Encoding

        batches = list(open_shard(SourceSpec(uri=DATA, seed=seed), "train", 0, 1).batches)
        labels = np.concatenate([batch_labels(b) for b in batches])
        parts = partition_rows(labels, CLIENTS, PartitionSpec.parse(PARTITION), seed, 1)
        _, x, y = batches_to_arrays(batches, Encoding.from_spec(spec))
        mine = parts[index]
        CACHE[key] = (np.array(x[mine], np.float32), label_targets(y[mine], spec))
    return CACHE[key]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import flwr
    import torch
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    from kiln.actors.sources import SourceSpec, open_shard
    from kiln.federated.local import LocalPlan, initial_weights, local_update, model_with_weights
    from kiln.training.data import batches_to_arrays, encode_labels
    from kiln.training.evaluate import evaluate_model
    from kiln.training.tabular import Encoding

    with open(args.spec) as handle:
        spec = json.load(handle)
    seed = args.seed
    test = list(open_shard(SourceSpec(uri=DATA, seed=seed), "test", 0, 1).batches)
    _, x_test, y_test = batches_to_arrays(test, Encoding.from_spec(spec))
    x_test = np.array(x_test, np.float32)
    y_test = encode_labels(y_test, spec["classes"])
    marks: dict[str, list[float]] = {"eval_start": [], "eval_end": []}
    accuracy: list[float] = []

    class DigitsClient(NumPyClient):
        def __init__(self, index: int) -> None:
            self.index = index

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
            torch.set_num_threads(1)
            x, y = client_arrays(spec, self.index, seed)
            plan = LocalPlan(
                round_index=int(config["round"]),
                local_epochs=args.local_epochs,
                batch_size=32,
                lr=1e-3,
                optimizer="adam",
                seed=seed,
            )
            update, _ = local_update(spec, parameters[0], x, y, plan, self.index)
            return [parameters[0] + update], len(y), {}

    def client_fn(context: Context) -> Any:
        return DigitsClient(int(context.node_config["partition-id"])).to_client()

    def evaluate_fn(server_round: int, parameters: list[np.ndarray], config: Any) -> Any:
        marks["eval_start"].append(time.perf_counter())
        model = model_with_weights(spec, parameters[0]).eval()
        found = evaluate_model(model, spec, x_test, y_test)
        if server_round > 0:
            accuracy.append(found["accuracy"])
        marks["eval_end"].append(time.perf_counter())
        return 0.0, {"accuracy": found["accuracy"]}

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=CLIENTS,
            min_available_clients=CLIENTS,
            initial_parameters=ndarrays_to_parameters([initial_weights(spec, seed)]),
            evaluate_fn=evaluate_fn,
            on_fit_config_fn=lambda server_round: {"round": server_round - 1},
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=args.rounds))

    started = time.perf_counter()
    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    elapsed = time.perf_counter() - started
    starts, ends = marks["eval_start"], marks["eval_end"]
    rounds_s = [starts[i] - ends[i - 1] for i in range(1, len(starts))]
    print(
        json.dumps(
            {
                "framework": "flower",
                "flwr_version": flwr.__version__,
                "rounds": args.rounds,
                "accuracy": accuracy,
                "final_acc": accuracy[-1] if accuracy else None,
                "round_s": sum(rounds_s) / len(rounds_s) if rounds_s else None,
                "round_s_median": float(np.median(rounds_s)) if rounds_s else None,
                "rounds_s": rounds_s,
                "elapsed_s": elapsed,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
