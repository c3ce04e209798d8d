"""Gradient averaging between Train workers on one node, through shared memory.

DDP over gloo sends every gradient sync through the loopback TCP stack and gloo's I/O threads:
on Kiln's 2-core CI machine one all-reduce of the benchmark MLP's 13k gradients took 0.45-1.9 ms
(`python benchmarks/train_throughput.py`'s model), four times the 0.4 ms its 256-row step
computes, so two workers trained at a third of one plain process's speed. When every worker of a
run shares one node and trains on CPU, Kiln averages gradients in a shared-memory file instead:
each rank copies its gradients into its own slot, publishes the round's number, waits until every
rank has published it, and sums the slots in rank order (the same order on every rank, so the
ranks keep identical weights). Two alternating sets of slots make one wait per round enough: a
rank writes round k+1's slot only after every rank published round k, so nobody still reads the
set it overwrites (round k-1's).

The round numbers are plain 8-byte stores read by the other processes: x86-64 keeps stores (and
loads) in program order, so a peer that sees round k also sees the gradients written before it.
Other architectures give no such order to plain stores, and there Kiln keeps DDP
(`shared_memory_usable`). Multi-node runs, GPUs, and Ray Data feeds (whose ranks may take
unequal steps, which DDP's Join handles) keep DDP too.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import platform
import time
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

SHM_DIR = "/dev/shm"
HEADER_STRIDE = 64
"""Bytes per rank of the header (one round number each, on its own cache line)."""
TIMEOUT_S = 1800.0
"""How long a rank waits for the others at one sync: Ray Train's default collective timeout."""
ORDERED_STORES = {"x86_64", "amd64", "i386", "i686", "x86"}


def shared_memory_usable(nbytes: int, directory: str = SHM_DIR) -> bool:
    """Whether this process can average gradients through a `nbytes` file in `directory`:
    an x86 CPU (ordered stores) and room for the file with a margin."""
    if platform.machine().lower() not in ORDERED_STORES or not os.path.isdir(directory):
        return False
    try:
        stats = os.statvfs(directory)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize >= 2 * nbytes + (64 << 20)


def choose_grad_sync(
    requested: str, world_size: int, local_world_size: int, device_type: str, feed: str
) -> str:
    """'shm' where this rank may use shared memory (the ranks then agree, `agree`), else 'ddp'.

    `requested` is TrainConfig.grad_sync: 'ddp' always keeps DDP; 'auto' takes shared memory
    for several CPU workers that all run on this node and take equal steps (the shard feed).
    """
    if requested == "ddp" or world_size < 2:
        return "ddp"
    if local_world_size != world_size or device_type != "cpu" or feed != "shards":
        return "ddp"
    return "shm"


def slots_bytes(num_values: int, world_size: int) -> int:
    return HEADER_STRIDE * world_size + 2 * world_size * num_values * 4


class SharedMemoryGradSync:
    """Averages the gradients of `params` over the ranks of one node (float32 on CPU).

    Made collectively with `open_shared_grad_sync`; calling it is one round: every rank must
    call it the same number of times (Kiln's shard feed gives every rank the same steps).
    """

    def __init__(
        self, path: str, params: Iterable[nn.Parameter], rank: int, world_size: int, pids: list
    ) -> None:
        self.params = list(params)
        self.rank, self.world_size, self.pids = rank, world_size, pids
        self.num_values = sum(p.numel() for p in self.params)
        size = slots_bytes(self.num_values, world_size)
        fd = os.open(path, os.O_RDWR)
        try:
            self.buffer = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        header = np.ndarray((world_size, HEADER_STRIDE // 8), np.int64, buffer=self.buffer)
        self.rounds = header[:, 0]
        self.slots = torch.frombuffer(
            self.buffer,
            dtype=torch.float32,
            offset=HEADER_STRIDE * world_size,
            count=2 * world_size * self.num_values,
        ).view(2, world_size, self.num_values)
        self.total = torch.empty(self.num_values)
        self.round = 0

    def __call__(self) -> None:
        """Replace every parameter's gradient by its mean over the ranks."""
        this_round = self.round + 1
        slots = self.slots[this_round % 2]
        mine = slots[self.rank]
        offset = 0
        for p in self.params:
            n = p.numel()
            if p.grad is None:
                mine[offset : offset + n].zero_()
            else:
                mine[offset : offset + n].copy_(p.grad.reshape(-1))
            offset += n
        self.rounds[self.rank] = this_round  # published after the slot's stores (see above)
        self.wait_for(this_round)
        torch.sum(slots, 0, out=self.total)
        self.total.div_(self.world_size)
        offset = 0
        for p in self.params:
            n = p.numel()
            mean = self.total[offset : offset + n].view_as(p)
            if p.grad is not None:
                p.grad.copy_(mean)
            elif bool(mean.any()):  # unused here, used elsewhere: DDP's average with zeros
                p.grad = mean.clone()
            # unused on every rank: no gradient, as DDP leaves it (the optimizer skips it)
            offset += n
        self.round = this_round

    def wait_for(self, this_round: int) -> None:
        """Spin briefly (the ranks of one step arrive within microseconds of each other), then
        yield, then sleep in growing steps, so a rank waiting on a slower one (more workers than
        cores, a checkpoint being written) leaves it the CPU. A peer process that exited ends the
        wait with an error instead of the timeout."""
        rounds, spins = self.rounds, 0
        started = checked = 0.0
        while (rounds < this_round).any():
            spins += 1
            if spins < 200:
                continue
            if spins < 1000:
                os.sched_yield()
                continue
            now = time.monotonic()
            if not started:
                started = checked = now
            elif now - checked > 1.0:
                checked = now
                self.check_peers(this_round, now - started)
            time.sleep(min(1e-3, 1e-5 * (spins - 999)))

    def check_peers(self, this_round: int, waited_s: float) -> None:
        late = [r for r in range(self.world_size) if self.rounds[r] < this_round]
        gone = [r for r in late if not pid_alive(self.pids[r])]
        if gone or waited_s > TIMEOUT_S:
            why = "exited" if gone else f"did not arrive within {TIMEOUT_S:.0f} s"
            raise RuntimeError(
                f"gradient sync round {this_round}: rank(s) {gone or late} {why}; "
                "Ray Train restarts the workers from the last checkpoint"
            )

    def close(self) -> None:
        del self.slots, self.rounds, self.total
        self.buffer.close()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs: an exited one not yet reaped by its parent (a zombie)
    counts as gone."""
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                return stat.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_shared_grad_sync(
    params: list[nn.Parameter], rank: int, world_size: int, eligible: bool
) -> SharedMemoryGradSync | None:
    """Collective over the run's process group: every rank calls it, and all get a sync or all
    get None (then DDP averages). `eligible`: `choose_grad_sync(...) == 'shm'` on this rank.

    Rank 0 makes the file (its blocks reserved up front, so a full /dev/shm is an error here
    rather than a SIGBUS mid-run) and removes its name once every rank has mapped it: nothing
    is left behind if a worker is killed.
    """
    params = [p for p in params if p.requires_grad]  # frozen ones have no gradient to average
    size = slots_bytes(sum(p.numel() for p in params), world_size)
    votes = torch.tensor([1 if eligible and shared_memory_usable(size) else 0])
    dist.all_reduce(votes, op=dist.ReduceOp.MIN)
    if not int(votes[0]):
        return None
    path = ""
    if rank == 0:
        path = os.path.join(SHM_DIR, f"kiln-grads-{uuid.uuid4().hex}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)  # zero-filled: every round number starts at 0
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            path = ""
    shared: list[Any] = [path]
    dist.broadcast_object_list(shared, src=0)
    if not shared[0]:
        return None
    pids: list[Any] = [None] * world_size
    dist.all_gather_object(pids, os.getpid())
    sync = SharedMemoryGradSync(shared[0], params, rank, world_size, pids)
    dist.barrier()
    if rank == 0:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(shared[0])
    return sync


@torch.no_grad()
def broadcast_from_rank0(model: nn.Module) -> None:
    """Start every rank from rank 0's weights and buffers, as DDP does when it wraps a model."""
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)
