"""An actor that cannot start ends the wait with one line naming it and the cause (issue 34);
one that crashes after it started is still restarted."""

from __future__ import annotations

import os
import time

import pytest
import ray

from kiln.actors.startup import ActorStartError, died_cause, wait_started
from tests.conftest import wait_for


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class RaisesInConstructor:
    def __init__(self) -> None:
        raise ValueError("the constructor says no")

    def ready(self) -> int:
        return 1


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class ExitsInConstructor:
    """A process that exits while starting (a module calling sys.exit, a native crash): Ray
    restarts such an actor forever, and a retried call on it never returns."""

    def __init__(self) -> None:
        os._exit(3)

    def ready(self) -> int:
        return 1


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class Healthy:
    def ready(self) -> int:
        return os.getpid()

    def crash(self) -> None:
        os._exit(3)


@pytest.mark.usefixtures("ray_local")
def test_a_constructor_that_raises_ends_the_wait_with_its_cause() -> None:
    actor = RaisesInConstructor.remote()  # type: ignore[attr-defined]
    start = time.monotonic()
    with pytest.raises(ActorStartError) as raised:
        wait_started([actor], "ready")
    message = str(raised.value)
    assert message == "RaisesInConstructor could not start: ValueError: the constructor says no"
    assert "\n" not in message
    assert time.monotonic() - start < 60  # generous: one worker start on a loaded machine


@pytest.mark.usefixtures("ray_local")
def test_a_process_that_exits_while_starting_is_not_restarted_forever() -> None:
    actor = ExitsInConstructor.remote()  # type: ignore[attr-defined]
    with pytest.raises(ActorStartError) as raised:
        wait_started([actor], "ready")
    message = str(raised.value)
    assert message.startswith("ExitsInConstructor could not start: its process exited")
    assert "\n" not in message
    # Killed for good: a later call fails at once instead of being retried forever.
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.ready.remote(), timeout=60)


@pytest.mark.usefixtures("ray_local")
def test_an_actor_that_crashes_after_starting_is_restarted() -> None:
    actor = Healthy.remote()  # type: ignore[attr-defined]
    (first_pid,) = wait_started([actor], "ready")
    actor.crash.remote()
    # max_restarts=-1 still holds once it started: it comes back in a new process.
    assert wait_for(lambda: ray.get(actor.ready.remote(), timeout=60) != first_pid, 60)
    ray.kill(actor, no_restart=True)


@pytest.mark.usefixtures("ray_local")
def test_the_method_s_own_kiln_error_is_not_a_start_failure() -> None:
    from kiln.actors.shards import start_shard
    from kiln.actors.sources import SourceSpec
    from kiln.training.errors import KilnError

    # A file gone after the driver's check is the shard's own error (kept for `ready`).
    source = SourceSpec(uri="/nonexistent/h6-startup.csv", label="y")
    node = ray.get_runtime_context().get_node_id()
    handles = [start_shard(source, "train", 0, 1, node, None, False)]
    with pytest.raises(KilnError) as raised:
        wait_started(handles, "ready")
    assert not isinstance(raised.value, ActorStartError)
    for handle in handles:
        ray.kill(handle, no_restart=True)


def test_died_cause_is_the_last_exception_line() -> None:
    text = (
        "The actor died because of an error raised in its creation task, ray::S.__init__()\n"
        "  At least one of the input arguments for this task could not be computed:\n"
        "ray.exceptions.RaySystemError: System error: No module named 'kiln.training.data'\n"
        "traceback: Traceback (most recent call last):\n"
        '  File "/x/actors/sources.py", line 26, in <module>\n'
        "    from kiln.training.data import make_batch, numpy_of\n"
        "ModuleNotFoundError: No module named 'kiln.training.data'; 'training' is not a package\n"
    )
    assert died_cause(RuntimeError(text)) == (
        "ModuleNotFoundError: No module named 'kiln.training.data'; 'training' is not a package"
    )
