"""`kiln monitor` on an embedded home, from a prediction log written as replicas write it."""

import json
import time

import numpy as np
import pytest

from actors.feedback import FeedbackService, table_to_ipc
from actors.registry import RegistryService
from serving.predlog import Logged, rows_table
from tests.cluster.test_cli_registry import kiln, kiln_json
from tests.conftest import TINY_SPEC, tiny_model_files


@pytest.fixture
def home(tmp_path):
    """Model m, versions 1 and 2, with 40 logged predictions each, half of them labelled."""
    home = tmp_path / "home"
    storage = str(home / "storage")
    service = RegistryService(str(home / "registry.db"), storage)
    for seed in range(2):
        service.register("m", tiny_model_files(seed), TINY_SPEC, {"accuracy": 0.9}, {})
    service.close()
    store = FeedbackService(storage)
    classes = TINY_SPEC["classes"]
    rng = np.random.default_rng(0)
    for version in (1, 2):
        items = [
            Logged(
                "m",
                version,
                f"v{version}r{i}",
                time.time() - 60 * i,
                200,
                2.0 + i,
                4,
                rng.normal(size=(4, TINY_SPEC["num_features"])).astype(np.float32),
                np.array([0, 1, 0, 1]),
            )
            for i in range(10)
        ]
        store.append("m", table_to_ipc(rows_table(items)))
        # version 1 is always right, version 2 right half of the time
        labels = [0, 1, 0, 1] if version == 1 else [0, 0, 1, 1]
        ids = [f"v{version}r{i}-{j}" for i in range(5) for j in range(4)]
        store.add_labels("m", ids, [json.dumps(classes[labels[j % 4]]) for j in range(20)])
    return str(home)


def test_monitor_reports_each_version_and_draws_the_png(capsys, home, tmp_path):
    report = kiln_json(capsys, "monitor", "m", "--window", "1h", "--home", home)
    by_version = {v["version"]: v for v in report["versions"]}
    assert set(by_version) == {1, 2}
    assert by_version[1]["requests"] == 10 and by_version[1]["predictions"] == 40
    assert by_version[1]["quality"]["labelled_rows"] == 20
    assert by_version[1]["quality"]["accuracy"] == 1.0
    assert by_version[2]["quality"]["accuracy"] == 0.5
    assert by_version[1]["drift"] == {"reference": False}  # registered without one
    png = tmp_path / "m.png"
    code, out, err = kiln(capsys, "monitor", "m", "--home", home, "--plot", str(png))
    assert code == 0, err
    assert png.stat().st_size > 10_000 and "m: last 60 min" in out


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(["monitor", "m", "--window", "soon"], "--window"), (["monitor", "nope"], "nope")],
)
def test_monitor_errors_are_one_line(capsys, home, args, fragment):
    code, _, err = kiln(capsys, *args, "--home", home)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1
