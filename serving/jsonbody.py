"""Reading a client's JSON safely, and quoting a client's values back to it in bounded form.

`parse_json` refuses a body nested deeper than MAX_JSON_DEPTH before parsing it: Python's
parser recurses per level, and a 200 KB body of `[[[[...` once answered 500. The depth is
found with a few vectorised passes over the bytes (strings, and escaped quotes inside them,
do not count), and only for a body with more than MAX_JSON_DEPTH brackets at all, so a
small request pays two `bytes.count` calls. Every message that repeats a client's value does
so through `shown`, cut at QUOTE_LIMIT characters.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np
import orjson

from kiln.serving.schemas import RequestError

MAX_JSON_DEPTH = 64
QUOTE_LIMIT = 64
_OPEN, _CLOSE = (ord("["), ord("{")), (ord("]"), ord("}"))
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def shown(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """A client's value for an error message: its repr, at most `limit` characters and `…`."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def deeper_than(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether arrays and objects nest more than `limit` levels deep in a JSON text."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # too few brackets to nest that deep
    data = np.frombuffer(raw, dtype=np.uint8)
    # Only brackets and quotes matter: work on their positions, far fewer than the bytes.
    marks = np.flatnonzero(
        (data == _QUOTE) | (data == _OPEN[0]) | (data == _OPEN[1])
        | (data == _CLOSE[0]) | (data == _CLOSE[1])
    )  # fmt: skip
    kinds = data[marks]
    quote = kinds == _QUOTE
    if b"\\" in raw:  # a quote after an odd run of backslashes is inside its string
        plain = np.flatnonzero(data != _BACKSLASH)
        at = marks[quote]
        before = np.searchsorted(plain, at) - 1
        previous = np.where(before >= 0, plain[np.maximum(before, 0)], -1)
        quote[np.flatnonzero(quote)[(at - previous - 1) % 2 == 1]] = False
    inside = np.bitwise_xor.accumulate(quote)  # True from an opening quote to its closing one
    step = (kinds == _OPEN[0]).astype(np.int32) + (kinds == _OPEN[1]) - (kinds == _CLOSE[0])
    step -= kinds == _CLOSE[1]
    step[inside | quote] = 0
    return int(np.cumsum(step).max(initial=0)) > limit


def parse_json(raw: bytes, error: type[RequestError] = RequestError) -> Any:
    """The parsed body; 400 for malformed JSON or one nested deeper than MAX_JSON_DEPTH.
    `NaN`, `Infinity` and `-Infinity` read as floats (a NaN is a missing value to a model
    trained on a table; Inf is refused where a number is read)."""
    if deeper_than(raw):
        raise error(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    # orjson (64 numbers: about 3x faster than json.loads) reads an integer past 64 bits as a
    # float, where json keeps it exact (and V2 refuses it for an INT64 input): a body with a
    # run of 19 digits or more goes to json, as does anything orjson refuses that json reads
    # (NaN, Infinity, lone surrogates, UTF-16) or answers with its own message.
    if _LONG_DIGITS.search(raw) is None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(raw, parse_constant=_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise error(400, f"request body is not valid JSON: {exc}") from exc


def _constant(name: str) -> float:
    return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[name]


def may_hold_booleans(raw: bytes) -> bool:
    """Whether a JSON text may hold `true` or `false` (a C-speed test that lets the number
    paths skip their per-value search for booleans on most bodies)."""
    return b"true" in raw or b"false" in raw
