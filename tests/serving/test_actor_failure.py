"""How a failed call to one of Kiln's actors answers (kiln.serving.errors.actor_failure): pure,
no Ray cluster. Issue 29: a dead registry answered "restarting" forever."""

from __future__ import annotations

import ray.exceptions

from kiln.serving.errors import actor_failure, death_reason

DEAD = (
    "The actor died unexpectedly before finishing this task.\n\tclass_name: Registry\n"
    "The actor is dead because all references to the actor were removed including lineage "
    "ref count."
)


class DeadActor(ray.exceptions.ActorDiedError):
    def __str__(self) -> str:
        return DEAD


def test_a_restarting_actor_is_503_with_retry_after():
    failed = actor_failure(ray.exceptions.ActorUnavailableError("restarting", None), "the store")
    assert failed.status == 503 and failed.headers == {"Retry-After": "2"}
    assert "the store is restarting" in str(failed)


def test_no_answer_in_time_is_503_with_retry_after():
    failed = actor_failure(TimeoutError(), "the feedback store")
    assert (failed.status, failed.headers) == (503, {"Retry-After": "2"})


def test_a_dead_actor_is_503_naming_it_and_why_without_retry_after():
    failed = actor_failure(DeadActor(), "the key registry")
    assert failed.status == 503 and failed.headers is None
    text = str(failed)
    assert "the key registry has stopped and will not come back" in text
    assert "all references to the actor were removed" in text
    assert "restarting" not in text


def test_an_error_inside_the_actor_is_500():
    inner = ray.exceptions.RayTaskError("append", "Traceback ...", OSError("disk full"))
    failed = actor_failure(inner, "the feedback store")
    assert failed.status == 500 and "the feedback store failed" in str(failed)


def test_death_reason_falls_back_to_the_first_line():
    assert death_reason(RuntimeError("first line\nsecond")) == "first line"
    assert death_reason(RuntimeError("")) == "RuntimeError"
