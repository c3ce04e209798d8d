"""Table columns as model inputs: raw values, the model's input row, and encoded features.

A Kiln model trained on a table takes one *raw input* per input column, in table order: a
numeric column's value (NaN when missing) or a categorical column's slot. `Encoding` turns raw
inputs into the features the network sees: numeric values with a missing one replaced by the
training mean, a missing-indicator beside each numeric column that had missing values in
training, and for each categorical column a one-hot block over [its categories (sorted),
other, missing]. `other` takes rare categories (fewer rows than --min-category-count) and
categories never seen in training; `missing` takes nulls and empty strings. The one-hot blocks
are complete (no reference category dropped): the intercept is not penalised and λ > 0 makes
the fit unique, and an unseen category then contributes nothing, the average of the known ones.

Categories are compared as canonical strings (`canonical`): "lima", "true"/"false" for
booleans, "3" for the integer 3, so a value reads the same from Parquet, CSV or JSON.

numpy only: the ShardStore actors (exact and L-BFGS solvers) and serving's request parsing
import it. Its torch twin is `kiln.training.models.Encode`; both place columns with the same index
arrays (`Encoding.layout`).
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

NUMERIC, CATEGORICAL = "numeric", "categorical"
FLOAT32_MAX = float(np.finfo(np.float32).max)
OTHER, MISSING = "(other)", "(missing)"


class BadInput(ValueError):
    """A request value that does not fit the model's inputs (serving answers 422)."""


def canonical(value: Any) -> str | None:
    """The category key of a value: None for missing (None, NaN, empty string)."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if isinstance(value, str):
        return value or None
    raise BadInput(f"{type(value).__name__} is not a category value")


@dataclass(frozen=True)
class InputColumn:
    """One input column of a model, as its spec records it."""

    name: str
    kind: str
    """numeric or categorical."""
    type: str
    """The column's type in the training table (int64, double, string, bool, ...)."""
    impute: float = 0.0
    """Numeric: the training mean of the present values, which a missing value becomes."""
    indicator: bool = False
    """Numeric: the column had missing values in training, so a 0/1 column marks them."""
    categories: tuple[str, ...] = ()
    """Categorical: the kept categories, sorted (canonical strings)."""
    counts: tuple[int, ...] = ()
    """Categorical: training rows of each kept category."""
    other_count: int = 0
    """Categorical: training rows whose category was rarer than --min-category-count."""
    missing_count: int = 0
    """Training rows where this column was missing."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> InputColumn:
        return cls(
            **{
                **raw,
                "categories": tuple(raw.get("categories", ())),
                "counts": tuple(raw.get("counts", ())),
            }
        )

    def to_dict(self) -> dict[str, Any]:
        found = asdict(self)
        drop: tuple[str, ...] = ("impute",)
        if self.kind == NUMERIC:
            drop = ("categories", "counts", "other_count")
        drop += ("indicator",) if self.kind == CATEGORICAL else ()
        return {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in found.items() if k not in drop
        }

    @property
    def width(self) -> int:
        """Encoded features this input becomes."""
        if self.kind == NUMERIC:
            return 2 if self.indicator else 1
        return len(self.categories) + 2

    @cached_property
    def _slot_of(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.categories)}

    @property
    def other_slot(self) -> int:
        return len(self.categories)

    @property
    def missing_slot(self) -> int:
        return len(self.categories) + 1

    def slot(self, key: str | None) -> int:
        """The one-hot slot of a canonical category key."""
        if key is None:
            return self.missing_slot
        return self._slot_of.get(key, self.other_slot)

    def feature_names(self) -> list[str]:
        if self.kind == NUMERIC:
            return [self.name, f"{self.name}_missing"] if self.indicator else [self.name]
        return [f"{self.name}={c}" for c in (*self.categories, OTHER, MISSING)]

    def raw_value(self, value: Any, where: str) -> float:
        """A request value as this input's raw number; BadInput names the column and the fix."""
        if self.kind == CATEGORICAL and type(value) is str:  # the common case: one lookup
            return self._string_slots.get(value, float(self.other_slot))
        if self.kind == NUMERIC:
            if value is None:
                return math.nan
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BadInput(f'{where}: "{self.name}" takes a number; got {reprlib.repr(value)}')
            try:
                number = float(value)
            except OverflowError:  # an integer past float64 (10**400)
                number = math.inf
            if math.isinf(number) or abs(number) > FLOAT32_MAX:
                raise BadInput(
                    f'{where}: "{self.name}" is infinite or too large for a 32-bit float; send '
                    "a finite number within ±3.4e38 (null when missing)"
                )
            return number
        if value is not None and not self._accepts(value):
            word = self.type_word
            raise BadInput(
                f'{where}: "{self.name}" takes {"an" if word[0] in "aeiou" else "a"} {word}; '
                f"got {reprlib.repr(value)}"
            )
        return float(self.slot(canonical(value)))

    @cached_property
    def _string_slots(self) -> dict[str, float]:
        slots = {c: float(i) for i, c in enumerate(self.categories)}
        return {**slots, "": float(self.missing_slot)}

    def _accepts(self, value: Any) -> bool:
        if isinstance(value, str):
            return True
        if self.type == "bool":
            return isinstance(value, bool)
        if self.type.startswith(("int", "uint")):
            return isinstance(value, int) and not isinstance(value, bool)
        if self.type in ("float", "double", "halffloat"):
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        return False

    @property
    def type_word(self) -> str:
        """What a caller sends for this input, in words."""
        if self.kind == NUMERIC:
            return "number"
        if self.type == "bool":
            return "boolean"
        if self.type.startswith(("int", "uint")):
            return "integer (or string)"
        return "string"


@dataclass(frozen=True)
class Layout:
    """Index arrays that place raw inputs into encoded features (numpy and torch share them)."""

    numeric_raw: np.ndarray
    """Raw positions of the numeric inputs."""
    numeric_dest: np.ndarray
    """Their feature positions."""
    impute: np.ndarray
    indicator_raw: np.ndarray
    """Raw positions of numeric inputs with a missing-indicator."""
    indicator_dest: np.ndarray
    categorical_raw: np.ndarray
    categorical_offset: np.ndarray
    """Feature position of each categorical input's first slot."""
    num_features: int


@dataclass(frozen=True)
class Encoding:
    """A model's inputs, in table order, and how they become its features."""

    inputs: tuple[InputColumn, ...]

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Encoding | None:
        """The spec's encoding; None for a model trained before inputs were recorded."""
        raw = spec.get("inputs")
        return cls(tuple(InputColumn.from_dict(c) for c in raw)) if raw else None

    def to_list(self) -> list[dict[str, Any]]:
        return [c.to_dict() for c in self.inputs]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.inputs]

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_features(self) -> int:
        return sum(c.width for c in self.inputs)

    @property
    def all_numeric(self) -> bool:
        return all(c.kind == NUMERIC for c in self.inputs)

    @property
    def is_identity(self) -> bool:
        """Features are the raw inputs, once missing values are imputed."""
        return all(c.kind == NUMERIC and not c.indicator for c in self.inputs)

    @property
    def categorical(self) -> list[InputColumn]:
        return [c for c in self.inputs if c.kind == CATEGORICAL]

    @property
    def numeric(self) -> list[InputColumn]:
        return [c for c in self.inputs if c.kind == NUMERIC]

    @cached_property
    def position(self) -> dict[str, int]:
        return {c.name: i for i, c in enumerate(self.inputs)}

    def feature_names(self) -> list[str]:
        return [n for c in self.inputs for n in c.feature_names()]

    def names_preview(self, most: int = 8) -> str:
        """The input names for a message: all of them, or the first few and the last."""
        names = self.names
        if len(names) <= most:
            return ", ".join(names)
        return ", ".join(names[: most - 2]) + f", ..., {names[-1]}"

    @cached_property
    def layout(self) -> Layout:
        numeric_raw, numeric_dest, impute, indicator_raw, indicator_dest = [], [], [], [], []
        categorical_raw, categorical_offset = [], []
        dest = 0
        for raw, column in enumerate(self.inputs):
            if column.kind == NUMERIC:
                numeric_raw.append(raw)
                numeric_dest.append(dest)
                impute.append(column.impute)
                if column.indicator:
                    indicator_raw.append(raw)
                    indicator_dest.append(dest + 1)
            else:
                categorical_raw.append(raw)
                categorical_offset.append(dest)
            dest += column.width

        def ints(values: list[int]) -> np.ndarray:
            return np.asarray(values, dtype=np.int64)

        return Layout(
            ints(numeric_raw),
            ints(numeric_dest),
            np.asarray(impute, dtype=np.float32),
            ints(indicator_raw),
            ints(indicator_dest),
            ints(categorical_raw),
            ints(categorical_offset),
            dest,
        )

    def expand(self, raw: np.ndarray) -> np.ndarray:
        """Encoded features (N, num_features) float32 of raw inputs (N, num_inputs)."""
        layout = self.layout
        raw = np.asarray(raw, dtype=np.float32)
        if self.is_identity:
            missing = np.isnan(raw)
            return np.where(missing, layout.impute, raw) if missing.any() else raw
        out = np.zeros((len(raw), layout.num_features), dtype=np.float32)
        numeric = raw[:, layout.numeric_raw]
        out[:, layout.numeric_dest] = np.where(np.isnan(numeric), layout.impute, numeric)
        out[:, layout.indicator_dest] = np.isnan(raw[:, layout.indicator_raw])
        if len(layout.categorical_raw):
            slots = raw[:, layout.categorical_raw].astype(np.int64) + layout.categorical_offset
            np.put_along_axis(out, slots, 1.0, axis=1)
        return out

    # ---------------------------------------------------------------- serving's requests

    def rows_to_inputs(self, instances: Sequence[Any], booleans: bool = True) -> np.ndarray:
        """Raw inputs (N, num_inputs) of V1 instances: objects by column name, or rows of
        values in input order. A missing key is a missing value; BadInput otherwise.
        `booleans` False says the request holds none (its JSON has no `true`/`false`)."""
        fast = self._numeric_rows(instances, booleans)
        if fast is not None:
            return fast
        out = np.empty((len(instances), self.num_inputs), dtype=np.float32)
        for i, instance in enumerate(instances):
            where = f"instance {i}"
            if isinstance(instance, dict):
                unknown = [k for k in instance if k not in self.position]
                if unknown:
                    raise BadInput(
                        f'{where} has unknown input "{reprlib.repr(unknown[0])[1:-1]}"; this '
                        f"model takes: {', '.join(self.names)}"
                    )
                values = [instance.get(c.name) for c in self.inputs]
            elif isinstance(instance, list):
                if len(instance) != self.num_inputs:
                    raise BadInput(
                        f"{where} has {len(instance)} values; this model takes "
                        f"{self.num_inputs} ({self.names_preview()})"
                    )
                values = instance
            else:
                raise BadInput(f"{where} must be an object of features or a list of values")
            out[i] = [c.raw_value(v, where) for c, v in zip(self.inputs, values, strict=True)]
        return out

    def _numeric_rows(self, instances: Sequence[Any], booleans: bool) -> np.ndarray | None:
        """Rows of plain numbers for an all-numeric model in one numpy conversion (the common
        case, value by value would cost a microsecond per value); None to go value by value."""
        if not self.all_numeric or not all(isinstance(row, list) for row in instances):
            return None
        try:
            array = np.asarray(instances)
        except ValueError:  # ragged rows: the slow path names the short one
            return None
        if array.dtype.kind not in "fi" or array.shape != (len(instances), self.num_inputs):
            return None  # bools, strings, nulls, objects: value by value, which names them
        if booleans and any(type(v) is bool for row in instances for v in row):
            return None  # numpy reads True as 1: value by value refuses it
        out = array.astype(np.float32)
        if np.isinf(out).any():
            bad = int(np.argwhere(np.isinf(out))[0][0])
            raise BadInput(
                f"instance {bad} holds a number that is infinite or too large for a 32-bit "
                "float; send finite numbers within ±3.4e38 (null when missing)"
            )
        return out

    def column_inputs(self, columns: dict[str, Sequence[Any]], num_rows: int) -> np.ndarray:
        """Raw inputs of V2's per-feature tensors (already decoded to Python values); an
        input not sent is missing in every row."""
        out = np.empty((num_rows, self.num_inputs), dtype=np.float32)
        for j, column in enumerate(self.inputs):
            values = columns.get(column.name)
            if values is None:
                out[:, j] = math.nan if column.kind == NUMERIC else column.missing_slot
                continue
            out[:, j] = [column.raw_value(v, f"row {i}") for i, v in enumerate(values)]
        return out

    def dictionary_slots(self, position: int, dictionary: Sequence[str | None]) -> np.ndarray:
        """Slots of a stored dictionary's entries (canonical strings) for input `position`."""
        column = self.inputs[position]
        return np.asarray([column.slot(key) for key in dictionary], dtype=np.int64)


@dataclass
class CategoryCounts:
    """Rows per canonical category of one categorical column, and rows where it was missing."""

    counts: dict[str, int] = field(default_factory=dict)
    missing: int = 0

    def merge(self, other: CategoryCounts) -> CategoryCounts:
        merged = dict(self.counts)
        for key, count in other.counts.items():
            merged[key] = merged.get(key, 0) + count
        return CategoryCounts(merged, self.missing + other.missing)

    def kept(self, min_count: int) -> tuple[tuple[str, ...], tuple[int, ...], int]:
        """(categories with at least min_count rows, sorted; their counts; rows left to other)."""
        keep = sorted(k for k, n in self.counts.items() if n >= min_count)
        other = sum(n for k, n in self.counts.items() if n < min_count)
        return tuple(keep), tuple(self.counts[k] for k in keep), other


def feature_scaling(
    encoding: Encoding, rows: int, numeric_m2: dict[str, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Standardisation (mean, std) of every encoded feature over `rows` training rows.

    A numeric column, imputed with its mean, keeps that mean and its present values' sum of
    squared deviations (`numeric_m2`, the imputed rows add none), over all rows; a missing
    indicator is a 0/1 column with share p: mean p, std √(p(1-p)). One-hot columns stay 0/1
    (mean 0, std 1), as scikit-learn's OneHotEncoder leaves them. A constant column gets std 1.
    """
    means: list[float] = []
    stds: list[float] = []
    for column in encoding.inputs:
        if column.kind == NUMERIC:
            means.append(column.impute)
            stds.append(math.sqrt(numeric_m2.get(column.name, 0.0) / max(rows, 1)))
            if column.indicator:
                p = column.missing_count / max(rows, 1)
                means.append(p)
                stds.append(math.sqrt(p * (1 - p)))
        else:
            means.extend([0.0] * column.width)
            stds.extend([1.0] * column.width)
    std = np.asarray(stds)
    return np.asarray(means), np.where(std < 1e-6, 1.0, std)
