"""What the Python client's HTTP calls return, and how a call's input becomes request bodies.

Pure code, no I/O: `Kiln` and `AsyncKiln` (cluster/http_client.py) share it, and it is
tested without a server. Results are frozen dataclasses built from the served app's JSON
(docs/http-api.md). A pandas DataFrame or a pyarrow Table given to `predict` comes back as
the same kind, one row per input row (the DataFrame keeps its index); rows or objects come
back as `Predictions`. pandas is imported only when a DataFrame is given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import BadRequestError

__all__ = [
    "Completion",
    "Explanation",
    "Explanations",
    "FeedbackResult",
    "MetricsReport",
    "Prediction",
    "Predictions",
]

PREDICT_BATCH_ROWS = 1024
"""Rows per :predict request when a call holds more (the server takes at most 4096)."""
EXPLAIN_BATCH_ROWS = 64
"""Rows per :explain request: the server explains at most 64 per request."""


@dataclass(frozen=True)
class Prediction:
    """One row's answer."""

    id: str
    """The prediction's id: send it back with `feedback()` once the true label is known."""
    prediction: Any
    probabilities: list[float] | None = None


@dataclass(frozen=True)
class Predictions(Sequence[Prediction]):
    """A served model's answers, one per input row, in input order."""

    model: str
    model_version: int
    predictions: list[Any]
    ids: list[str]
    probabilities: list[list[float]] | None = None

    def __len__(self) -> int:
        return len(self.predictions)

    def __getitem__(self, index: int) -> Prediction:  # type: ignore[override]
        probabilities = self.probabilities[index] if self.probabilities is not None else None
        return Prediction(self.ids[index], self.predictions[index], probabilities)

    def __iter__(self) -> Iterator[Prediction]:
        return (self[i] for i in range(len(self)))


@dataclass(frozen=True)
class Explanation:
    """One row's prediction and each input's share in it (Captum's attributions)."""

    prediction: Any
    attributions: dict[str, float]
    """Input name -> attribution, in the model's input order."""
    method: str
    baseline: str
    target: Any = None
    convergence_delta: float | None = None


@dataclass(frozen=True)
class Explanations(Sequence[Explanation]):
    model: str
    model_version: int
    inputs: list[str]
    explanations: list[Explanation]

    def __len__(self) -> int:
        return len(self.explanations)

    def __getitem__(self, index: int) -> Explanation:  # type: ignore[override]
        return self.explanations[index]

    def __iter__(self) -> Iterator[Explanation]:
        return iter(self.explanations)

    def to_pandas(self) -> Any:
        """A DataFrame: one row per input row, one column per input, and `prediction`."""
        import pandas as pd

        frame = pd.DataFrame([e.attributions for e in self.explanations], columns=self.inputs)
        frame.insert(0, "prediction", [e.prediction for e in self.explanations])
        return frame


@dataclass(frozen=True)
class FeedbackResult:
    accepted: int
    """Labels stored."""
    unknown_ids: list[str]
    """Ids the prediction log does not hold (never served, not sampled, too old, or logged
    under a second ago by another replica: send those again)."""
    unchecked_ids: list[str] = field(default_factory=list)
    """Ids kept without a check: the store's index of logged ids reached its bound
    (KILN_FEEDBACK_INDEX_IDS) and left its oldest days out."""


@dataclass(frozen=True)
class MetricsReport:
    """`GET /v1/models/NAME/metrics`: per served version over the window (tabular), or the
    replica's generation numbers (a language model, `kind == "lm"`)."""

    model: str
    kind: str
    """"tabular" or "lm"."""
    versions: list[dict[str, Any]]
    """Tabular: per version, traffic, latency, quality from feedback, drift, cost."""
    raw: dict[str, Any] = field(repr=False)
    """The whole answer, as docs/monitoring.md describes it."""

    def version(self, number: int) -> dict[str, Any]:
        for entry in self.versions:
            if entry.get("version") == number:
                return entry
        raise KeyError(f"no traffic logged for version {number} in this window")


@dataclass(frozen=True)
class Completion:
    """`POST /v1/completions`: the generated text (the first choice's), and the rest."""

    text: str
    texts: list[str]
    """Every choice's text (`n` of them)."""
    finish_reason: str | None
    usage: dict[str, int]
    model: str
    raw: dict[str, Any] = field(repr=False)


# ---------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Rows:
    """A call's input as JSON-ready instances, and what kind of result it asks for."""

    instances: list[Any]
    kind: str
    """"list" (rows or objects), "pandas" or "arrow"."""
    index: Any = None
    """A DataFrame's index, kept for the answer."""


def as_rows(data: Any, by_name: bool | None = None) -> Rows:
    """Rows of values or objects by input name, from a list, numpy array, DataFrame or Table.

    A table's columns go by name (each an input of the model) when they are strings, and as
    rows in column order otherwise (a DataFrame made from a numpy array); `by_name` forces
    either. A NaN or null is a missing value (null on the wire).
    """
    module = type(data).__module__.split(".")[0]
    if module == "pandas" and hasattr(data, "columns"):
        named = all(isinstance(c, str) for c in data.columns) if by_name is None else by_name
        frame = data.astype(object).where(data.notna(), None)
        values = frame.to_dict("records") if named else frame.to_numpy().tolist()
        return Rows(clean(values), "pandas", data.index)
    if module == "pyarrow" and hasattr(data, "column_names"):
        if by_name is False:
            columns = [data.column(i).to_pylist() for i in range(data.num_columns)]
            return Rows(clean([list(r) for r in zip(*columns, strict=True)]), "arrow")
        return Rows(clean(data.to_pylist()), "arrow")
    if hasattr(data, "tolist") and hasattr(data, "ndim"):  # a numpy array
        if data.ndim != 2:
            raise BadRequestError(
                f"got an array of shape {tuple(data.shape)}; send 2 dimensions, (rows, inputs)"
            )
        return Rows(clean(data.tolist()), "list")
    if isinstance(data, dict):
        raise BadRequestError(
            "got one object; send a list of rows or objects ([{...}]), a DataFrame or a Table"
        )
    if not isinstance(data, list | tuple):
        raise BadRequestError(
            f"got {type(data).__name__}; send a list of rows or objects, a numpy array, "
            "a pandas DataFrame or a pyarrow Table"
        )
    return Rows(clean(list(data)), "list")


def clean(value: Any) -> Any:
    """JSON-ready values: NaN becomes null (missing); numpy scalars become Python's."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if hasattr(value, "item") and type(value).__module__ == "numpy":
        return clean(value.item())
    return value


def json_body(body: dict[str, Any]) -> bytes:
    """The request's JSON; an infinite number (JSON has none) is refused here, by row."""
    try:
        return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()
    except ValueError as exc:
        raise BadRequestError(
            f"{exc}: the input holds an infinite number; send finite numbers, or null for "
            "a missing value"
        ) from exc
    except TypeError as exc:
        raise BadRequestError(f"the input cannot be sent as JSON: {exc}") from exc


def batches(instances: list[Any], size: int) -> list[list[Any]]:
    if not instances:
        return [instances]  # the server answers what an empty request gets (a 422)
    return [instances[i : i + size] for i in range(0, len(instances), size)]


# ---------------------------------------------------------------------------------- answers


def merge_predictions(answers: list[dict[str, Any]]) -> Predictions:
    """One `Predictions` from the answers of a call's :predict requests, in order."""
    first = answers[0]
    probabilities: list[list[float]] | None = None
    if all("probabilities" in a for a in answers):
        probabilities = [p for a in answers for p in a["probabilities"]]
    return Predictions(
        model=str(first["model"]),
        model_version=int(first["model_version"]),
        predictions=[p for a in answers for p in a["predictions"]],
        ids=[i for a in answers for i in a["ids"]],
        probabilities=probabilities,
    )


def shaped_predictions(found: Predictions, rows: Rows) -> Any:
    """The answer as the input's kind: `Predictions`, or a DataFrame / Table with columns
    `prediction`, `id`, `model_version` (and `probabilities`, a list per row, when asked)."""
    if rows.kind == "list":
        return found
    columns: dict[str, Any] = {
        "prediction": found.predictions,
        "id": found.ids,
        "model_version": [found.model_version] * len(found),
    }
    if found.probabilities is not None:
        columns["probabilities"] = found.probabilities
    if rows.kind == "pandas":
        import pandas as pd

        return pd.DataFrame(columns, index=rows.index)
    import pyarrow as pa

    return pa.table(columns)


def merge_explanations(answers: list[dict[str, Any]]) -> Explanations:
    first = answers[0]
    inputs = [str(i) for i in first["inputs"]]
    found = []
    for answer in answers:
        for prediction, body in zip(answer["predictions"], answer["explanations"], strict=True):
            found.append(
                Explanation(
                    prediction=prediction,
                    attributions=dict(zip(inputs, body["attributions"], strict=True)),
                    method=body["method"],
                    baseline=body["baseline"],
                    target=body.get("target"),
                    convergence_delta=body.get("convergence_delta"),
                )
            )
    return Explanations(
        model=str(first["model"]),
        model_version=int(first["model_version"]),
        inputs=inputs,
        explanations=found,
    )


def metrics_report(name: str, answer: dict[str, Any]) -> MetricsReport:
    return MetricsReport(
        model=str(answer.get("model", name)),
        kind=str(answer.get("kind", "tabular")),
        versions=list(answer.get("versions", [])),
        raw=answer,
    )


def completion(answer: dict[str, Any]) -> Completion:
    choices = answer.get("choices") or [{}]
    return Completion(
        text=str(choices[0].get("text", "")),
        texts=[str(c.get("text", "")) for c in choices],
        finish_reason=choices[0].get("finish_reason"),
        usage=dict(answer.get("usage") or {}),
        model=str(answer.get("model", "")),
        raw=answer,
    )


def ids_of(ids: Any) -> list[str]:
    """Prediction ids from a list, a `Predictions`, a DataFrame (its `id` column) or a
    Series / array of them."""
    if isinstance(ids, Predictions):
        return list(ids.ids)
    if hasattr(ids, "column_names"):  # the Table predict returned
        ids = ids.column("id")
    elif hasattr(ids, "columns") and "id" in list(ids.columns):  # the DataFrame
        ids = ids["id"]
    if hasattr(ids, "to_pylist"):
        return [str(i) for i in ids.to_pylist()]
    if hasattr(ids, "tolist"):
        return [str(i) for i in ids.tolist()]
    if isinstance(ids, str):
        raise BadRequestError("ids is one string; send a list of prediction ids")
    return [str(i) for i in ids]


def labels_of(labels: Any) -> list[Any]:
    if hasattr(labels, "to_pylist"):
        return clean(labels.to_pylist())  # type: ignore[no-any-return]
    if hasattr(labels, "tolist"):
        return clean(labels.tolist())  # type: ignore[no-any-return]
    return clean(list(labels))  # type: ignore[no-any-return]
