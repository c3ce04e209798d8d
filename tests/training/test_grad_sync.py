"""Shared-memory gradient averaging (training/grad_sync.py), in real processes over gloo."""

from __future__ import annotations

import glob
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kiln.training.config import TrainConfig
from kiln.training.errors import KilnError
from kiln.training.grad_sync import choose_grad_sync, open_shared_grad_sync, shared_memory_usable
from tests.conftest import free_port

needs_shm = pytest.mark.skipif(
    not shared_memory_usable(1 << 20), reason="shared-memory sync needs x86 and /dev/shm"
)


@pytest.mark.parametrize(
    ("requested", "world", "local", "device", "feed", "chosen"),
    [
        ("auto", 2, 2, "cpu", "shards", "shm"),
        ("auto", 4, 4, "cpu", "shards", "shm"),
        ("ddp", 2, 2, "cpu", "shards", "ddp"),  # asked for
        ("auto", 1, 1, "cpu", "shards", "ddp"),  # nothing to average
        ("auto", 4, 2, "cpu", "shards", "ddp"),  # two nodes
        ("auto", 2, 2, "cuda", "shards", "ddp"),  # NCCL's job
        ("auto", 2, 2, "cpu", "raydata", "ddp"),  # unequal steps: DDP's Join
    ],
)
def test_shared_memory_only_for_cpu_workers_of_one_node_on_equal_steps(
    requested, world, local, device, feed, chosen
):
    assert choose_grad_sync(requested, world, local, device, feed) == chosen


def test_an_unknown_sync_is_refused_naming_the_choices():
    with pytest.raises(KilnError, match='Got "nccl" for --grad-sync. Choose one of: auto, ddp.'):
        TrainConfig(model="mlp", workers=2, grad_sync="nccl")


def model_params(seed: int) -> list[torch.nn.Parameter]:
    """A model's parameters, then three that DDP treats apart: one only rank 0's loss uses,
    one no rank's loss uses, and a frozen one."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    partial, unused = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    return [*net.parameters(), partial, unused, frozen]


def average_rounds(rank: int, world: int, port: int, rounds: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        params = model_params(0)
        *trained, partial, unused, frozen = params
        sync = open_shared_grad_sync(params, rank, world, eligible=True)
        same = True
        for k in range(rounds):
            generator = torch.Generator().manual_seed(1000 * k + rank)
            grads = [torch.randn(p.shape, generator=generator) for p in trained]
            for p, g in zip(trained, grads, strict=True):
                p.grad = g.clone()
            partial.grad = torch.full((3,), k + 1.0) if rank == 0 else None
            if k % 2:  # ranks arrive at different times: the waits, not luck, must order them
                time.sleep(0.01 * rank)
            sync()
            for p, g in zip(trained, grads, strict=True):
                dist.all_reduce(g)
                same &= torch.allclose(p.grad, g / world, atol=1e-6)
            # As DDP: a gradient only some ranks have is averaged with zeros; one no rank has
            # stays None (the optimizer then skips it); a frozen parameter is left alone.
            same &= partial.grad is not None and torch.equal(
                partial.grad, torch.full((3,), (k + 1.0) / world)
            )
            same &= unused.grad is None and frozen.grad is None
        sync.close()
        queue.put((rank, bool(same), sync.round))
    finally:
        dist.destroy_process_group()


@needs_shm
@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_the_mean_gradient_round_after_round(world):
    before = set(glob.glob("/dev/shm/kiln-grads-*"))
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    ranks = [
        context.Process(target=average_rounds, args=(r, world, port, 6, queue))
        for r in range(world)
    ]
    for process in ranks:
        process.start()
    results = sorted(queue.get(timeout=120) for _ in ranks)
    for process in ranks:
        process.join(timeout=60)
    assert results == [(r, True, 6) for r in range(world)]
    assert set(glob.glob("/dev/shm/kiln-grads-*")) == before  # the name is gone once mapped


def leave_after_setup(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    params = model_params(0)
    sync = open_shared_grad_sync(params, rank, world, eligible=True)
    if rank == 1:
        os._exit(0)  # a killed worker: no sync, no goodbye
    for p in params:
        p.grad = torch.ones_like(p)
    started = time.monotonic()
    try:
        sync()
        queue.put(("returned", 0.0))
    except RuntimeError as error:
        queue.put((str(error), time.monotonic() - started))


@needs_shm
def test_a_rank_that_died_ends_the_others_wait_with_an_error():
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    ranks = [context.Process(target=leave_after_setup, args=(r, 2, port, queue)) for r in (0, 1)]
    for process in ranks:
        process.start()
    message, waited = queue.get(timeout=60)
    for process in ranks:
        process.join(timeout=30)
    assert "rank(s) [1] exited" in message
    assert waited < 30


def vote(rank: int, world: int, port: int, eligible: bool, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sync = open_shared_grad_sync(model_params(0), rank, world, eligible=eligible)
        queue.put((rank, sync is None))
    finally:
        dist.destroy_process_group()


def test_one_rank_that_cannot_use_shared_memory_keeps_every_rank_on_ddp():
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    ranks = [context.Process(target=vote, args=(r, 2, port, r == 0, queue)) for r in (0, 1)]
    for process in ranks:
        process.start()
    results = sorted(queue.get(timeout=60) for _ in ranks)
    for process in ranks:
        process.join(timeout=30)
    assert results == [(0, True), (1, True)]
