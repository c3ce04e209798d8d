"""The Python client against a served app on the shared Ray, over real HTTP on loopback:
its answers are the ones a raw HTTP call gets, in the caller's own kind (rows, pandas, Arrow)."""

import asyncio

import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.datasets import load_digits

from kiln.client import Kiln
from kiln.client_types import Explanations, FeedbackResult, Predictions
from kiln.errors import BadRequestError, KilnError, NotFoundError
from kiln.http_client import AsyncKiln, RetryPolicy

NAME = "digits-mlp"
LM_NAME = "client-lm"


@pytest.fixture(scope="module")
def served_digits(trained_digits, settings_session, registry_session):
    """digits-mlp and a tiny language model, served by one app (keys are tested end to end
    in tests/e2e/test_client_user.py)."""
    import ray

    from kiln.serving_control import deploy_models
    from tests.serving.lm_fixtures import tiny_lm_files

    files, spec = tiny_lm_files()
    ray.get(registry_session.register.remote(LM_NAME, files, spec, {"perplexity": 10.0}, {}))
    return deploy_models(settings_session, [NAME, LM_NAME], auth=False)


@pytest.fixture(scope="module")
def digits_rows():
    data = load_digits()
    return data.data[-360:].astype(np.float64), data.target[-360:]


@pytest.fixture
def kiln(served_digits):
    with Kiln(url=served_digits, retry=RetryPolicy(max_attempts=1)) as client:
        yield client


def raw_predict(url: str, instances: list, **extra) -> dict:
    answer = httpx.post(
        f"{url}/v1/models/{NAME}:predict", json={"instances": instances, **extra}, timeout=60
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_predict_on_rows_equals_the_raw_http_answer(kiln, served_digits, digits_rows):
    x, y = digits_rows
    raw = raw_predict(served_digits, x.tolist(), **{"return": "probabilities"})
    found = kiln.predict(NAME, x.tolist(), probabilities=True)
    assert isinstance(found, Predictions)
    assert found.predictions == raw["predictions"]
    assert (found.model, found.model_version) == (raw["model"], raw["model_version"])
    np.testing.assert_allclose(found.probabilities, raw["probabilities"], rtol=1e-6)
    assert len(found.ids) == len(set(found.ids)) == len(x)
    assert np.mean(np.asarray(found.predictions) == y) > 0.8  # a model, not a constant
    first = found[0]
    assert (first.id, first.prediction) == (found.ids[0], found.predictions[0])
    # A numpy array is rows too, and objects by input name give the same answers.
    assert kiln.predict(NAME, x[:5]).predictions == raw["predictions"][:5]
    objects = [{f"f{i}": v for i, v in enumerate(row)} for row in x[:5].tolist()]
    assert kiln.predict(NAME, objects).predictions == raw["predictions"][:5]


def test_a_dataframe_in_gives_a_dataframe_out(kiln, served_digits, digits_rows):
    x, _ = digits_rows
    raw = raw_predict(served_digits, x[:40].tolist())
    index = pd.Index(range(1000, 1040), name="row")
    named = pd.DataFrame(x[:40], columns=[f"f{i}" for i in range(64)], index=index)
    found = kiln.predict(NAME, named)
    assert isinstance(found, pd.DataFrame)
    assert list(found.columns) == ["prediction", "id", "model_version"]
    assert found.index.equals(index)
    assert found["prediction"].tolist() == raw["predictions"]
    assert found["model_version"].unique().tolist() == [raw["model_version"]]
    # Columns that are not names (a frame made from an array) go as rows in column order.
    unnamed = kiln.predict(NAME, pd.DataFrame(x[:40]), probabilities=True)
    assert unnamed["prediction"].tolist() == raw["predictions"]
    assert np.argmax(np.stack(unnamed["probabilities"]), axis=1).tolist() == raw["predictions"]


def test_an_arrow_table_in_gives_a_table_out_and_nan_is_missing(kiln, served_digits, digits_rows):
    x, _ = digits_rows
    table = pa.table({f"f{i}": x[:10, i] for i in range(64)})
    found = kiln.predict(NAME, table)
    assert isinstance(found, pa.Table)
    assert (
        found.column("prediction").to_pylist()
        == raw_predict(served_digits, x[:10].tolist())["predictions"]
    )
    holed = x[:3].copy()
    holed[:, 5] = np.nan
    with_null = [[None if np.isnan(v) else v for v in row] for row in holed.tolist()]
    assert (
        kiln.predict(NAME, holed).predictions
        == raw_predict(served_digits, with_null)["predictions"]
    )


def test_many_rows_go_in_batches_answered_by_one_version(kiln, served_digits, digits_rows):
    x, _ = digits_rows
    raw = raw_predict(served_digits, x.tolist())
    found = kiln.predict(NAME, x, batch_rows=100)
    assert found.predictions == raw["predictions"]
    assert len(set(found.ids)) == len(x)
    assert len({i.rsplit("-", 1)[0] for i in found.ids}) == -(-len(x) // 100)  # 1 per request


def test_feedback_explain_and_metrics(kiln, digits_rows):
    x, y = digits_rows
    answer = kiln.predict(NAME, pd.DataFrame(x[:8]))
    fed = kiln.feedback(NAME, answer, y[:8])
    assert fed == FeedbackResult(accepted=8, unknown_ids=[])
    assert kiln.feedback(NAME, ["nosuch-0"], [1]).unknown_ids == ["nosuch-0"]
    explained = kiln.explain(NAME, x[:2], method="feature_ablation")
    assert isinstance(explained, Explanations) and len(explained) == 2
    assert list(explained[0].attributions) == explained.inputs == [f"f{i}" for i in range(64)]
    assert [e.prediction for e in explained] == answer["prediction"].tolist()[:2]
    assert explained.to_pandas().shape == (2, 65)
    report = kiln.metrics(NAME, "1h")
    version = report.version(explained.model_version)
    assert version["requests"] >= 1 and version["quality"]["labelled_rows"] >= 8


def test_errors_carry_the_servers_message_and_are_not_retried(kiln):
    with pytest.raises(NotFoundError, match="ghost") as missing:
        kiln.predict("ghost", [[0.0] * 64])
    assert missing.value.http_status == 404
    with pytest.raises(BadRequestError, match="has 3 values; this model takes 64") as bad:
        kiln.predict(NAME, [[1, 2, 3]])
    assert bad.value.http_status == 422 and isinstance(bad.value, KilnError)
    assert "answered 422" in bad.value.__notes__[0] and "attempts" not in bad.value.__notes__[0]
    with pytest.raises(BadRequestError, match="infinite"):
        kiln.predict(NAME, [[float("inf")] * 64])  # refused before sending: JSON has no inf
    with pytest.raises(KilnError, match="registry calls need the catalog"):
        kiln.models()


def test_the_async_twin_answers_the_same(served_digits, digits_rows):
    x, _ = digits_rows
    raw = raw_predict(served_digits, x[:20].tolist())

    async def calls():
        async with AsyncKiln(url=served_digits) as kiln:
            rows, frame = await asyncio.gather(
                kiln.predict(NAME, x[:20].tolist()), kiln.predict(NAME, pd.DataFrame(x[:20]))
            )
            with pytest.raises(NotFoundError):
                await kiln.predict("ghost", [[0.0] * 64])
            report = await kiln.metrics(NAME)
            return rows, frame, report

    rows, frame, report = asyncio.run(calls())
    assert rows.predictions == frame["prediction"].tolist() == raw["predictions"]
    assert report.model == NAME and report.kind == "tabular"


def test_completions_and_chat_equal_the_raw_openai_answers(kiln, served_digits):
    greedy = {"max_tokens": 8, "temperature": 0}
    raw = httpx.post(
        f"{served_digits}/v1/completions",
        json={"model": LM_NAME, "prompt": "kiln", **greedy},
        timeout=60,
    ).json()
    done = kiln.complete(LM_NAME, "kiln", **greedy)
    assert done.text == raw["choices"][0]["text"] and done.usage == raw["usage"]
    assert done.finish_reason == raw["choices"][0]["finish_reason"]
    messages = [{"role": "user", "content": "kiln"}]
    raw_chat = httpx.post(
        f"{served_digits}/v1/chat/completions",
        json={"model": LM_NAME, "messages": messages, **greedy},
        timeout=60,
    ).json()
    whole = kiln.chat(LM_NAME, messages, **greedy)
    assert whole == raw_chat["choices"][0]["message"]["content"]
    pieces = list(kiln.chat(LM_NAME, messages, stream=True, **greedy))
    assert "".join(pieces) == whole and len(pieces) >= 1
    assert kiln.metrics(LM_NAME).kind == "lm"
    with pytest.raises(BadRequestError, match="max_tokens"):
        kiln.complete(LM_NAME, "kiln", max_tokens=10**6)

    async def streamed() -> str:
        async with AsyncKiln(url=served_digits) as client:
            stream = await client.chat(LM_NAME, messages, stream=True, **greedy)
            return "".join([piece async for piece in stream])

    assert asyncio.run(streamed()) == whole
