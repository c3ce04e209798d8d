"""A request's values as a model's raw inputs: the checks V1 and V2 share for a model trained
on a table (`kiln.training.tabular.Encoding`). Pure numpy, no Ray."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kiln.serving.schemas import RequestError
from kiln.training.tabular import BadInput, Encoding


def rows_to_inputs(
    encoding: Encoding, instances: Sequence[Any], booleans: bool = True
) -> np.ndarray:
    """V1 instances (objects by input name, or rows in input order) as raw inputs; a 422 that
    names the input and the fix otherwise."""
    try:
        return encoding.rows_to_inputs(instances, booleans)
    except BadInput as exc:
        raise RequestError(422, str(exc)) from exc


def columns_to_inputs(
    encoding: Encoding,
    columns: dict[str, Sequence[Any]],
    num_rows: int,
    error: type[RequestError] = RequestError,
) -> np.ndarray:
    """V2 inputs by name (decoded to Python values) as raw inputs; `error` (a 422) otherwise."""
    try:
        return encoding.column_inputs(columns, num_rows)
    except BadInput as exc:
        raise error(422, str(exc)) from exc
