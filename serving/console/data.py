"""Where the console's pages get their data, and who may see it.

A `Console` holds the registry actor and the key checker of the process that serves the pages:
a KilnServer replica (serving/app.py) or `kiln ui` on the embedded default (cluster/cli/ui.py).
Catalog reads go to the registry; monitoring reports, sweep summaries and drift references are
read straight from the artifact storage, as `kiln monitor` reads them, so `kiln ui` shows the
same pages without a model deployed. Storage reads and explanations run on a worker thread,
never on the event loop that serves predictions.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from fastapi import HTTPException

from kiln.actors.catalog import VersionRecord
from kiln.actors.keys import KeyCheck
from kiln.actors.monitor import build_report, time_series
from kiln.actors.sweeps import list_sweeps, read_sweep
from kiln.serving.auth import BearerAuth
from kiln.serving.errors import actor_failure
from kiln.serving.explain import ExplainedVersion, check_finite, load_explained, read_reference
from kiln.serving.schemas import RequestError
from kiln.serving.variants import compare_rows
from kiln.training.errors import KilnError, NotFoundError
from kiln.training.evaluate import outputs_to_predictions, predict_outputs
from kiln.training.explain import ExplainConfig, Explanation, explain_rows

logger = logging.getLogger(__name__)

MAX_SAMPLE_ROWS = 20
"""Rows of the version's stored training sample the explain page offers to pick from."""
MAX_EXPLAINED_VERSIONS = 4
"""Explained models kept loaded by the console (each is a CPU copy of a model)."""

ServedExplain = Callable[
    [VersionRecord, np.ndarray, ExplainConfig],
    Awaitable[tuple[list[Any], list[Explanation]] | None],
]
"""Explains with the replica's own explainers when it serves that exact version (None: not
served here); serving/app.py gives one, `kiln ui` none."""


@dataclass(frozen=True)
class Viewer:
    """Whose key asks: None when auth is off (everything is visible)."""

    check: KeyCheck | None

    def sees(self, model: str) -> bool:
        return self.check is None or self.check.allows("predict", model)


def registry_failure(exc: BaseException) -> HTTPException:
    """A registry error as the console answers it: 404 for a missing model or version."""
    cause = getattr(exc, "cause", None) or exc  # Ray wraps an actor's error; keep its text
    if isinstance(cause, NotFoundError):
        return HTTPException(404, str(cause))
    if isinstance(cause, KilnError):
        return HTTPException(422, str(cause))
    raise exc


class Console:
    """The reads behind every console page."""

    def __init__(
        self,
        registry: Any,
        auth: BearerAuth | None,
        served_explain: ServedExplain | None = None,
    ) -> None:
        self.registry = registry
        self.auth = auth
        self.served_explain = served_explain
        self._storage_uri: str | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-console")
        self.explained: OrderedDict[str, ExplainedVersion] = OrderedDict()

    # ------------------------------------------------------------------ access

    async def viewer(self, secret: str | None) -> Viewer:
        """The caller's key (401 without a live one); everyone when auth is off."""
        if self.auth is None:
            return Viewer(None)
        return Viewer(await self.auth.authenticate(secret))

    async def viewer_of(self, secret: str | None, model: str) -> Viewer:
        """The caller's key if it may see `model` (predict:<model>, predict:* or admin), else
        401/403 as the API answers them."""
        if self.auth is None:
            return Viewer(None)
        return Viewer(await self.auth.authorize(secret, "predict", model))

    # ------------------------------------------------------------------ reads

    async def call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.registry, method).remote(*args)
        except (NotFoundError, KilnError) as exc:
            raise registry_failure(exc) from exc
        except ray.exceptions.RayError as exc:
            raise actor_failure(exc, "the model registry") from exc

    async def storage_uri(self) -> str:
        if self._storage_uri is None:
            self._storage_uri = str(await self.call("get_storage_uri"))
        return self._storage_uri

    async def in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def models(self) -> list[dict[str, Any]]:
        return list(await self.call("list_models"))

    async def versions(self, name: str) -> list[VersionRecord]:
        return list(await self.call("list_versions", name))

    async def aliases(self, name: str) -> dict[str, int]:
        return dict(await self.call("aliases", name))

    async def version(self, name: str, version: int) -> VersionRecord:
        return await self.call("resolve", f"{name}@{version}")  # type: ignore[no-any-return]

    async def profiles(self, name: str, version: int | None = None) -> list[dict[str, Any]]:
        return list(await self.call("profiles", name, version))

    async def variants(self, name: str) -> list[dict[str, Any]]:
        """serving/variants.py's rows for every active version of the model."""
        records, aliases = await self.versions(name), await self.aliases(name)
        versions = [
            {**r.to_dict(), "aliases": sorted(a for a, v in aliases.items() if v == r.version)}
            for r in records
        ]
        profiles = await self.profiles(name)
        storage_uri = await self.storage_uri()
        return await self.in_thread(compare_rows, versions, profiles, storage_uri)  # type: ignore[no-any-return]

    async def monitoring(
        self, name: str, window_s: float
    ) -> tuple[dict[str, Any], dict[int, dict[str, list]]]:
        records = {r.version: r for r in await self.versions(name)}
        storage_uri = await self.storage_uri()

        def read() -> tuple[dict[str, Any], dict[int, dict[str, list]]]:
            return (
                build_report(storage_uri, name, records, window_s),
                time_series(storage_uri, name, records, window_s),
            )

        return await self.in_thread(read)  # type: ignore[no-any-return]

    async def sweeps(self) -> list[dict[str, Any]]:
        return await self.in_thread(list_sweeps, await self.storage_uri())  # type: ignore[no-any-return]

    async def sweep(self, sweep_id: str) -> dict[str, Any]:
        try:
            return await self.in_thread(read_sweep, await self.storage_uri(), sweep_id)  # type: ignore[no-any-return]
        except NotFoundError as exc:
            raise HTTPException(404, str(exc)) from exc
        except KilnError as exc:
            raise HTTPException(422, str(exc)) from exc

    async def sample_rows(self, record: VersionRecord) -> list[list[float]]:
        """The first rows of the version's stored training sample (reference.safetensors)."""
        sample = await self.in_thread(read_reference, await self.storage_uri(), record)
        if sample is None:
            return []
        return [[float(v) for v in row] for row in sample[:MAX_SAMPLE_ROWS]]

    # ------------------------------------------------------------------ explanations

    async def explain(
        self, record: VersionRecord, x: np.ndarray, config: ExplainConfig
    ) -> tuple[list[Any], list[Explanation]]:
        """Predictions and attributions for raw rows x (N, num_inputs): by the replica's
        explainers when it serves this version, else on the console's worker thread."""
        if self.served_explain is not None:
            found = await self.served_explain(record, x, config)
            if found is not None:
                return found
        storage_uri = await self.storage_uri()
        return await self.in_thread(self._explain_here, storage_uri, record, x, config)  # type: ignore[no-any-return]

    def _explain_here(
        self, storage_uri: str, record: VersionRecord, x: np.ndarray, config: ExplainConfig
    ) -> tuple[list[Any], list[Explanation]]:
        version = self.explained.get(record.ref)
        if version is None:
            version = load_explained(storage_uri, record)
            self.explained[record.ref] = version
            while len(self.explained) > MAX_EXPLAINED_VERSIONS:
                self.explained.popitem(last=False)
        self.explained.move_to_end(record.ref)
        outputs = predict_outputs(version.model, x, "cpu")
        if not np.isfinite(outputs).all():
            raise RequestError(
                422,
                "the row's outputs overflow (not finite): its values are far outside what "
                "the model was trained on",
            )
        found = outputs_to_predictions(outputs, version.spec).tolist()
        if version.spec["task"] == "classification":
            found = [version.spec["classes"][i] for i in found]
        explanations = explain_rows(
            version.model, version.spec, x, config, version.reference, outputs
        )
        check_finite(explanations)
        return found, explanations


def served_explainer(host: Any) -> ServedExplain:
    """Explanations of a version this replica serves, by the same explainers as `:explain`
    (serving/explain.py: off the replica's event loop); None for a version not served here."""
    from kiln.serving.explain import explainers_for

    async def explain(
        record: VersionRecord, x: np.ndarray, config: ExplainConfig
    ) -> tuple[list[Any], list[Explanation]] | None:
        for key, replica in host.served.replicas.items():
            if replica.record.ref == record.ref:
                outputs = await host.forward(key, x)
                explanations = await explainers_for(host).explain(key, replica, x, outputs, config)
                return replica.format(outputs)["predictions"], explanations
        return None

    return explain
