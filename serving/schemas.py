"""Request and response schemas of the HTTP API (they also make /openapi.json complete)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError, WithJsonSchema

INSTANCES_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {
        "anyOf": [
            {
                "type": "array",
                "items": {"type": ["number", "string", "boolean", "null"]},
                "description": "A row: one value per model input, in the model's order.",
            },
            {
                "type": "object",
                "additionalProperties": {"type": ["number", "string", "boolean", "null"]},
                "description": "Values by input name; a name left out is a missing value.",
            },
        ]
    },
    "description": "Rows of input values, or objects of them by input name (a model trained "
    "on a table: see its `inputs`). A model without `inputs` takes rows of num_features numbers.",
}


class PredictRequest(BaseModel):
    """TF-Serving / KServe V1 row format: rows of values, or objects of values by input name."""

    # Checked against the model's inputs by kiln.serving.host.parse_rows (its errors name the input
    # and the fix); typing the values here would cost more than the conversion that follows
    # (validating 64 rows of 64 floats: 80 us as list[list[float]], 150 us as the union the
    # schema documents, 3 us as list[Any]).
    instances: Annotated[list[Any], WithJsonSchema(INSTANCES_SCHEMA)]
    return_: Literal["predictions", "probabilities"] = Field(
        "predictions", alias="return", description="Ask a classifier for class probabilities too."
    )


class PredictResponse(BaseModel):
    predictions: list[Any]
    probabilities: list[list[float]] | None = None
    model: str
    model_version: int
    ids: list[str] = Field(description="One id per prediction, to attach feedback later.")


class InputInfo(BaseModel):
    """One input column of a model trained on a table."""

    name: str
    kind: Literal["numeric", "categorical"]
    type: str = Field(description="The column's type in the training table (int64, string, ...).")
    categories: list[str] | None = Field(
        None,
        description="Categorical: the categories kept in training, sorted, as strings (true/"
        "false for booleans); any other value counts as other, null or an empty string as "
        "missing.",
    )


class BatchingInfo(BaseModel):
    """A served model's dynamic batching (serving/batching.py)."""

    max_batch_size: int
    batch_wait_timeout_s: float
    source: str = Field(
        description="profile (chosen from the model's latency profile), user, profile+user, "
        "or default."
    )
    profile_ms: dict[str, float] | None = Field(
        None, description="Milliseconds of one forward pass by batch size (the fastest of a few)."
    )


class ModelInfo(BaseModel):
    name: str
    version: int
    task: str
    kind: str
    num_features: int
    classes: list[Any] | None = None
    inputs: list[InputInfo] | None = Field(
        None,
        description="The model's inputs in order (null for a model that takes num_features "
        "numbers per row).",
    )
    label: dict[str, Any] | None = Field(None, description="The label column: name and type.")
    metrics: dict[str, Any]
    aliases: list[str]
    backend: Literal["torch", "onnxruntime"] = Field(
        "torch", description="What runs the model: torch, or ONNX Runtime on its model.onnx."
    )
    batching: BatchingInfo | None = Field(
        None, description="Its dynamic batching on the replica that answered."
    )


class OpenAIModel(BaseModel):
    """A served model as OpenAI's `GET /v1/models` lists it."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kiln"


class ModelList(BaseModel):
    models: list[ModelInfo]
    """Kiln's description of each served tabular version."""
    object: Literal["list"] = "list"
    data: list[OpenAIModel] = Field(
        default_factory=list,
        description="OpenAI's shape: every served model name this key may use (language "
        "models answer /v1/completions and /v1/chat/completions).",
    )


class ErrorBody(BaseModel):
    error: str


class RequestError(ValueError):
    """A request Kiln cannot serve; it answers `status` with an `ErrorBody` (serving/errors.py)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2TensorMetadata(BaseModel):
    name: str
    datatype: Literal["FP32", "FP64", "INT64", "BYTES", "BOOL"]
    shape: list[int] = Field(description="-1 for a dimension of any size.")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2InferInput(BaseModel):
    name: str = Field(description="The model's input name (see its metadata).")
    shape: list[int] = Field(
        description="[N, F] for `features`, N rows of the model's F inputs; [N] or [N, 1] for "
        "one input by name (a model trained on a table, see its metadata)."
    )
    datatype: Literal["FP32", "FP64", "INT64", "INT32", "FP16", "BYTES", "BOOL"] = Field(
        description="Numbers are read and converted to FP32 (serving/v2.py DTYPES); BYTES "
        "(UTF-8 strings) and BOOL are for a categorical input of that type."
    )
    data: list[Any] | None = Field(
        None, description="Row-major values, flat or nested; absent with binary_data_size."
    )
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_size: the tensor's bytes follow the JSON header."
    )


class V2RequestedOutput(BaseModel):
    name: Literal["predictions", "probabilities"]
    parameters: dict[str, Any] | None = Field(None, description="binary_data: true|false.")


class V2InferRequest(BaseModel):
    """Open Inference Protocol V2 request; binary tensors follow the JSON when the
    Inference-Header-Content-Length header gives the JSON's length."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2InferInput] = Field(
        min_length=1,
        description="`features` alone, or the model's inputs by name, each at most once.",
    )
    outputs: list[V2RequestedOutput] | None = None


class V2InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str
    parameters: dict[str, Any] | None = Field(
        None, description="prediction_ids: one id per row, to attach feedback later."
    )
    outputs: list[V2InferOutput]


class FeedbackRequest(BaseModel):
    """Labels for logged predictions, by the ids their responses carried."""

    ids: list[str] = Field(
        min_length=1, description="Prediction ids (V1 `ids`, V2 `parameters.prediction_ids`)."
    )
    labels: list[Any] = Field(
        min_length=1,
        description="One label per id: a class of the model (as in its metadata) or a number.",
    )


class FeedbackResponse(BaseModel):
    accepted: int = Field(description="Labels stored (a repeated id counts each time).")
    unknown_ids: list[str] = Field(
        description="Ids not in the prediction log: never served, not sampled (--log-sample), "
        "past retention, or logged less than a second ago by another replica (retry)."
    )
    unchecked_ids: list[str] | None = Field(
        None,
        description="Present only once a feedback store's index of logged ids reached its "
        "bound (KILN_FEEDBACK_INDEX_IDS) and left its oldest days out: ids it could not check, "
        "kept all the same (a label joins only a logged prediction).",
    )


CanaryWeight = Annotated[
    int, Field(ge=0, le=100, description="Percent of bare-name traffic it takes.")
]
"""The one rule for a canary's share of traffic; `is_canary_weight` applies it outside a model."""
_CANARY_WEIGHT = TypeAdapter(CanaryWeight)


def is_canary_weight(weight: int) -> bool:
    """Whether `weight` is a share a canary may take (the rule of `CanarySpec.weight`)."""
    try:
        _CANARY_WEIGHT.validate_python(weight)
    except ValidationError:
        return False
    return True


class CanarySpec(BaseModel):
    ref: str = Field(description="The canary version, e.g. digits-mlp@4.")
    weight: CanaryWeight


AUTH_OFF_WARNING = (
    "Kiln serving with auth off: anyone who can reach the HTTP port may call every served model"
)
"""Logged by each replica and printed by the CLI when `ServeArgs.auth` is False."""

LIVE_FIELDS = (
    "models",
    "canary",
    "max_batch_size",
    "batch_wait_timeout_s",
    "rate_limit_per_s",
    "rate_limit_burst",
)
"""ServeArgs that travel as Serve `user_config`: changing them reconfigures running replicas in
place (no restart, no failed request): what is served, canary splits, batching, rate limits."""


class ServeArgs(BaseModel):
    """Arguments of `build_app`, from Python or from a Serve config file's `args`."""

    models: list[str] = Field(
        min_length=1, description="Model references: name, name@3, name@alias."
    )
    canary: dict[str, CanarySpec] = Field(
        default_factory=dict, description="Model name -> its canary version and weight."
    )
    sticky_header: str = Field(
        "x-kiln-session", description="Requests with the same value stay on one side of a split."
    )
    max_batch_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Requests per forward pass; unset: chosen per model from its latency "
        "profile when a replica loads it (serving/batching.py).",
    )
    lm_max_batch: int = Field(
        32, ge=1, le=1024, description="Language models: sequences decoding together."
    )
    kv_cache_tokens: int | None = Field(
        None,
        ge=16,
        description="Language models: KV-cache budget in tokens (default: every sequence's "
        "full context, within 2 GiB).",
    )
    lm_max_waiting: int = Field(
        64,
        ge=0,
        le=100_000,
        description="Language models: requests that may wait for KV memory; past it, 429.",
    )
    batch_wait_timeout_s: float | None = Field(
        None,
        ge=0,
        le=1,
        description="How long a batch waits to fill; 0 batches what is queued; unset: chosen "
        "per model from its latency profile (0 for an overhead-bound model).",
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_instances: int = Field(4096, ge=1)
    rate_limit_per_s: float = Field(0.0, ge=0, description="Per key and replica; 0: no limit.")
    rate_limit_burst: float = Field(20.0, ge=1)
    gpu: Literal["auto", "on", "off"] = "auto"
    backend: Literal["torch", "onnxruntime", "auto"] = Field(
        "auto",
        description="What runs each model: torch, onnxruntime (its model.onnx from kiln export), "
        "or auto: onnxruntime for a version that has model.onnx, torch otherwise.",
    )
    direct_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Kiln's direct HTTP ingress (serving/direct.py): every replica answers "
        "this port itself (SO_REUSEPORT), past Serve's HAProxy; unset: Serve's ingress only.",
    )
    direct_host: str = Field("127.0.0.1", description="The direct ingress's bind address.")
    direct_grpc_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="With direct_port: every replica answers V2 gRPC on this port itself.",
    )
    grpc_front: Literal["auto", "native", "python"] = Field(
        "auto",
        description="Who terminates gRPC on the direct ingress: the C++ front "
        "(serving/native/, `make native`) handing calls to the replica, or grpc.aio in the "
        "replica (python); auto: native where it is built.",
    )
    num_replicas: int = Field(1, ge=1, description="Fixed replica count (without autoscaling).")
    min_replicas: int | None = Field(None, ge=0, description="Autoscaling floor (0 allowed).")
    max_replicas: int | None = Field(None, ge=1, description="Autoscaling ceiling.")
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(2.0, ge=0)
    downscale_delay_s: float = Field(10.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float | None = Field(
        None,
        ge=0,
        le=1,
        description="GPU share per replica; default 0.25 when the cluster has GPUs.",
    )
    graceful_shutdown_timeout_s: float = Field(10.0, ge=0)
    access_log: bool = Field(
        False,
        description="Serve's per-request access log lines (each costs about 0.1 ms; as in "
        "Triton and TF Serving, off by default).",
    )
    auth: bool = Field(
        True, description="Require an API key with predict:<model> (or predict:*, admin)."
    )
    log_sample: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of requests written to the prediction log (monitoring, feedback, "
        "retraining); 0 turns the log off.",
    )
    log_retention_days: int = Field(30, ge=1, description="Days the prediction log is kept.")
    metrics: bool = Field(
        True, description="Per-request Prometheus metrics through Ray (about 16 us a request)."
    )
    feedback_shards: int = Field(
        1, ge=1, le=256, description="FeedbackStore actors the log is spread over by id hash."
    )
    feedback_index_ids: int = Field(
        50_000_000,  # actors/feedback.py INDEX_MAX_IDS
        ge=1000,
        description="Logged ids a FeedbackStore shard indexes (8 bytes each) before its "
        "oldest day leaves memory (labels for ids it no longer holds are kept unchecked).",
    )
    auth_cache_ttl_s: float = Field(
        5.0, ge=0, le=300, description="How long a replica trusts the registry's answer."
    )
    log_mask: list[str] = Field(
        default_factory=list,
        description="Inputs the prediction log keeps only as a keyed hash (equal values stay "
        "equal): serving/logmask.py.",
    )
    log_drop: list[str] = Field(
        default_factory=list, description="Inputs the prediction log does not keep (NaN)."
    )
    log_mask_text: bool = Field(
        False,
        description="Language models: mask e-mail addresses, phone numbers and card numbers "
        "in logged prompts and completions.",
    )
    log_mask_key: str | None = Field(
        None,
        repr=False,
        description="The deployment's masking secret (hex); unset: KILN_LOG_MASK_KEY, else a "
        "random one per replica start (hashes then differ between starts).",
    )
    key_use_report_s: float = Field(
        30.0,
        ge=0.1,
        le=3600,
        description="How often a replica reports its keys' last uses to the registry (one "
        "call per period, not one per request: kiln keys list).",
    )

    def live(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if k in LIVE_FIELDS}

    def autoscaling(self) -> dict | None:
        if self.min_replicas is None and self.max_replicas is None:
            return None
        low = self.min_replicas if self.min_replicas is not None else 1
        high = self.max_replicas if self.max_replicas is not None else max(low, 1)
        if low > high:
            raise ValueError(f"min_replicas {low} exceeds max_replicas {high}")
        return {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": max(low, 1),
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "downscale_to_zero_delay_s": self.downscale_delay_s,
            "metrics_interval_s": 1.0,
            "look_back_period_s": 5.0,
        }
