"""`:explain` on a serving replica: Captum's attributions (training/explain.py) without holding
up the predict batches.

Predict runs its forward passes on Serve's event loop (serving/host.py). An explanation costs
tens to hundreds of forward and backward passes, so a Serve replica hands it to an
`ExplainWorker`, a Ray actor it starts on its first explain (owned by the replica: it dies with
it; no CPU reserved, its torch threads the replica's num_cpus). At most one explanation computes
at a time per replica; a few more wait their turn, and past `MAX_WAITING` a caller gets 429
instead of an ever longer queue. Why a process and not a worker thread of the replica: a
thread shares the replica's GIL with the event loop, and every torch call of either releases and
takes it back, so each waits on the other (measured in-process: a 1-row explanation took 160 to
350 ms beside a busy predict loop instead of 16 ms alone); a process shares only the cores.
benchmarks/explain_overhead.py measures both (`--explain-in thread|worker`; docs/explain.md has
the figures). Routes served without Ray (the route tests) explain on such a thread
(`ThreadExplainers`).

The worker explains with the version's torch model rebuilt from its checksum-verified
spec.json and model.safetensors, whatever the replica's backend: for an ONNX Runtime version
these are the weights its model.onnx was exported from, so its attributions explain the served
answers (which the route takes from the served backend). An ONNX int8 version has no torch twin
of its int8 weights and answers 422 (kiln.training.explain.check_explainable). GradientSHAP draws
its
baselines from the version's reference.safetensors (tensor `sample`, raw training rows) when it
has one.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import ray
import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    WithJsonSchema,
)
from safetensors import SafetensorError
from safetensors.numpy import load as load_numpy_safetensors

from kiln.actors.catalog import VersionRecord
from kiln.actors.registry import artifact_path, read_verified_files
from kiln.actors.replica import ModelReplica
from kiln.actors.storage import ArtifactStore
from kiln.serving.errors import RETRY_AFTER_S, actor_failure
from kiln.serving.schemas import INSTANCES_SCHEMA, RequestError
from kiln.training.artifacts import model_from_files, sha256_hex
from kiln.training.drift import REFERENCE_FILE
from kiln.training.errors import CorruptArtifactError, KilnError
from kiln.training.explain import (
    DEFAULT_STEPS,
    METHODS,
    ExplainConfig,
    Explanation,
    FeatureSpace,
    check_explainable,
    explain_rows,
)
from kiln.training.models import KilnModel

logger = logging.getLogger(__name__)

MAX_EXPLAIN_INSTANCES = 64
MAX_EXPLAIN_STEPS = 200
MAX_WAITING = 8
EXPLAIN_IN_ENV = "KILN_EXPLAIN_IN"
"""`thread` makes Serve replicas explain on a worker thread of their own process instead of an
ExplainWorker (for benchmarks/explain_overhead.py's comparison; set before Ray starts)."""
MAX_WORKER_VERSIONS = 4
"""Versions an ExplainWorker keeps loaded (the served ones, in practice)."""
"""Explanations queued behind the running one before a caller is told to retry (429)."""
REFERENCE_TENSOR = "sample"

Method = Literal["integrated_gradients", "feature_ablation", "gradient_shap"]
assert set(Method.__args__) == set(METHODS)  # type: ignore[attr-defined]


class ExplainRequest(BaseModel):
    """KServe V1 `:explain`: the instances as `:predict` takes them, and how to explain them."""

    model_config = ConfigDict(extra="forbid")

    instances: Annotated[list[Any], WithJsonSchema(INSTANCES_SCHEMA)]
    method: Method = "integrated_gradients"
    target: StrictBool | StrictInt | StrictStr | None = Field(
        None,
        description="The class to explain, as the model predicts it; default: the "
        "predicted class of each instance. Regressors take none.",
    )
    n_steps: int = Field(
        DEFAULT_STEPS,
        ge=1,
        le=MAX_EXPLAIN_STEPS,
        description="Integrated gradients' steps; GradientSHAP's baseline draws.",
    )


class ExplanationBody(BaseModel):
    attributions: list[float] = Field(description="One per input, in `inputs` order.")
    feature_attributions: list[float] | None = Field(
        None,
        description="One per encoded feature (`features`: each category slot, each missing "
        "indicator), for a model whose inputs span several; they sum to `attributions`.",
    )
    method: Method
    baseline: str
    target: Any = Field(None, description="The class explained (null for a regressor).")
    convergence_delta: float | None = Field(
        None,
        description="Σ attributions − (f(x) − f(baseline)): integrated gradients' error; "
        "GradientSHAP's mean over its draws; null for feature ablation.",
    )


class ExplainResponse(BaseModel):
    predictions: list[Any]
    explanations: list[ExplanationBody]
    inputs: list[str] = Field(description="What each attribution is of.")
    features: list[str] | None = None
    model: str
    model_version: int


@dataclass(frozen=True)
class ExplainedVersion:
    """What one version is explained with: a CPU torch model, its spec, its training sample."""

    model: KilnModel
    spec: dict[str, Any]
    reference: np.ndarray | None
    """(S, num_inputs) raw training rows from reference.safetensors; None without the file."""


def reference_sample(data: bytes) -> np.ndarray:
    """The `sample` tensor (S, num_inputs) float32 of a reference.safetensors file."""
    try:
        tensors = load_numpy_safetensors(data)
    except SafetensorError as exc:
        raise CorruptArtifactError(f"{REFERENCE_FILE} could not be read: {exc}") from exc
    if REFERENCE_TENSOR not in tensors:
        raise CorruptArtifactError(f"{REFERENCE_FILE} holds no {REFERENCE_TENSOR!r} tensor")
    return np.asarray(tensors[REFERENCE_TENSOR], dtype=np.float32)


def read_reference(storage_uri: str, record: VersionRecord) -> np.ndarray | None:
    """The version's training sample, checked against its catalog sha256; None without one."""
    expected = record.artifacts.get(REFERENCE_FILE)
    if expected is None:
        return None
    data = ArtifactStore(storage_uri).read(
        artifact_path(record.name, record.version, REFERENCE_FILE)
    )
    if sha256_hex(data) != expected:
        raise CorruptArtifactError(
            f"artifact {REFERENCE_FILE} of {record.ref} failed its checksum; it was changed "
            "after registration"
        )
    return reference_sample(data)


def explained_from_files(files: dict[str, bytes]) -> ExplainedVersion:
    """A version's verified files (kiln.actors.registry.read_verified_files) as an
    ExplainedVersion."""
    model, spec = model_from_files(files)
    sample = reference_sample(files[REFERENCE_FILE]) if REFERENCE_FILE in files else None
    return ExplainedVersion(without_grad(model), spec, sample)


def load_explained(storage_uri: str, record: VersionRecord) -> ExplainedVersion:
    """The torch model rebuilt from a version's files (any backend), as `kiln explain` uses."""
    return explained_from_files(read_verified_files(storage_uri, record))


def without_grad(model: KilnModel) -> KilnModel:
    """Attributions need gradients of the inputs only: the weights need none."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.cpu().eval()


def explained_replica(replica: ModelReplica, storage_uri: str | None) -> ExplainedVersion:
    """The ExplainedVersion of a served version (module docstring)."""
    record = replica.record
    check_explainable(replica.spec, "feature_ablation")  # ONNX int8: nothing to explain with
    if replica.model is not None:
        model = without_grad(copy.deepcopy(replica.model))
        reference = read_reference(storage_uri, record) if storage_uri else None
        return ExplainedVersion(model, replica.spec, reference)
    if storage_uri is None:
        raise RequestError(
            422,
            f"{record.ref} is served by ONNX Runtime and this replica has no registry to "
            "rebuild its torch model from; serve it with --backend torch to explain it",
        )
    return load_explained(storage_uri, record)


class Explainers:
    """A replica's explanations, at most one computing at a time; past `max_waiting` queued
    behind it a caller gets 429. Where they compute is the subclass's (module docstring)."""

    def __init__(self, max_waiting: int = MAX_WAITING) -> None:
        self.max_waiting = max_waiting
        self.pending = 0

    async def explain(
        self,
        key: str,
        replica: ModelReplica,
        x: np.ndarray,
        outputs: np.ndarray,
        config: ExplainConfig,
    ) -> list[Explanation]:
        """Explanations of x (N, num_inputs) for the served version `key`."""
        if self.pending > self.max_waiting:
            raise RequestError(
                429, f"{self.pending} explanations are queued on this replica; retry shortly"
            )
        self.pending += 1
        try:
            explanations = await self.run(key, replica, x, outputs, config)
        finally:
            self.pending -= 1
        check_finite(explanations)
        return explanations

    async def run(
        self,
        key: str,
        replica: ModelReplica,
        x: np.ndarray,
        outputs: np.ndarray,
        config: ExplainConfig,
    ) -> list[Explanation]:
        raise NotImplementedError

    def forget_except(self, keys: set[str]) -> None:
        """Drop the explained models of versions no longer served."""


class ThreadExplainers(Explainers):
    """Explanations on one worker thread of the replica's own process."""

    def __init__(self, storage_uri: Callable[[], str | None], max_waiting: int = MAX_WAITING):
        super().__init__(max_waiting)
        self.storage_uri = storage_uri
        """Where the versions' files are (called on the worker thread; None: nowhere)."""
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-explain")
        self.versions: dict[str, ExplainedVersion] = {}

    async def run(
        self,
        key: str,
        replica: ModelReplica,
        x: np.ndarray,
        outputs: np.ndarray,
        config: ExplainConfig,
    ) -> list[Explanation]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor, self._explain, key, replica, x, outputs, config
        )

    def _explain(
        self,
        key: str,
        replica: ModelReplica,
        x: np.ndarray,
        outputs: np.ndarray,
        config: ExplainConfig,
    ) -> list[Explanation]:
        with as_request_errors():
            version = self.versions.get(key)
            if version is None:
                version = explained_replica(replica, self.storage_uri())
                self.versions[key] = version
            return explain_rows(version.model, version.spec, x, config, version.reference, outputs)

    def forget_except(self, keys: set[str]) -> None:
        for key in list(self.versions):
            if key not in keys:
                del self.versions[key]


@contextmanager
def as_request_errors() -> Iterator[None]:
    """A KilnError (a request the version cannot answer) as a 422; a corrupt artifact stays a
    server error (the store's fault, not the caller's: logged as a 500)."""
    try:
        yield
    except CorruptArtifactError:
        raise
    except KilnError as exc:
        raise RequestError(422, str(exc)) from exc


class ExplainWorker:
    """A Ray actor that explains for one replica, in a process of its own (`WorkerExplainers`).

    It rebuilds each version's torch model from the version's verified files, whatever the
    replica's backend, and keeps the last few.
    """

    def __init__(self, storage_uri: str, num_threads: int = 1) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.storage_uri = storage_uri
        self.versions: OrderedDict[str, ExplainedVersion] = OrderedDict()

    def explain(
        self,
        record: VersionRecord,
        x: np.ndarray,
        outputs: np.ndarray,
        config: ExplainConfig,
    ) -> list[Explanation]:
        version = self.versions.pop(record.ref, None)
        if version is None:
            check_explainable(record.spec, "feature_ablation")  # ONNX int8: before any load
            version = load_explained(self.storage_uri, record)
        self.versions[record.ref] = version
        while len(self.versions) > MAX_WORKER_VERSIONS:
            self.versions.popitem(last=False)
        return explain_rows(version.model, version.spec, x, config, version.reference, outputs)


class WorkerExplainers(Explainers):
    """Explanations in an `ExplainWorker` actor started by the replica on its first explain.

    A process of its own shares only the cores with the replica, not its GIL (module docstring).
    """

    def __init__(
        self, storage_uri: Callable[[], Awaitable[str]], num_threads: int, max_waiting: int
    ) -> None:
        super().__init__(max_waiting)
        self.storage_uri = storage_uri
        self.num_threads = num_threads
        self.worker: Any = None
        self.starting = asyncio.Lock()

    async def run(
        self,
        key: str,
        replica: ModelReplica,
        x: np.ndarray,
        outputs: np.ndarray,
        config: ExplainConfig,
    ) -> list[Explanation]:
        async with self.starting:  # two first requests start one worker
            if self.worker is None:
                actor = ray.remote(num_cpus=0, max_restarts=1)(ExplainWorker)
                self.worker = actor.remote(await self.storage_uri(), self.num_threads)
        with as_request_errors():
            try:
                return await self.worker.explain.remote(replica.record, x, outputs, config)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, BaseException) else None
                if isinstance(cause, KilnError):
                    raise cause from None
                raise
            except ray.exceptions.RayActorError as exc:  # it died (memory?)
                logger.error("the explain worker failed: %s", exc)
                if isinstance(exc, ray.exceptions.ActorDiedError):
                    self.worker = None  # its restarts are spent: the next request starts one
                raise RequestError(
                    503,
                    "the explainer is restarting; send the same request again in a few seconds",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                ) from exc


def check_finite(explanations: list[Explanation]) -> None:
    """422 for an instance whose numbers overflow (values far outside the training range)."""
    for i, e in enumerate(explanations):
        numbers = [*e.attributions, *(e.feature_attributions or [])]
        if e.convergence_delta is not None:
            numbers.append(e.convergence_delta)
        if not np.isfinite(numbers).all():
            raise RequestError(
                422,
                f"instance {i}: its attributions overflow (not finite); its values are far "
                "outside what the model was trained on",
            )


_BY_HOST: weakref.WeakKeyDictionary[Any, Explainers] = weakref.WeakKeyDictionary()


def explainers_for(host: Any) -> Explainers:
    """The Explainers of a ModelHost, made on first use: an ExplainWorker actor when the host
    has a registry (a Serve replica), else a worker thread (routes served without Ray)."""
    found = _BY_HOST.get(host)
    if found is None:
        if host.registry is None or os.environ.get(EXPLAIN_IN_ENV) == "thread":
            found = ThreadExplainers(lambda: None)
        else:
            registry = host.registry

            async def storage_uri() -> str:
                try:
                    return str(await registry.get_storage_uri.remote())
                except ray.exceptions.RayError as exc:
                    raise actor_failure(exc, "the model registry") from exc

            threads = max(1, int(host.args.num_cpus))
            found = WorkerExplainers(storage_uri, threads, MAX_WAITING)
        _BY_HOST[host] = found
    found.forget_except(set(host.served.replicas))
    return found


def explain_response(
    replica: ModelReplica, predictions: list[Any], explanations: list[Explanation]
) -> ExplainResponse:
    space = FeatureSpace.from_spec(replica.spec)
    return ExplainResponse(
        predictions=predictions,
        explanations=[ExplanationBody(**e.to_dict()) for e in explanations],
        inputs=space.input_names,
        features=space.feature_names if space.grouped else None,
        model=replica.record.name,
        model_version=replica.record.version,
    )
