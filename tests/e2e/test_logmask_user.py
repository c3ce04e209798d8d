"""`kiln serve --log-mask income` as a user runs it: a model trained on a table by `kiln
train`, served as a subprocess, called over HTTP; once the prediction log is on disk, no file
under the storage root holds the masked income (an unmasked age is found by the same byte
search), and the masking secret is kept in $KILN_HOME/log-mask.key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import free_port, wait_for
from tests.e2e.kiln_process import KilnServe, files_holding, kiln_env, kiln_json
from tests.tables import example_csv

pytestmark = pytest.mark.slow

SECRET_INCOME = 987_654.3125  # exact in float32: its 4 bytes are what a leak would show
VISIBLE_AGE = 77_123.5


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KilnServe]:
    home = tmp_path_factory.mktemp("mask-home")
    env = kiln_env(home, free_port())
    csv = example_csv(str(home / "people.csv"))
    kiln_json(env, "train", "--data", str(csv), "--model", "logistic", "--register", "ppl")
    server = KilnServe(env, ["ppl", "--no-auth", "--log-mask", "income"], home / "serve.log")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def test_no_masked_value_on_disk(served: KilnServe) -> None:
    rows = [{"age": VISIBLE_AGE, "income": SECRET_INCOME, "city": "lima", "plan": "basic"}] * 3
    reply = httpx.post(f"{served.url}/v1/models/ppl:predict", json={"instances": rows}, timeout=30)
    assert reply.status_code == 200, reply.text
    storage = Path(served.env["KILN_HOME"]) / "storage"
    visible = np.float32(VISIBLE_AGE).tobytes()

    logged = wait_for(lambda: bool(files_holding(storage, visible)), 60)
    assert logged, "the prediction log never reached the storage"
    assert files_holding(storage, np.float32(SECRET_INCOME).tobytes()) == []
    key = Path(served.env["KILN_HOME"]) / "log-mask.key"
    assert key.is_file() and key.stat().st_mode & 0o077 == 0
