"""A model's log policy in the registry, as a user runs it: `kiln models log-policy ppl --mask
income --drop city` as a command, then `kiln serve ppl --log-drop plan` as a subprocess (its
flags join the policy); once the prediction log is on disk, no storage file holds the masked
income (an unmasked age is found by the same byte search), the logged hashes of equal incomes
are equal and differ from another income's, and city and plan are gone. Bad fields: one line,
exit 2, from both commands."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import free_port, wait_for
from tests.e2e.kiln_process import KilnServe, files_holding, kiln, kiln_env, kiln_json
from tests.tables import example_csv

pytestmark = pytest.mark.slow

SECRET_INCOME = 987_654.3125  # exact in float32: its 4 bytes are what a leak would show
OTHER_INCOME = 123_456.5
VISIBLE_AGE = 77_123.5


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("policy-home")
    csv = example_csv(str(home / "people.csv"))
    env = kiln_env(home, free_port())
    kiln_json(env, "train", "--data", str(csv), "--model", "logistic", "--register", "ppl")
    return home


@pytest.fixture(scope="module")
def served(home: Path) -> Iterator[KilnServe]:
    env = kiln_env(home, free_port())
    set_policy = kiln_json(env, "models", "log-policy", "ppl", "--mask", "income", "--drop", "city")
    assert set_policy["log_policy"] == {"mask": ["income"], "drop": ["city"], "mask_text": False}
    server = KilnServe(env, ["ppl", "--no-auth", "--log-drop", "plan"], home / "serve.log")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def one_line_error(done: Any, *needles: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_fields_are_one_line_naming_the_model_inputs(home: Path) -> None:
    env = kiln_env(home, free_port())
    done = kiln(env, "models", "log-policy", "ppl", "--mask", "salary")
    one_line_error(done, '"salary"', "age", "income")
    done = kiln(env, "serve", "ppl", "--no-auth", "--log-mask", "income,salary")
    one_line_error(done, '"salary"', "age", "income")
    shown = kiln_json(env, "models", "show", "ppl")
    assert "log_policy" in shown  # None before the policy fixture, the policy after


def test_the_policy_keeps_masked_values_off_the_disk(served: KilnServe) -> None:
    shown = kiln_json(served.env, "models", "show", "ppl")
    assert shown["log_policy"] == {"mask": ["income"], "drop": ["city"], "mask_text": False}
    row = {"age": VISIBLE_AGE, "income": SECRET_INCOME, "city": "lima", "plan": "basic"}
    rows = [row, row, {**row, "income": OTHER_INCOME}]
    reply = httpx.post(f"{served.url}/v1/models/ppl:predict", json={"instances": rows}, timeout=30)
    assert reply.status_code == 200, reply.text
    storage = Path(served.env["KILN_HOME"]) / "storage"
    visible = np.float32(VISIBLE_AGE).tobytes()

    logged = wait_for(lambda: bool(files_holding(storage, visible)), 120)
    assert logged, "the prediction log never reached the storage"
    for secret in (SECRET_INCOME, OTHER_INCOME):
        leaks = files_holding(storage, np.float32(secret).tobytes())
        assert leaks == [], f"{secret} reached {leaks}"
    parquet = files_holding(storage, visible, "*.parquet")
    inputs = [r for p in parquet for r in pq.read_table(p).column("inputs").to_pylist()]
    names = kiln_json(served.env, "models", "show", "ppl")["spec"]
    order = [c["name"] for c in names["inputs"]]
    age, income, city, plan = (order.index(n) for n in ("age", "income", "city", "plan"))
    ours = [r for r in inputs if r[age] == VISIBLE_AGE]
    assert len(ours) == 3
    assert ours[0][income] == ours[1][income] != ours[2][income]  # equal values, equal hashes
    assert all(np.isnan(r[city]) and np.isnan(r[plan]) for r in ours)  # policy + serve flag
