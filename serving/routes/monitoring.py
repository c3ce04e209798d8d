"""Feedback and monitoring routes: labels for logged predictions, a model's window report."""

from __future__ import annotations

import asyncio
from typing import Any

import ray
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError

from kiln.actors.monitor import build_report, parse_window
from kiln.serving.dependencies import AuthDep, Authorized, BearerDep, HostDep
from kiln.serving.errors import ERROR_RESPONSES, actor_failure
from kiln.serving.feedback import (
    check_lengths,
    generation_row_ids,
    label_texts,
    send_feedback,
    text_label_texts,
)
from kiln.serving.routes.models import read_json_body
from kiln.serving.schemas import FeedbackRequest, FeedbackResponse

router = APIRouter(tags=["monitoring"])

STORE_TIMEOUT_S = 10.0
"""How long a feedback request waits for the FeedbackStore (restarting after a crash, say);
past it the answer is 503 with Retry-After (kiln.serving.errors.actor_failure)."""


def window_seconds(text: str) -> float:
    """The `window` query as seconds, or a 422 that shows the form."""
    try:
        return parse_window(text)
    except ValueError as exc:
        raise HTTPException(422, f"window {exc}") from exc


async def authorize_feedback(name: str, auth: AuthDep, credentials: BearerDep) -> None:
    """401/403 unless the key has feedback:<model>, feedback:* or admin (auth on)."""
    if auth is not None:
        secret = credentials.credentials if credentials else None
        await auth.authorize(secret, "feedback", name.partition("@")[0])


@router.post(
    "/v1/models/{name}:feedback",
    response_model=FeedbackResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": FeedbackRequest.model_json_schema()}},
        }
    },
)
async def feedback(
    name: str, request: Request, host: HostDep, auth: AuthDep, credentials: BearerDep
) -> dict[str, Any]:
    await authorize_feedback(name, auth, credentials)
    language = host.serves_language_model(name)
    replica = host.language_for(name) if language else host.replica_for(name)[1]
    payload, _booleans = await read_json_body(request, host.args.max_body_bytes)
    try:
        body = FeedbackRequest.model_validate(payload)
    except ValueError as exc:
        raise RequestValidationError(exc.errors()) from exc  # type: ignore[attr-defined]
    check_lengths(body.ids, body.labels)
    if language:  # a generation's label: a score, a corrected text, ... (serving/feedback.py)
        texts = text_label_texts(body.labels)
        row_ids = generation_row_ids(body.ids)
    else:
        texts, row_ids = label_texts(body.labels, replica.spec), body.ids
    if host.log is None:
        raise HTTPException(
            409, "the prediction log is off here (--log-sample 0): feedback has nothing to join"
        )
    try:
        # This replica's own recent predictions become known first.
        await asyncio.wait_for(host.log.flush(), STORE_TIMEOUT_S)
        answer = await asyncio.wait_for(
            send_feedback(host.log.stores(), replica.record.name, row_ids, texts),
            STORE_TIMEOUT_S,
        )
    except (TimeoutError, ray.exceptions.RayError) as exc:
        # A repeated label is harmless: a 503 with Retry-After invites sending the same again.
        raise actor_failure(exc, "the feedback store") from exc
    if language:  # unknown ids as the caller sent them
        sent = dict(zip(row_ids, body.ids, strict=True))
        for field in ("unknown_ids", "unchecked_ids"):
            if field in answer:
                answer[field] = [sent.get(i, i) for i in answer[field]]
    if host.metrics is not None and answer["accepted"]:
        host.metrics.feedback.inc(answer["accepted"], {"model": replica.record.name})
    return answer


@router.get("/v1/models/{name}/metrics", responses=ERROR_RESPONSES)
async def metrics(
    name: str, host: HostDep, _: Authorized, window: str = Query("1h")
) -> dict[str, Any]:
    """Per served version over the window: traffic, latency, quality from feedback, drift,
    cost (actors/monitor.py). A language model: the answering replica's live figures, and the
    window's logged ones under `window` (actors/language_monitor.py)."""
    seconds = window_seconds(window)
    language = host.serves_language_model(name)
    if language:
        live = language_report(host, name)
        if host.registry is None:  # nothing logged without a registry (route tests)
            return live
        model = live["model"]
    else:
        model = host.replica_for(name)[1].record.name
    registry = host.registry
    if registry is None:  # a host built without Ray (route tests): nothing was logged
        raise HTTPException(409, "this server keeps no prediction log (it has no registry)")
    try:
        records = {r.version: r for r in await registry.list_versions.remote(model)}
        storage_uri = str(await registry.get_storage_uri.remote())
    except ray.exceptions.RayError as exc:
        raise actor_failure(exc, "the model registry") from exc
    # Reading Parquet and computing drift take milliseconds to seconds: off the event loop.
    report = await asyncio.to_thread(build_report, storage_uri, model, records, seconds)
    if language:  # this replica's live figures, and every replica's logged ones in the window
        return {**live, "window": report}
    return report


def language_report(host: HostDep, name: str) -> dict[str, Any]:
    """A served language model's numbers on this replica (serving/language.py) and its cost
    per 1,000 output tokens at this replica's CPUs and GPUs since it started."""
    from kiln.actors.monitor import prices
    from kiln.serving.host import assigned_gpus

    replica = host.language_for(name)
    report = replica.stats.report()
    price = prices()
    usd_per_s = (
        host.args.num_cpus * price["cpu_hour"] + assigned_gpus() * price["gpu_hour"]
    ) / 3600
    alive_s = report.pop("alive_s")
    tokens = report["completion_tokens"]
    return {
        "model": replica.record.name,
        "version": replica.record.version,
        "kind": "lm",
        "scope": "this replica, since it started",
        **report,
        "cost": {
            "usd": usd_per_s * alive_s,
            "usd_per_1k_output_tokens": usd_per_s * alive_s / tokens * 1000 if tokens else None,
        },
    }
