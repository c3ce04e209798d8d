"""kiln.training.tabular.Encoding: serving's request parsing and the numpy/torch twins. No Ray."""

import math

import numpy as np
import pytest
import torch

from kiln.training.models import Encode
from kiln.training.tabular import BadInput, Encoding, canonical

INPUTS = [
    {"name": "age", "kind": "numeric", "type": "int64", "impute": 41.5, "indicator": True},
    {"name": "income", "kind": "numeric", "type": "double", "impute": 50000.0},
    {
        "name": "city",
        "kind": "categorical",
        "type": "string",
        "categories": ["lima", "paris", "tokyo"],
        "counts": [5, 5, 5],
    },
    {
        "name": "vip",
        "kind": "categorical",
        "type": "bool",
        "categories": ["false", "true"],
        "counts": [5, 5],
    },
    {
        "name": "tier",
        "kind": "categorical",
        "type": "int64",
        "categories": ["1", "2", "3"],
        "counts": [5, 5, 5],
    },
]
ENCODING = Encoding.from_spec({"inputs": INPUTS})
NAN = math.nan
# Slots: city lima 0, paris 1, tokyo 2, other 3, missing 4; vip false 0, true 1, other 2,
# missing 3; tier "1" 0, "2" 1, "3" 2, other 3, missing 4.
MISSING_ROW = [NAN, NAN, 4.0, 3.0, 4.0]


def rows(*instances):
    return ENCODING.rows_to_inputs(list(instances)).tolist()


def same(got, expected):
    np.testing.assert_array_equal(np.asarray(got, dtype=np.float32), expected)


def test_objects_and_rows_read_the_same_values():
    named = {"age": 31, "income": 52000.5, "city": "paris", "vip": True, "tier": 3}
    expected = [[31.0, 52000.5, 1.0, 1.0, 2.0]]
    same(rows(named), expected)
    same(rows([31, 52000.5, "paris", True, 3]), expected)
    # Categories compare as canonical strings: "true" is True, "3" is 3.
    same(rows({**named, "vip": "true", "tier": "3"}), expected)


def test_a_missing_key_null_nan_or_empty_string_is_a_missing_value():
    same(rows({}), [MISSING_ROW])
    same(rows({"age": None, "income": NAN, "city": "", "vip": None, "tier": None}), [MISSING_ROW])
    same(rows([None, None, None, None, None]), [MISSING_ROW])


def test_an_unseen_category_is_other():
    same(rows({"city": "oslo", "tier": 9, "vip": "maybe"}), [[NAN, NAN, 3.0, 2.0, 3.0]])


@pytest.mark.parametrize(
    "instance,fragment",
    [
        ({"agee": 3}, 'unknown input "agee"; this model takes: age, income, city, vip, tier'),
        ({"age": "31"}, "\"age\" takes a number; got '31'"),
        ({"age": True}, '"age" takes a number; got True'),
        ({"age": [1]}, '"age" takes a number'),
        ({"age": math.inf}, '"age" is infinite'),
        ({"city": 3}, '"city" takes a string; got 3'),
        ({"city": ["lima"]}, '"city" takes a string'),
        ({"vip": 1}, '"vip" takes a boolean; got 1'),
        ({"tier": 2.5}, '"tier" takes a'),
        ({"tier": False}, '"tier" takes a'),
        ([1, 2, "lima", True], "has 4 values; this model takes 5 (age, income, city"),
        ("lima", "must be an object of features or a list of values"),
        (None, "must be an object of features or a list of values"),
    ],
)
def test_a_value_that_does_not_fit_names_the_input(instance, fragment):
    with pytest.raises(BadInput) as raised:
        ENCODING.rows_to_inputs([{}, instance])
    assert fragment in str(raised.value) and "instance 1" in str(raised.value)


def test_objects_and_rows_mix_in_one_request():
    same(rows({"age": 5}, [5, None, None, None, None]), [[5.0, *MISSING_ROW[1:]]] * 2)


NUMERIC = Encoding.from_spec(
    {
        "inputs": [
            {"name": "a", "kind": "numeric", "type": "double", "impute": 1.0},
            {"name": "b", "kind": "numeric", "type": "double", "impute": 2.0},
        ]
    }
)


def test_all_numeric_rows_take_the_fast_path_and_the_slow_path_alike():
    same(NUMERIC.rows_to_inputs([[1, 2.5], [3.0, 4]]), [[1, 2.5], [3, 4]])
    same(NUMERIC.rows_to_inputs([[1, None], [NAN, 4]]), [[1, NAN], [NAN, 4]])  # slow, fast
    with pytest.raises(BadInput, match="instance 1 holds a number that is infinite"):
        NUMERIC.rows_to_inputs([[1, 2], [math.inf, 4]])
    with pytest.raises(BadInput, match="instance 1 has 1 values"):
        NUMERIC.rows_to_inputs([[1, 2], [3]])
    with pytest.raises(BadInput, match='"a" takes a number'):
        NUMERIC.rows_to_inputs([["1", 2]])


def test_column_inputs_fill_an_input_not_sent_with_missing():
    x = ENCODING.column_inputs({"city": ["lima", None], "age": [None, 3]}, 2)
    same(x, [[NAN, NAN, 0.0, 3.0, 4.0], [3.0, NAN, 4.0, 3.0, 4.0]])
    with pytest.raises(BadInput, match='row 0: "vip" takes a boolean'):
        ENCODING.column_inputs({"vip": [1, 0]}, 2)


@pytest.mark.parametrize(
    "value,key",
    [
        (None, None),
        ("", None),
        (NAN, None),
        (np.float64(NAN), None),
        (True, "true"),
        (np.bool_(False), "false"),
        (3, "3"),
        (np.int64(3), "3"),
        (3.0, "3"),
        (0.5, "0.5"),
        ("Lima", "Lima"),
    ],
)
def test_canonical_keys(value, key):
    assert canonical(value) == key


def test_expand_and_the_torch_encode_layer_agree_on_every_slot_and_missing_value():
    rng = np.random.default_rng(0)
    n = 200
    raw = np.empty((n, ENCODING.num_inputs), dtype=np.float32)
    raw[:, 0] = np.where(rng.random(n) < 0.3, NAN, rng.normal(40, 10, n))
    raw[:, 1] = np.where(rng.random(n) < 0.3, NAN, rng.normal(5e4, 1e4, n))
    for position in (2, 3, 4):
        raw[:, position] = rng.integers(0, ENCODING.inputs[position].width, n)
    layer = Encode(ENCODING).eval()
    expected = ENCODING.expand(raw)
    got = layer(torch.from_numpy(raw)).numpy()
    assert got.shape == expected.shape == (n, ENCODING.num_features) == (n, 17)
    np.testing.assert_array_equal(got, expected)
    # Every slot of every categorical input was drawn, and both missing and present numbers.
    assert set(raw[:, 2].tolist()) == set(range(5)) and np.isnan(raw[:, 0]).any()
    # One-hot blocks hold exactly one 1; the imputed value replaces a missing number.
    assert (expected[:, 3:8].sum(axis=1) == 1).all()
    missing_age = np.isnan(raw[:, 0])
    assert (expected[missing_age, 0] == np.float32(41.5)).all()
    assert (expected[:, 1] == missing_age).all()


def test_expand_and_encode_agree_for_an_all_numeric_encoding_with_nans():
    raw = np.array([[NAN, 3.0], [4.0, NAN], [5.0, 6.0]], dtype=np.float32)
    expected = NUMERIC.expand(raw)
    np.testing.assert_array_equal(expected, [[1.0, 3.0], [4.0, 2.0], [5.0, 6.0]])
    np.testing.assert_array_equal(Encode(NUMERIC).eval()(torch.from_numpy(raw)).numpy(), expected)
