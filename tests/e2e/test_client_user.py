"""The Python client as a data scientist uses it: `kiln train` and `kiln serve` run as commands,
then `Kiln(url=..., key=...)` from a script: a DataFrame in, a DataFrame out, the same answers
as raw HTTP with the same key; feedback by the ids it returned; metrics; a refused key; the
async twin. The server is stopped with Ctrl-C at the end."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits

from tests.conftest import free_port, wait_for
from tests.e2e.kiln_process import KilnServe, kiln_env, kiln_json

pytestmark = pytest.mark.slow  # a model trained by `kiln train` first: about 2 minutes


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KilnServe, str]]:
    home = tmp_path_factory.mktemp("client-home")
    env = kiln_env(home, free_port())
    trained = kiln_json(
        env, "train", "--data", "sklearn:digits", "--model", "mlp", "--register", "dgm"
    )
    assert trained["version"] == 1
    made = kiln_json(env, "keys", "create", "--scope", "predict:dgm", "--scope", "feedback:dgm")
    server = KilnServe(env, ["dgm"], home / "serve.log").start()
    try:
        yield server, made["secret"]
        assert server.interrupt() == 0, server.log()
    finally:
        server.kill()


@pytest.fixture(scope="module")
def digits() -> tuple[pd.DataFrame, np.ndarray]:
    data = load_digits()
    frame = pd.DataFrame(data.data[:50], columns=[f"f{i}" for i in range(64)])
    frame.index = pd.Index([f"img{i}" for i in range(50)], name="image")
    return frame, data.target[:50]


def test_predict_feedback_and_metrics_from_python(served, digits) -> None:
    from kiln.client import Kiln

    server, secret = served
    frame, labels = digits
    raw = httpx.post(
        f"{server.url}/v1/models/dgm:predict",
        json={"instances": frame.to_numpy().tolist()},
        headers={"Authorization": f"Bearer {secret}"},
        timeout=60,
    ).json()
    with Kiln(url=server.url, key=secret) as kiln:
        answer = kiln.predict("dgm", frame)
        assert isinstance(answer, pd.DataFrame) and answer.index.equals(frame.index)
        assert answer["prediction"].tolist() == raw["predictions"]
        assert answer["model_version"].tolist() == [1] * len(frame)
        assert np.mean(answer["prediction"].to_numpy() == labels) >= 0.8
        fed = kiln.feedback("dgm", answer, labels)
        assert (fed.accepted, fed.unknown_ids) == (len(frame), [])

        def labelled() -> bool:
            versions = {v["version"]: v for v in kiln.metrics("dgm", "1h").versions}
            quality = versions.get(1, {}).get("quality") or {}
            return int(quality.get("labelled_rows", 0)) >= len(frame)

        assert wait_for(labelled, timeout_s=60, interval_s=1)
        explained = kiln.explain("dgm", frame.iloc[:2])
        assert [e.prediction for e in explained] == raw["predictions"][:2]


def test_a_refused_key_and_an_unknown_model_are_typed_errors(served, digits) -> None:
    from kiln.client import Kiln
    from kiln.errors import AuthError, NotFoundError

    server, secret = served
    frame, _ = digits
    with Kiln(url=server.url) as anonymous, pytest.raises(AuthError, match="missing API key"):
        anonymous.predict("dgm", frame)
    with Kiln(url=server.url, key=secret) as kiln:
        with pytest.raises(AuthError, match="lacks scope predict:other") as refused:
            kiln.predict("other", frame)
        assert refused.value.http_status == 403
    with Kiln(url=server.url, key=kiln_admin_key(server)) as admin:
        with pytest.raises(NotFoundError, match="other"):
            admin.predict("other", frame)


def kiln_admin_key(server: KilnServe) -> str:
    return str(kiln_json(server.env, "keys", "create", "--scope", "admin")["secret"])


def test_the_async_client_answers_the_same(served, digits) -> None:
    from kiln.http_client import AsyncKiln

    server, secret = served
    frame, _ = digits

    async def both() -> list[Any]:
        async with AsyncKiln(url=server.url, key=secret) as kiln:
            return list(
                await asyncio.gather(
                    kiln.predict("dgm", frame), kiln.predict("dgm", frame.to_numpy())
                )
            )

    table, rows = asyncio.run(both())
    assert table["prediction"].tolist() == rows.predictions
    assert len(set(table["id"]) | set(rows.ids)) == 2 * len(frame)
