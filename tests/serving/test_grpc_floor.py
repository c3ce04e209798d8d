"""benchmarks/grpc_floor.py: the bare grpc.aio server answers the load generator, and the
per-call CPU figures are ones that can be right."""

from __future__ import annotations

import os

from benchmarks.grpc_floor import arm


def test_bare_server_answers_and_its_figures_are_possible() -> None:
    found = arm("", concurrency=4, seconds=1.0)
    assert found["errors"] == 0
    assert found["req_s"] > 50
    # A call costs each side some CPU, and no side more than the machine's cores can give.
    ceiling = (os.cpu_count() or 1) * 1e6 / found["req_s"] * 1.05
    assert 0 < found["server_cpu_us_per_call"] < ceiling
    assert 0 < found["client_cpu_us_per_call"] < ceiling
