"""Masking of the prediction log (serving/logmask.py): the text patterns, the keyed hash, and
the replica's log written to real storage by the FeedbackStore's code, searched byte by byte.
No Ray: the store's actor handle is stood in for by its service object."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from kiln.actors.feedback import FeedbackService
from kiln.serving.logmask import LogMask, luhn_ok, mask_text, parse_fields
from kiln.serving.predlog import Logged, PredictionLog

KEY = bytes(range(32))


@pytest.mark.parametrize(
    "text, kind",
    [
        ("write to jane.doe+kiln@example.co.uk today", "EMAIL"),
        ("call +44 20 7946 0958 now", "PHONE"),
        ("call (555) 123-4567 now", "PHONE"),
        ("call 555-123-4567 now", "PHONE"),
        ("call 4155552671", "PHONE"),
        ("card 4111 1111 1111 1111 exp 12/29", "CARD"),
        ("card 5500-0000-0000-0004", "CARD"),
        ("card 378282246310005", "CARD"),
    ],
)
def test_sensitive_values_are_tagged(text: str, kind: str) -> None:
    masked = mask_text(text, KEY)
    assert masked is not None and f"<{kind}:" in masked
    digits_or_mail = [w for w in text.split() if "@" in w or sum(c.isdigit() for c in w) >= 7]
    for word in digits_or_mail:
        assert word.strip("(),.") not in masked


@pytest.mark.parametrize(
    "text",
    [
        "order 4111 1111 1111 1112 shipped",  # 16 digits, fails Luhn: no card
        "version 3.11.4 and 2026-12-07",
        "the answer is 42, x=1234",
        "no mail here @ all",
    ],
)
def test_ordinary_text_is_kept(text: str) -> None:
    assert mask_text(text, KEY) == text


def test_equal_values_get_equal_tags_and_another_key_another() -> None:
    one = mask_text("a@b.org and A@B.org", KEY)
    assert one is not None
    tags = [w for w in one.split() if w.startswith("<EMAIL:")]
    assert len(tags) == 2 and tags[0] == tags[1]  # the address's case does not matter
    other = mask_text("a@b.org", bytes(32))
    assert other is not None and other not in one


def test_luhn() -> None:
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112")


def test_parse_fields() -> None:
    assert parse_fields(["b,a", "c", " a "]) == ["a", "b", "c"]
    assert parse_fields(None) == []


def test_masked_inputs_hash_alike_dropped_inputs_are_gone() -> None:
    mask = LogMask(KEY, frozenset({"income"}), frozenset({"age"})).for_model(
        "churn", 1, ["age", "income", "city"]
    )
    x = np.array([[30, 50_000, 2], [31, 50_000, 1], [32, 61_000, 2]], dtype=np.float32)
    out = mask.mask_inputs("churn", 1, x)
    assert np.isnan(out[:, 0]).all()
    assert out[0, 1] == out[1, 1] != out[2, 1]  # equal values stay equal
    assert not np.isin(x[:, 1], out[:, 1]).any()
    assert (out[:, 2] == x[:, 2]).all()  # other inputs as they were
    assert (out[:, 1] < 2**24).all() and (out[:, 1] == np.round(out[:, 1])).all()
    assert x[0, 1] == 50_000  # the request's own array is not touched
    assert mask.mask_inputs("other", 1, x) is x


class StoreHandle:
    """FeedbackService behind `.append.remote(...)` as the replica calls it."""

    def __init__(self, service: FeedbackService) -> None:
        self.service = service
        self.append = self._method("append")
        self.append_usage = self._method("append_usage")

    def _method(self, name: str) -> Any:
        service = self.service

        class Remote:
            @staticmethod
            def remote(*args: Any) -> Any:
                async def call() -> Any:
                    return getattr(service, name)(*args)

                return call()

        return Remote()


SECRET_INCOME = 987_654.3125  # exact in float32: its 4 bytes are what a leak would show
SECRET_AGE = 77_123.5
VISIBLE_SCORE = 123_457.25  # not masked: the byte search must find it (the search works)


def every_byte(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in root.rglob("*") if p.is_file()]


def test_no_masked_value_reaches_the_storage_files(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    service = FeedbackService(str(storage))
    mask = LogMask(KEY, frozenset({"income"}), frozenset({"age"}))
    names = ["age", "income", "score"]
    log = PredictionLog(
        lambda: [StoreHandle(service)],
        masker=lambda item: mask.for_model(item.model, item.version, names).apply(item),
    )
    x = np.array(
        [[SECRET_AGE, SECRET_INCOME, VISIBLE_SCORE], [SECRET_AGE, SECRET_INCOME, 1.0]],
        dtype=np.float32,
    )

    async def scenario() -> int:
        log.record(Logged("churn", 1, "req-1", 1.7e9, 200, 1.0, 2, x, np.array([0.0, 1.0])))
        return await log.flush()

    assert asyncio.run(scenario()) == 2
    files = every_byte(storage)
    parquet = [p for p, _ in files if p.suffix == ".parquet"]
    assert parquet, "the log wrote no Parquet file"
    visible = np.float32(VISIBLE_SCORE).tobytes()
    assert any(visible in data for _, data in files), "the byte search cannot see values"
    for secret in (SECRET_INCOME, SECRET_AGE):
        needle = np.float32(secret).tobytes()
        assert not any(needle in data for _, data in files), f"{secret} reached {storage}"
    inputs = [row for p in parquet for row in pq.read_table(p).column("inputs").to_pylist()]
    assert all(np.isnan(row[0]) for row in inputs)
    assert inputs[0][1] == inputs[1][1] != SECRET_INCOME


@dataclass
class TextEntry:
    """The fields a language model's log entry carries (predlog's LoggedText has these)."""

    model: str
    version: int
    prompt: str
    completions: list[str]


def test_language_model_text_is_masked_only_with_log_mask_text() -> None:
    entry = TextEntry(
        "lm", 1, "mail bob@corp.example or call +1 415 555 2671", ["card 4111-1111-1111-1111"]
    )
    masked = LogMask(KEY, text=True).apply(entry)
    assert "bob@corp.example" not in masked.prompt and "<EMAIL:" in masked.prompt
    assert "555 2671" not in masked.prompt and "<PHONE:" in masked.prompt
    assert masked.completions == [f"card {mask_text('4111-1111-1111-1111', KEY)}"]
    assert entry.prompt.startswith("mail bob@")  # the request's own entry is not touched
    assert LogMask(KEY, frozenset({"x"})).apply(entry) is entry  # no --log-mask-text: as is


def test_no_masked_text_reaches_the_storage_files(tmp_path: Path) -> None:
    from kiln.serving.predlog import LoggedText

    storage = tmp_path / "storage"
    service = FeedbackService(str(storage))
    log = PredictionLog(lambda: [StoreHandle(service)], masker=LogMask(KEY, text=True).apply)
    secrets = ["zelda.quintero@example.org", "+44 20 7946 0958", "4111 1111 1111 1111"]
    entry = LoggedText(
        model="lm",
        version=1,
        response_id="cmpl-7",
        ts=1.7e9,
        latency_ms=3.0,
        endpoint="completions",
        prompt=f"Xylophonic invoice for {secrets[0]}, phone {secrets[1]}",
        completions=[f"paid with card {secrets[2]}"],
        finish_reasons=["stop"],
        prompt_tokens=9,
        completion_tokens=[6],
    )

    async def scenario() -> int:
        log.record(entry)
        return await log.flush()

    assert asyncio.run(scenario()) == 1
    files = every_byte(storage)
    assert any(b"Xylophonic" in data for _, data in files), "the byte search cannot see text"
    for secret in secrets:
        assert not any(secret.encode() in data for _, data in files), f"{secret} reached storage"
    assert not any(b"zelda" in data or b"7946" in data for _, data in files)


def test_registry_policy_joins_serve_options_and_a_drop_wins() -> None:
    from kiln.serving.logmask import LogPolicy

    served = LogMask(b"k" * 32, frozenset({"a"}), frozenset({"b"}))
    joined = served.with_policies(
        {"m": LogPolicy(frozenset({"b", "c"}), frozenset({"a"}), text=True)}
    )
    assert joined.policy("m") == LogPolicy(frozenset({"c"}), frozenset({"a", "b"}), True)
    assert joined.policy("other") == LogPolicy(frozenset({"a"}), frozenset({"b"}), False)
    x = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 5.0]], dtype=np.float32)
    out = joined.for_model("m", 1, ["a", "b", "c", "d"]).mask_inputs("m", 1, x)
    assert np.isnan(out[:, :2]).all()  # a and b dropped
    assert out[0, 2] == out[1, 2] != 3.0  # c hashed, equal values alike
    assert (out[:, 3] == x[:, 3]).all()
    assert LogMask(b"k" * 32).with_policies({"m": LogPolicy(text=True)}).active


def test_input_fields_and_the_error_for_an_unknown_one() -> None:
    from kiln.serving.logmask import check_fields, input_fields
    from kiln.training.errors import KilnError

    assert input_fields({"kind": "mlp", "num_features": 64}) == [f"x{i}" for i in range(64)]
    assert input_fields({"kind": "lm"}) is None
    known = {"d@1": input_fields({"kind": "mlp", "num_features": 64})}
    check_fields(["x63"], known, "--log-mask")
    with pytest.raises(KilnError, match=r'"x64" is not an input .*x0\.\.x63'):
        check_fields(["x64"], known, "--log-mask")
    with pytest.raises(KilnError, match="takes text"):
        check_fields(["age"], {"lm@1": None}, "--mask")
    check_fields([], {"lm@1": None}, "--mask")


def test_a_registry_policy_masks_text_of_its_model_only() -> None:
    from kiln.serving.logmask import LogPolicy

    mask = LogMask(KEY).with_policies({"chat": LogPolicy(text=True)})
    entry = TextEntry("chat", 1, "mail ann@example.com", ["call +1 415 555 0100"])
    masked = mask.apply(entry)
    assert "ann@example.com" not in masked.prompt and "<EMAIL:" in masked.prompt
    assert "<PHONE:" in masked.completions[0]
    other = TextEntry("other", 1, "mail ann@example.com", [])
    assert mask.apply(other).prompt == "mail ann@example.com"
