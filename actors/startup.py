"""The first wait on actors just created: an actor that cannot start ends the command.

Kiln's long-lived actors are created with `max_restarts=-1`, so that one killed after it
started (a node lost, an OOM kill) comes back. Ray does not tell an actor that crashed after
starting from one that never started: an actor whose process exits while its class is
imported or its constructor runs (a module that calls `sys.exit`, a native crash, a user's
`training.py` shadowing Kiln's) is restarted forever, and a method call on it, retried with
`max_task_retries=-1`, never returns (issue 34: `kiln train` printed `ShardStore.loaded
failed ... The actor was restarted` for 300 s). An exception in the constructor or an import
error reaches the driver as an ActorDiedError whose message is the remote traceback.

`wait_started` makes the first call on new actors, and while it waits looks at each actor's
restart count in the GCS: an actor restarted before it ever answered could not start. It is
killed (no restart) and the wait raises one KilnError naming the actor class and the cause.
Infinite restarts stay for actors that answered once: this wait is over by then.
"""

from __future__ import annotations

import glob
import os
import time
from typing import Any

import ray

from kiln.training.errors import KilnError

POLL_S = 0.25


class ActorStartError(KilnError):
    """An actor that could not start: its constructor raised, its class did not import, or
    its process exited before it answered once."""


def wait_started(handles: list[Any], method: str, timeout_s: float | None = None) -> list[Any]:
    """Call `method` (no arguments) on each new actor and return the answers, in order.

    Raises KilnError("<Class> could not start: <cause>") as soon as one actor's constructor
    raised, its class could not be imported, or its process died before it answered once;
    every handle is killed then. A KilnError the method itself raises goes through as it is,
    as does an interrupt (the caller releases what it started).
    """
    refs = [getattr(h, method).remote() for h in handles]
    pending = list(refs)
    pids: dict[int, set[int]] = {i: set() for i in range(len(handles))}
    # Restarts before this wait (a detached actor found by name, killed once long ago) are not
    # a failure to start.
    before = [int(actor_info(h).get("NumRestarts") or 0) for h in handles]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            for ref in done:
                index = refs.index(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.ActorDiedError as exc:
                    if not exc.actor_init_failed:
                        raise
                    raise ActorStartError(
                        f"{class_name(handles[index])} could not start: {died_cause(exc)}"
                    ) from None
            for ref in pending:
                index = refs.index(ref)
                info = actor_info(handles[index])
                if info.get("Pid"):
                    pids[index].add(int(info["Pid"]))
                if int(info.get("NumRestarts") or 0) > before[index]:
                    cause = exited_cause(pids[index])
                    raise ActorStartError(f"{class_name(handles[index])} could not start: {cause}")
            if deadline is not None and time.monotonic() > deadline and pending:
                raise ActorStartError(
                    f"{class_name(handles[refs.index(pending[0])])} did not answer within "
                    f"{timeout_s:.0f} s; is the cluster out of resources? (kiln status)"
                )
        return ray.get(refs)
    except ActorStartError:
        for handle in handles:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # noqa: BLE001, S110 (already gone: nothing to release)
                pass
        raise


def class_name(handle: Any) -> str:
    return str(handle._ray_actor_creation_function_descriptor.class_name)


def actor_info(handle: Any) -> dict[str, Any]:
    """The actor's GCS record (state, restarts, pid); empty when the GCS has none yet."""
    try:
        return ray._private.state.actors(handle._actor_id.hex()) or {}
    except Exception:  # noqa: BLE001 (a GCS hiccup: look again at the next poll)
        return {}


def died_cause(exc: BaseException) -> str:
    """The error that ended a creation task: the last line of the remote traceback that names
    an exception (`ModuleNotFoundError: No module named 'kiln.training.data'`), not Ray's
    wrapper."""
    lines = [line.strip() for line in str(exc).splitlines()]
    named = [
        line
        for line in lines
        if line
        and not line.startswith(("File ", "^", "Traceback", "During handling"))
        and ":" in line.split(" ", 1)[0]
        and not line.startswith(("ray.exceptions.", "traceback:"))
    ]
    if named:
        return named[-1]
    return lines[-1] if lines else type(exc).__name__


def exited_cause(pids: set[int]) -> str:
    """Why the actor's process exited while starting: the last line its worker wrote to stderr
    (this node's log), when there is one."""
    last = last_stderr_line(pids)
    where = f" ({last})" if last else ""
    return f"its process exited before the actor answered once{where}; it was not restarted"


def last_stderr_line(pids: set[int]) -> str | None:
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None or not pids:
        return None
    logs = node.get_logs_dir_path()
    for pid in sorted(pids):
        for path in glob.glob(os.path.join(logs, f"worker-*-{pid}.err")):
            try:
                with open(path, errors="replace") as handle:
                    # Ray's own marker lines (":job_id:...", ":actor_name:...") are not output.
                    lines = [ln.strip() for ln in handle if ln.strip() and not ln.startswith(":")]
            except OSError:
                continue
            if lines:
                return lines[-1][:300]
    return None
