"""Multi-node behaviour on a head and 2 worker nodes: shards, training and serving across nodes.

The scenarios run in one subprocess (tests/cluster/multinode_run.py): a Ray Cluster cannot share
a process with the session's ray.init. Storage is the local disk, shared by every node here
since they are one machine, as a shared storage URI is on a real cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.multinode_run import EPOCHS

# One subprocess runs every scenario (about 150 s here): all of it runs with the slow tests.
pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("multinode_run.py")


@pytest.fixture(scope="module")
def observed() -> dict:
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=420
    )
    assert done.returncode == 0, "\n".join(
        line for line in done.stderr.splitlines() if "Error" in line or "error:" in line
    )[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.multinode
@pytest.mark.slow
def test_shards_spread_over_the_nodes(observed):
    assert len(set(observed["shard_nodes"])) >= 2
    assert set(observed["shard_nodes"]) <= set(observed["nodes"])
    # Shards that landed on the wrong node (here all three on one, on purpose) are placed
    # again under their names. Not always one per node: a soft affinity to one worker node
    # fell back again in 1 run of 4, even over 3 rounds (RAY_NOTES), so the check is the
    # spread the shards need, as above.
    assert len(set(observed["respread_nodes"])) >= 2


@pytest.mark.multinode
@pytest.mark.chaos
def test_training_spans_nodes_and_resumes_after_losing_one(observed):
    assert len(observed["first_epoch_nodes"]) == 2  # the 2 workers ran on 2 nodes
    assert observed["killed_node"] in observed["first_epoch_nodes"]
    epochs = observed["epochs"]
    assert observed["killed_node"] not in observed["last_epoch_nodes"], epochs
    assert epochs[-1] == EPOCHS - 1 and set(epochs) == set(range(EPOCHS))
    assert len(epochs) - len(set(epochs)) <= 2  # resumed from a checkpoint, not from scratch
    assert observed["accuracy"] >= 0.85 and observed["model"] == "digits-multinode@1"


@pytest.mark.multinode
@pytest.mark.chaos
def test_serving_survives_losing_a_replica_node(observed):
    assert observed["replica_killed_node"] in observed["replica_nodes_before"]
    assert observed["replica_recovered"], "no replacement replica on a live node within 60 s"
    assert observed["requests"] >= 100
    assert observed["successes"] / observed["requests"] >= 0.99
