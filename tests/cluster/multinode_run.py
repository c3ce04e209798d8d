"""Multi-node behaviour on a head and 2 worker nodes (ray.cluster_utils.Cluster), one process.

Run by tests/cluster/test_multinode.py in a subprocess, since a Cluster cannot share a process
with the test session's ray.init. Prints one JSON line: what each scenario observed.

1. A dataset's shards spread over the nodes (the node of each ShardStore actor).
2. Training uses workers on several nodes; the node holding one is killed after an epoch:
   the run resumes from its last checkpoint, finishes, and registers the model.
3. The model served with 2 replicas; the node holding one is killed: requests keep being
   answered while Serve puts a new replica on a live node.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
# Every node of this one-machine cluster on 127.0.0.1 (Ray's own switch for laptop clusters):
# nothing listens on, or is reached at, the machine's network address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from kiln.actors.registry import NAMESPACE  # noqa: E402
from kiln.actors.shards import load_dataset  # noqa: E402
from kiln.actors.sources import SourceSpec  # noqa: E402
from kiln.pipeline import train_and_register  # noqa: E402
from kiln.requests import TrainRequest  # noqa: E402
from kiln.runtime import registry_for  # noqa: E402
from kiln.serving_control import APP_NAME, deploy_models  # noqa: E402
from kiln.settings import Settings  # noqa: E402
from kiln.training.config import TrainConfig  # noqa: E402
from tests.conftest import free_port, wait_for  # noqa: E402

NODE_ARGS: dict[str, Any] = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}


def actor_node(actor_id: str) -> str:
    return ray._private.state.actors(actor_id)["Address"]["NodeID"]


def alive_actor_nodes(class_fragment: str) -> list[str]:
    table = ray._private.state.actors().values()
    return [
        a["Address"]["NodeID"]
        for a in table
        if class_fragment in a["ActorClassName"] and a["State"] == "ALIVE"
    ]


EPOCHS = 8


def worker_node(cluster: Cluster, node_id: str) -> Any:
    return next(n for n in cluster.worker_nodes if n.node_id == node_id)


def shards_spread() -> dict[str, Any]:
    from kiln.actors.shards import gather_shard_set, respread, start_shard

    data = load_dataset(SourceSpec(uri="sklearn:iris", val_fraction=0.0), 3)
    try:
        nodes = [actor_node(h._actor_id.hex()) for h in data.train.handles]
    finally:
        data.release()
    # Shards placed off their nodes on purpose (all on the driver's) are placed again.
    source = SourceSpec(uri="sklearn:iris", val_fraction=0.0)
    here = ray.get_runtime_context().get_node_id()
    handles = [start_shard(source, "train", i, 3, here, "respread", False) for i in range(3)]
    placed = respread(gather_shard_set(source, "train", handles), "respread", False)
    try:
        again = ray.get([h.node_id.remote() for h in placed.handles])
    finally:
        placed.release()
    return {"shard_nodes": nodes, "respread_nodes": again}


def train_through_node_loss(cluster: Cluster, settings: Settings) -> dict[str, Any]:
    killed: dict[str, Any] = {}

    def kill_a_worker_node(metrics: dict[str, Any]) -> None:
        if metrics["epoch"] == 1 and not killed:
            # Never the driver's own node: all nodes share 127.0.0.1 here, so the driver may be
            # attached to a worker node's raylet, and losing it takes the driver down too.
            heads = {cluster.head_node.node_id, ray.get_runtime_context().get_node_id()}
            victim = next(w["node_id"] for w in metrics["workers"] if w["node_id"] not in heads)
            killed.update(node_id=victim, at_s=time.monotonic())
            # A lost machine takes its processes with it; remove_node kills only the raylet,
            # whose workers trained on for ~9 more epochs here before noticing (one CI run
            # finished the whole run on the "dead" node). So its training workers go too.
            for worker in metrics["workers"]:
                if worker["node_id"] == victim:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker["pid"], signal.SIGKILL)
            cluster.remove_node(worker_node(cluster, victim), allow_graceful=False)

    request = TrainRequest(
        data="sklearn:digits",
        source=SourceSpec(uri="sklearn:digits", val_fraction=0.0),
        # Epochs to spare after the kill, which waits for epoch 1's report to reach the driver.
        train=TrainConfig(
            model="mlp", workers=2, epochs=EPOCHS, batch_size=64, lr=5e-3, patience=0
        ),
        name="digits-multinode",
    )
    outcome = train_and_register(settings, request, registry_for(settings), kill_a_worker_node)
    history = outcome.history
    return {
        "epochs": [m["epoch"] for m in history],
        "first_epoch_nodes": sorted({w["node_id"] for w in history[0]["workers"]}),
        "last_epoch_nodes": sorted({w["node_id"] for w in history[-1]["workers"]}),
        "killed_node": killed.get("node_id"),
        "accuracy": outcome.test_metrics["accuracy"],
        "model": outcome.record.ref,
    }


def serve_through_node_loss(cluster: Cluster, settings: Settings, model: str) -> dict[str, Any]:
    # One proxy, on the head: all nodes share 127.0.0.1 here, so per-node proxies would clash.
    serve.start(
        proxy_location="HeadOnly",
        http_options={"host": settings.kiln_http_host, "port": settings.kiln_http_port},
    )
    base = deploy_models(settings, [model], auth=False, num_replicas=2, num_cpus=0.5)
    url = f"{base}/v1/models/{model.split('@')[0]}:predict"
    body = {"instances": [[0.0] * 64]}
    head = cluster.head_node.node_id
    replica_nodes = alive_actor_nodes(f"ServeReplica:{APP_NAME}")
    victim = next(n for n in replica_nodes if n != head)
    results: list[bool] = []
    stop = threading.Event()

    def call_in_a_loop() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    results.append(client.post(url, json=body).status_code == 200)
                except httpx.HTTPError:
                    results.append(False)

    caller = threading.Thread(target=call_in_a_loop, daemon=True)
    caller.start()
    wait_for(lambda: len(results) >= 20, timeout_s=30)
    killed_at = time.monotonic()
    cluster.remove_node(worker_node(cluster, victim), allow_graceful=False)

    def replaced() -> bool:
        nodes = alive_actor_nodes(f"ServeReplica:{APP_NAME}")
        return len(nodes) == 2 and victim not in nodes

    recovered = wait_for(replaced, timeout_s=60, interval_s=0.2)
    recovery_s = time.monotonic() - killed_at
    before = list(results)
    wait_for(
        lambda: len(results) >= len(before) + 100, timeout_s=10
    )  # keep calling after the recovery
    stop.set()
    caller.join(timeout=15)
    return {
        "replica_nodes_before": replica_nodes,
        "replica_killed_node": victim,
        "replica_recovered": recovered,
        "replica_recovery_s": round(recovery_s, 2),
        "requests": len(results),
        "successes": sum(results),
    }


def main() -> None:
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="kiln-multinode-"))
    settings = Settings(
        kiln_home=root / "home", kiln_storage=str(root / "storage"), kiln_http_port=free_port()
    )
    cluster = Cluster(
        initialize_head=True, head_node_args={**NODE_ARGS, "include_dashboard": False}
    )
    nodes = [cluster.add_node(**NODE_ARGS) for _ in range(2)]
    cluster.wait_for_nodes()
    result: dict[str, Any] = {"nodes": [cluster.head_node.node_id, *(n.node_id for n in nodes)]}
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    try:
        result["cluster_up_s"] = round(time.monotonic() - started, 1)
        result.update(shards_spread())
        mark = time.monotonic()
        result.update(train_through_node_loss(cluster, settings))
        result["train_s"] = round(time.monotonic() - mark, 1)
        cluster.add_node(**NODE_ARGS)  # back to 3 nodes: room for a replica to move to
        cluster.wait_for_nodes()
        result.update(serve_through_node_loss(cluster, settings, result["model"]))
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        cluster.shutdown()
    result["total_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
