"""Property-based fuzzing of every route in /openapi.json (schemathesis): whatever a client
sends, within the schema or not, no answer is a 5xx, and every answer matches the schema
(status codes and bodies documented, errors as `{"error": "..."}`).

Real model replicas (a model trained on a table, one with boolean classes, an all-numeric
regressor, a model without recorded inputs, and a tiny trained language model behind the
OpenAI routes) behind the real routes, through ASGI; no Ray.
Examples per operation: KILN_FUZZ_EXAMPLES (default 60 in `make test`; `.ci/run` sets 300).
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from kiln.serving.app import api
from kiln.serving.host import ModelHost, Served
from kiln.serving.routing import Router
from kiln.serving.schemas import ServeArgs
from tests.serving.lm_fixtures import LM_NAME, language_replica  # noqa: F401 (a fixture)
from tests.serving.test_routes import client_for
from tests.serving.test_tabular_serving import replicas  # noqa: F401 (a fixture)

EXAMPLES = int(os.environ.get("KILN_FUZZ_EXAMPLES", "60"))

schema = schemathesis.openapi.from_asgi("/openapi.json", api)


@pytest.fixture(scope="module")
def served(replicas, language_replica):  # noqa: F811
    """Every model of the table tests and the tiny language model, served by name; the
    fuzzer's `{name}` and body `model` are mostly random, so `aim_at_served_models` points
    most of them at these."""
    models = [*replicas, LM_NAME]
    host = ModelHost(ServeArgs(models=models, max_instances=50), registry=None)
    router = Router()
    for replica in [*replicas.values(), language_replica]:
        router.add(replica.record.ref, default=True)
    language = {language_replica.record.ref: language_replica}
    host.served = Served({r.record.ref: r for r in replicas.values()}, router, language)
    return host


@pytest.fixture(autouse=True)
def routes_on_the_served_models(served, monkeypatch):
    monkeypatch.setattr("kiln.serving.host.INLINE_FORWARD_S", float("inf"))
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
    aim_at_served_models(case.path_parameters or {}, case.query or {}, case.body)
    case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])


SERVED = ("churn", "renewal", "price", "old", LM_NAME)


def aim_at_served_models(path: dict, query: dict, body: object = None) -> None:
    """Five generated names in six become a served model's (and most versions its own), so
    the bodies reach the parsers instead of stopping at a 404; the rest stay as generated.
    The OpenAI routes name their model in the body: four in five of those name the language
    model. (The unversioned V2 routes also take `?version=`, which the fuzzer fills mostly
    with strings that are not numbers.)"""
    if "name" in path:
        pick = sum(map(ord, str(path["name"]))) % (len(SERVED) + 1)
        if pick < len(SERVED):
            path["name"] = SERVED[pick]
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        if sum(map(ord, body["model"])) % 5:
            body["model"] = LM_NAME
    for where in (path, query):
        if "version" in where and sum(map(ord, str(where["version"]))) % 3:
            where["version"] = "1"
