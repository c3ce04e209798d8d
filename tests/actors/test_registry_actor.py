"""The Registry actor on the shared local Ray: many writers at once, and a kill mid-write.

Each test gets its own unnamed Registry actor on its own catalog file and storage folder, so
version counts are exact whatever else the session registered.
"""

import asyncio
import os
import time

import pytest
import ray

from kiln.actors.registry import Registry, read_verified_files
from kiln.training.artifacts import model_from_files
from tests.conftest import TINY_SPEC, tiny_model_files, wait_for

NUM_WRITERS = 8
PER_WRITER = 25
BLOB_BYTES = 8 * 1024 * 1024
NUM_BLOBS = 16


@pytest.fixture
def fresh_registry(ray_local, tmp_path):
    storage = tmp_path / "storage"
    handle = Registry.remote(str(tmp_path / "registry.db"), str(storage))
    yield handle, storage
    ray.kill(handle, no_restart=True)


@ray.remote(num_cpus=0)
class StartLine:
    """A barrier: no writer starts before all of them run, each in its own worker process."""

    def __init__(self, num_writers: int) -> None:
        self.num_writers = num_writers
        self.arrived = 0
        self.all_here = asyncio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived >= self.num_writers:
            self.all_here.set()
        await asyncio.wait_for(self.all_here.wait(), timeout=120)


@ray.remote(num_cpus=0)
def register_in_a_loop(
    registry, start_line, worker: int, files: dict, spec: dict
) -> tuple[int, list[int], float, float]:
    """One writer process: 25 registrations, one after another, each tagged with its origin."""
    ray.get(start_line.wait.remote())
    began = time.time()
    versions = []
    for i in range(PER_WRITER):
        tagged = {**files, "tag.txt": f"{worker}-{i}".encode()}
        metrics = {"worker": worker, "i": i}
        record = ray.get(
            registry.register.remote(
                "shared", tagged, spec, metrics, {}, request_id=f"{worker}-{i}"
            )
        )
        versions.append(record.version)
    return os.getpid(), versions, began, time.time()


@pytest.mark.slow
def test_eight_processes_registering_at_once_give_exactly_200_versions(fresh_registry):
    handle, storage = fresh_registry
    files = tiny_model_files()
    start_line = StartLine.remote(NUM_WRITERS)
    started = time.perf_counter()
    results = ray.get(
        [
            register_in_a_loop.remote(handle, start_line, w, files, TINY_SPEC)
            for w in range(NUM_WRITERS)
        ],
        timeout=300,
    )
    elapsed_s = time.perf_counter() - started
    registering_s = max(r[3] for r in results) - min(r[2] for r in results)
    pids = {r[0] for r in results}
    assert len(pids) == NUM_WRITERS  # eight separate worker processes
    returned = [v for r in results for v in r[1]]
    assert sorted(returned) == list(range(1, NUM_WRITERS * PER_WRITER + 1))
    for r in results:
        assert r[1] == sorted(r[1])  # each writer saw its own versions increase

    records = ray.get(handle.list_versions.remote("shared"))
    assert [r.version for r in records] == list(range(1, 201))
    for record in records:
        loaded = read_verified_files(str(storage), record)
        model_from_files(loaded)
        assert loaded["tag.txt"].decode() == f"{record.metrics['worker']}-{record.metrics['i']}"
    assert len({(r.metrics["worker"], r.metrics["i"]) for r in records}) == 200
    print(
        f"\n8 Ray worker processes x 25 registrations through one actor: {registering_s:.1f} s "
        f"registering, {elapsed_s:.1f} s with the workers' start"
    )


@pytest.mark.chaos
@pytest.mark.parametrize("retry", [False, True], ids=["no-retry", "retried"])
def test_killed_mid_registration_the_version_is_whole_or_absent(fresh_registry, retry):
    handle, storage = fresh_registry
    ray.get(handle.register.remote("big", tiny_model_files(), TINY_SPEC, {}, {}))
    blobs = {f"blob-{i:02d}.bin": os.urandom(BLOB_BYTES) for i in range(NUM_BLOBS)}
    files = {**tiny_model_files(1), **blobs}
    method = handle.register if retry else handle.register.options(max_task_retries=0)
    pending = method.remote("big", files, TINY_SPEC, {}, {}, request_id="big-2")

    writing = storage / "models" / "big" / "v2"
    assert wait_for(lambda: writing.exists() and any(writing.iterdir()), 60, interval_s=0.002)
    files_at_kill = len(list(writing.iterdir()))
    ray.kill(handle, no_restart=False)
    try:
        record = ray.get(pending, timeout=120)
    except ray.exceptions.RayActorError:
        record = None

    # The restarted actor answers only after its start-up sweep of orphan folders.
    versions = ray.get(handle.list_versions.remote("big"), timeout=120)
    for version in versions:
        loaded = read_verified_files(str(storage), version)
        model_from_files(loaded)
        assert set(loaded) == set(version.artifacts)
    assert {p.name for p in (storage / "models" / "big").iterdir()} == {
        f"v{v.version}" for v in versions
    }
    if retry:
        # The actor's automatic retry ran after the restart; the request id kept it single.
        assert record is not None and set(record.artifacts) == set(files)
        assert [v.version for v in versions] == [1, 2]
    else:
        assert [v.version for v in versions] in ([1], [1, 2])
    after = ray.get(handle.register.remote("big", tiny_model_files(3), TINY_SPEC, {}, {}))
    model_from_files(read_verified_files(str(storage), after))
    print(f"\nkilled with {files_at_kill}/{len(files)} files written; retry={retry}")
