"""`kiln monitor` on an embedded home, from a prediction log written as replicas write it."""

import json
import time

import numpy as np
import pytest

from kiln.actors.feedback import FeedbackService, table_to_ipc
from kiln.actors.registry import RegistryService
from kiln.serving.predlog import Logged, rows_table
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


@pytest.fixture
def lm_home(tmp_path):
    """Language model `lm` with 6 logged generations, 2 of them labelled with a score."""
    from kiln.serving.predlog import LoggedText, text_rows_table
    from tests.serving.lm_fixtures import untrained_lm_files

    home = tmp_path / "home"
    storage = str(home / "storage")
    service = RegistryService(str(home / "registry.db"), storage)
    files, spec = untrained_lm_files()
    service.register("lm", files, spec, {"perplexity": 90.0}, {})
    service.close()
    items = [
        LoggedText(
            model="lm",
            version=1,
            response_id=f"cmpl-{i}",
            ts=time.time() - 60 * i,
            latency_ms=50.0,
            endpoint="completions",
            prompt="hello",
            completions=["world"],
            finish_reasons=["length"],
            prompt_tokens=3,
            completion_tokens=[8],
            ttft_ms=10.0 + i,
            inter_token_ms=[2.0] * 7,
            queue_depth=i % 2,
            kv_cache_usage=0.25,
        )
        for i in range(6)
    ]
    store = FeedbackService(storage)
    store.append("lm", table_to_ipc(text_rows_table(items)))
    store.add_labels("lm", ["cmpl-0-0", "cmpl-1-0"], ["5", "3"])
    return str(home)


def test_monitor_shows_a_language_models_tokens_latencies_and_queue(capsys, lm_home, tmp_path):
    report = kiln_json(capsys, "monitor", "lm", "--window", "1h", "--home", lm_home)
    (entry,) = report["versions"]
    assert report["kind"] == "lm" and entry["requests"] == 6
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (18, 48)
    assert entry["time_to_first_token_ms"]["p50"] == pytest.approx(12.5)
    assert entry["inter_token_latency_ms"] == {"p50": 2.0, "p99": 2.0}
    assert entry["queue_depth"] == {"mean": 0.5, "max": 1.0}
    assert entry["feedback"]["mean_score"] == 4.0
    assert "per_1000_output_tokens" in entry["cost"]

    png = tmp_path / "lm.png"
    code, out, err = kiln(capsys, "monitor", "lm", "--home", lm_home, "--plot", str(png))
    assert code == 0, err
    assert png.stat().st_size > 10_000
    for row in ("TTFT p50 / p99 ms", "inter-token p50 / p99 ms", "output tokens/s",
                "KV-cache use", "$ per 1k output tokens", "12.5 / 14.9", "2 (4)"):  # fmt: skip
        assert row in out, out
