"""Request and response schemas of the HTTP API (they also make /openapi.json complete)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class PredictRequest(BaseModel):
    """TF-Serving / KServe V1 row format."""

    instances: list[list[float]] = Field(
        description="Rows of features, each a list of num_features numbers."
    )
    return_: Literal["predictions", "probabilities"] = Field(
        "predictions", alias="return", description="Ask a classifier for class probabilities too."
    )


class PredictResponse(BaseModel):
    predictions: list[Any]
    probabilities: list[list[float]] | None = None
    model: str
    model_version: int
    ids: list[str] = Field(description="One id per prediction, to attach feedback later.")


class ModelInfo(BaseModel):
    name: str
    version: int
    task: str
    kind: str
    num_features: int
    classes: list[Any] | None = None
    metrics: dict[str, Any]
    aliases: list[str]


class ModelList(BaseModel):
    models: list[ModelInfo]


class ErrorBody(BaseModel):
    error: str


class ServeArgs(BaseModel):
    """Arguments of `build_app`, from Python or from a Serve config file's `args`."""

    models: list[str] = Field(
        min_length=1, description="Model references: name, name@3, name@alias."
    )
    max_batch_size: int = Field(64, ge=1, le=4096)
    batch_wait_timeout_s: float = Field(0.002, ge=0, le=1)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_instances: int = Field(4096, ge=1)
    gpu: Literal["auto", "on", "off"] = "auto"
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    auth: bool = Field(
        True, description="Require an API key with predict:<model> (or predict:*, admin)."
    )
    auth_cache_ttl_s: float = Field(
        5.0, ge=0, le=300, description="How long a replica trusts the registry's answer."
    )
