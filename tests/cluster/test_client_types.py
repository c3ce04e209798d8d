"""The client's pure half: a call's input as JSON instances, answers as the caller's kind."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from kiln.client_types import (
    Predictions,
    as_rows,
    ids_of,
    json_body,
    labels_of,
    merge_explanations,
    merge_predictions,
    shaped_predictions,
)
from kiln.errors import BadRequestError
from kiln.http_client import stream_piece

ANSWERS = [
    {"predictions": ["yes", "no"], "model": "churn", "model_version": 3, "ids": ["a-0", "a-1"]},
    {"predictions": ["no"], "model": "churn", "model_version": 3, "ids": ["b-0"]},
]


def test_a_dataframe_goes_by_name_when_its_columns_are_names():
    frame = pd.DataFrame(
        {"age": [31, None], "city": ["lima", pd.NA], "n": np.array([1, 2], np.int64)}
    )
    rows = as_rows(frame)
    assert rows.kind == "pandas" and rows.instances == [
        {"age": 31.0, "city": "lima", "n": 1},
        {"age": None, "city": None, "n": 2},
    ]
    json.loads(json_body({"instances": rows.instances}))  # plain JSON, no NaN token
    assert as_rows(frame, by_name=False).instances == [[31.0, "lima", 1], [None, None, 2]]
    from_array = pd.DataFrame(np.array([[1.0, np.nan], [3.0, 4.0]]))
    assert as_rows(from_array).instances == [[1.0, None], [3.0, 4.0]]


def test_tables_arrays_and_lists():
    table = pa.table({"a": [1.0, None], "b": ["x", "y"]})
    assert as_rows(table).instances == [{"a": 1.0, "b": "x"}, {"a": None, "b": "y"}]
    assert as_rows(table, by_name=False).instances == [[1.0, "x"], [None, "y"]]
    assert as_rows(np.array([[1, 2]], np.int32)).instances == [[1, 2]]
    assert as_rows([(np.float32(0.5), float("nan"))]).instances == [[0.5, None]]
    with pytest.raises(BadRequestError, match=r"shape \(3,\); send 2 dimensions"):
        as_rows(np.zeros(3))
    with pytest.raises(BadRequestError, match="got one object"):
        as_rows({"a": 1})
    with pytest.raises(BadRequestError, match="got str"):
        as_rows("1,2,3")
    with pytest.raises(BadRequestError, match="infinite"):
        json_body({"instances": [[float("inf")]]})


def test_answers_come_back_as_the_inputs_kind():
    found = merge_predictions(ANSWERS)
    assert found == Predictions("churn", 3, ["yes", "no", "no"], ["a-0", "a-1", "b-0"])
    assert [p.prediction for p in found] == ["yes", "no", "no"] and found[2].id == "b-0"
    frame = pd.DataFrame({"age": [1, 2, 3]}, index=["p", "q", "r"])
    shaped = shaped_predictions(found, as_rows(frame))
    assert list(shaped.index) == ["p", "q", "r"] and shaped.loc["q", "id"] == "a-1"
    table = shaped_predictions(found, as_rows(pa.table({"age": [1, 2, 3]})))
    assert table.column_names == ["prediction", "id", "model_version"]
    assert shaped_predictions(found, as_rows([[1], [2], [3]])) is found


def test_feedback_takes_ids_and_labels_in_any_of_those_kinds():
    found = merge_predictions(ANSWERS)
    expected = ["a-0", "a-1", "b-0"]
    frame = shaped_predictions(found, as_rows(pd.DataFrame({"x": [1, 2, 3]})))
    table = shaped_predictions(found, as_rows(pa.table({"x": [1, 2, 3]})))
    for ids in (found, frame, table, frame["id"], expected, np.array(expected)):
        assert ids_of(ids) == expected
    with pytest.raises(BadRequestError, match="one string"):
        ids_of("a-0")
    assert labels_of(np.array([1, 0])) == [1, 0] and labels_of(pd.Series(["y"])) == ["y"]
    assert labels_of(pa.array([1.5, None])) == [1.5, None]


def test_explanations_name_each_inputs_attribution():
    answer = {
        "predictions": [1],
        "explanations": [
            {"attributions": [0.5, -0.25], "method": "feature_ablation", "baseline": "mean"}
        ],
        "inputs": ["age", "city"],
        "model": "churn",
        "model_version": 2,
    }
    found = merge_explanations([answer, answer])
    assert len(found) == 2 and found[1].attributions == {"age": 0.5, "city": -0.25}
    assert found.to_pandas().columns.tolist() == ["prediction", "age", "city"]


def test_a_chat_stream_event_gives_its_text():
    event = {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}
    assert stream_piece(f"data: {json.dumps(event)}") == "Hi"
    assert stream_piece('data: {"choices": [{"delta": {"role": "assistant"}}]}') is None
    assert stream_piece("data: [DONE]") is None and stream_piece(": keep-alive") is None
    assert stream_piece('data: {"choices": [], "usage": {"completion_tokens": 3}}') is None
