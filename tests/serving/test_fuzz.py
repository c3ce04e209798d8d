"""Property-based fuzzing of every route in /openapi.json (schemathesis): whatever a client
sends, within the schema or not, no answer is a 5xx, and every answer matches the schema
(status codes and bodies documented, errors as `{"error": "..."}`).

Real model replicas (a model trained on a table, one with boolean classes, an all-numeric
regressor, a model without recorded inputs) behind the real routes, through ASGI; no Ray.
Examples per operation: KILN_FUZZ_EXAMPLES (default 60 in `make test`; `.ci/run` sets 300).
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from serving.app import api
from serving.host import ModelHost, Served
from serving.routing import Router
from serving.schemas import ServeArgs
from tests.serving.test_routes import client_for
from tests.serving.test_tabular_serving import replicas  # noqa: F401 (a fixture)

EXAMPLES = int(os.environ.get("KILN_FUZZ_EXAMPLES", "60"))

schema = schemathesis.openapi.from_asgi("/openapi.json", api)


@pytest.fixture(scope="module")
def served(replicas):  # noqa: F811
    """Every model of the table tests, served by name; the fuzzer's `{name}` is mostly random,
    so the examples' schema also names them (`churn`, `renewal`, `price`, `old`)."""
    host = ModelHost(ServeArgs(models=list(replicas), max_instances=50), registry=None)
    router = Router()
    for replica in replicas.values():
        router.add(replica.record.ref, default=True)
    host.served = Served({r.record.ref: r for r in replicas.values()}, router)
    return host


@pytest.fixture(autouse=True)
def routes_on_the_served_models(served, monkeypatch):
    monkeypatch.setattr("serving.host.INLINE_FORWARD_S", float("inf"))
    client_for(served)  # installs the dependency overrides on `api`
    yield
    api.dependency_overrides.clear()


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_input_gets_a_server_error_and_every_answer_fits_the_schema(case):
    aim_at_served_models(case.path_parameters or {}, case.query or {})
    case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])


SERVED = ("churn", "renewal", "price", "old")


def aim_at_served_models(path: dict, query: dict) -> None:
    """Four generated names in five become a served model's (and most versions its own), so
    the bodies reach the parsers instead of stopping at a 404; the rest stay as generated.
    (The unversioned V2 routes also take `?version=`, which the fuzzer fills mostly with
    strings that are not numbers.)"""
    if "name" in path:
        pick = sum(map(ord, str(path["name"]))) % (len(SERVED) + 1)
        if pick < len(SERVED):
            path["name"] = SERVED[pick]
    for where in (path, query):
        if "version" in where and sum(map(ord, str(where["version"]))) % 3:
            where["version"] = "1"
