"""Labelled feedback on logged predictions: checking labels, sending them to the right store.

A label is checked against the model the name serves now: a classifier's must be one of its
classes (3 and 3.0 are the same class; "3" is a string, a wrong type for integer classes), a
regressor's a finite number. Labels are stored as the JSON text of the class as the model
knows it, so a version whose classes are the same judges them the same way. Ids go to the store
of their shard (actors/feedback.py `shard_of`), after this replica has flushed its own buffer,
so a caller who sends feedback right after its prediction finds the id whichever replica it
reaches next, as long as the same one served it; another replica's rows arrive within its
flush interval (one second).

A language model's generations are labelled by the `id` their OpenAI answer carried (its
first choice) or `<id>-<i>` (choice i of an `n` > 1 answer). Its label is free: a score
(a finite number), a corrected or preferred text (a string), true/false, or a JSON object
(say `{"score": 4, "text": "..."}`), stored as its JSON text.
"""

from __future__ import annotations

import json
import math
from typing import Any

from kiln.actors.feedback import shard_of
from kiln.serving.schemas import RequestError

MAX_FEEDBACK_IDS = 10_000
MAX_TEXT_LABEL_CHARS = 100_000
"""The longest JSON text a language model's label may take (a corrected completion)."""
RESPONSE_ID_PREFIXES = ("cmpl-", "chatcmpl-")


def type_word(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return {type(None): "null", dict: "object", list: "array"}.get(
        type(value), type(value).__name__
    )


def label_texts(labels: list[Any], spec: dict[str, Any]) -> list[str]:
    """Each label as stored (JSON text), or a 422 that names the first bad one and the fix."""
    if spec["task"] != "classification":
        out = []
        for i, label in enumerate(labels):
            if type_word(label) != "number" or not math.isfinite(label):
                raise RequestError(
                    422,
                    f"labels[{i}] is {json.dumps(label)[:40]}; this regressor takes finite numbers",
                )
            out.append(json.dumps(float(label)))
        return out
    classes = spec["classes"]
    by_value = {(type_word(c), c): c for c in classes}
    out = []
    for i, label in enumerate(labels):
        hashable = label is None or isinstance(label, str | int | float | bool)
        known = by_value.get((type_word(label), label)) if hashable else None
        if known is None:
            kinds = sorted({type_word(c) for c in classes})
            shown_classes = ", ".join(json.dumps(c) for c in classes[:12])
            if type_word(label) not in kinds:
                raise RequestError(
                    422,
                    f"labels[{i}] is a {type_word(label)}; this model's classes are "
                    f"{'/'.join(kinds)}s: {shown_classes}",
                )
            raise RequestError(
                422,
                f"labels[{i}] {json.dumps(label)[:40]} is not a class of this model: "
                f"{shown_classes}",
            )
        out.append(json.dumps(known))
    return out


def text_label_texts(labels: list[Any]) -> list[str]:
    """A language model's labels as stored (JSON text), or a 422 naming the first bad one."""
    out = []
    for i, label in enumerate(labels):
        kind = type_word(label)
        if kind == "null" or kind == "array":
            raise RequestError(
                422,
                f"labels[{i}] is {kind}; label a generation with a score (a number), a "
                'corrected text (a string), true/false or an object like {"score": 4}',
            )
        if kind == "number" and not math.isfinite(label):
            raise RequestError(422, f"labels[{i}] is not a finite number")
        try:
            text = json.dumps(label, allow_nan=False)
        except ValueError as exc:  # a NaN or Infinity inside an object
            raise RequestError(422, f"labels[{i}] holds a number that is not finite") from exc
        if len(text) > MAX_TEXT_LABEL_CHARS:
            raise RequestError(
                422, f"labels[{i}] is {len(text)} characters; at most {MAX_TEXT_LABEL_CHARS}"
            )
        out.append(text)
    return out


def generation_row_ids(ids: list[str]) -> list[str]:
    """Logged row ids of a language model's answers: an answer's own `id` is its first choice
    (`<id>-0`); `<id>-<i>` names choice i; anything else stays as it is (and is unknown)."""
    out = []
    for row_id in ids:
        prefix = next((p for p in RESPONSE_ID_PREFIXES if row_id.startswith(p)), None)
        if prefix is not None and "-" not in row_id[len(prefix) :]:
            row_id = f"{row_id}-0"
        out.append(row_id)
    return out


def check_lengths(ids: list[str], labels: list[Any]) -> None:
    if len(ids) != len(labels):
        raise RequestError(
            422, f"got {len(ids)} ids and {len(labels)} labels; send one label per id"
        )
    if len(ids) > MAX_FEEDBACK_IDS:
        raise RequestError(422, f"got {len(ids)} ids; at most {MAX_FEEDBACK_IDS} per request")


async def send_feedback(
    stores: list[Any], model: str, ids: list[str], texts: list[str]
) -> dict[str, Any]:
    """Each shard's ids to its store; the stores' answers merged in the order ids came."""
    by_shard: dict[int, list[int]] = {}
    for i, row_id in enumerate(ids):
        by_shard.setdefault(shard_of(row_id, len(stores)), []).append(i)
    calls = {
        shard: stores[shard].add_labels.remote(
            model, [ids[i] for i in rows], [texts[i] for i in rows]
        )
        for shard, rows in by_shard.items()
    }
    accepted, unknown, unchecked = 0, set(), set()
    for call in calls.values():
        answer = await call
        accepted += int(answer["accepted"])
        unknown.update(answer["unknown_ids"])
        unchecked.update(answer.get("unchecked_ids", ()))
    merged: dict[str, Any] = {
        "accepted": accepted,
        "unknown_ids": [i for i in dict.fromkeys(ids) if i in unknown],
    }
    if unchecked:
        merged["unchecked_ids"] = [i for i in dict.fromkeys(ids) if i in unchecked]
    return merged
