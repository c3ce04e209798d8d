"""KServe V1 `:explain`: a model's predictions with Captum's attributions (serving/explain.py).

Same keys and scopes as `:predict` (the `Authorized` dependency), the same instances, at most
64 of them and 200 steps per request (422 beyond).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from kiln.serving.dependencies import Authorized, HostDep
from kiln.serving.errors import ERROR_RESPONSES
from kiln.serving.explain import (
    MAX_EXPLAIN_INSTANCES,
    Explainers,
    ExplainRequest,
    ExplainResponse,
    explain_response,
    explainers_for,
)
from kiln.serving.host import parse_rows
from kiln.serving.routes.models import read_json_body
from kiln.serving.schemas import PredictRequest, RequestError
from kiln.training.errors import KilnError
from kiln.training.explain import ExplainConfig

router = APIRouter()


async def get_explainers(host: HostDep) -> Explainers:
    """The replica's explainers (a test overrides this to give them a storage URI)."""
    return explainers_for(host)


ExplainersDep = Annotated[Explainers, Depends(get_explainers)]


@router.post(
    "/v1/models/{name}:explain",
    response_model=ExplainResponse,
    responses=ERROR_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ExplainRequest.model_json_schema()}},
        }
    },
)
async def explain(
    name: str, request: Request, host: HostDep, explainers: ExplainersDep, _: Authorized
) -> Response:
    key, replica = host.replica_for(name, request.headers.get(host.args.sticky_header))
    payload, booleans = await read_json_body(request, host.args.max_body_bytes)
    try:
        body = ExplainRequest.model_validate(payload)
    except ValueError as exc:
        raise RequestValidationError(exc.errors()) from exc  # type: ignore[attr-defined]
    try:
        config = ExplainConfig(method=body.method, n_steps=body.n_steps, target=body.target)
    except KilnError as exc:
        raise RequestError(422, str(exc)) from exc
    limit = min(MAX_EXPLAIN_INSTANCES, host.args.max_instances)
    x = parse_rows(PredictRequest(instances=body.instances), replica, limit, booleans)
    outputs = await host.forward(key, x)  # the served answers, as :predict gives them
    explanations = await explainers.explain(key, replica, x, outputs, config)
    reply = explain_response(replica, replica.format(outputs)["predictions"], explanations)
    # target and convergence_delta stay in as null (a regressor, ablation); the per-feature
    # parts only appear for a model whose inputs span several features.
    omit: dict[str, Any] = {}
    if all(e.feature_attributions is None for e in reply.explanations):
        omit = {"features": True, "explanations": {"__all__": {"feature_attributions"}}}
    return Response(reply.model_dump_json(exclude=omit), media_type="application/json")
