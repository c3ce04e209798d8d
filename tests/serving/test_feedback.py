"""The prediction log and feedback over real HTTP, and the window report built from them."""

import time

import httpx
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from tests.conftest import wait_for
from tests.serving.test_http import digits_test_rows, served_digits  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def served(served_digits):  # noqa: F811
    """digits-mlp served without keys (keys and scopes: test_http_auth.py)."""
    return served_digits


@pytest.fixture(scope="module")
def rows(digits_test_rows):  # noqa: F811
    return digits_test_rows


def post(url: str, path: str, body) -> httpx.Response:
    return httpx.post(f"{url}/v1/models/digits-mlp{path}", json=body, timeout=30)


def test_feedback_joins_logged_predictions_and_the_report_counts_it(
    served, rows, trained_digits, settings_session
):
    x, y = rows
    # Other modules label digits-mlp on the same session's log (the Python client's tests label
    # 8 rows): the window's counts are taken as a difference, its scores as merged counts.
    before = labelled_before(served, trained_digits.record.version)
    ids, predictions = [], []
    for start in range(0, 120, 20):  # six requests of 20 rows
        answer = post(served, ":predict", {"instances": x[start : start + 20].tolist()})
        assert answer.status_code == 200
        ids += answer.json()["ids"]
        predictions += answer.json()["predictions"]
    labels = y[:120].tolist()
    result = post(served, ":feedback", {"ids": ids + ["nope-0"], "labels": labels + [1]})
    assert result.status_code == 200, result.text
    assert result.json() == {"accepted": 120, "unknown_ids": ["nope-0"]}

    report = httpx.get(f"{served}/v1/models/digits-mlp/metrics?window=1h", timeout=60).json()
    (entry,) = [v for v in report["versions"] if v["version"] == trained_digits.record.version]
    assert entry["requests"] >= 6 and entry["predictions"] >= 120
    quality = entry["quality"]
    assert quality["labelled_rows"] == before["rows"] + 120
    correct = accuracy_score(labels, predictions) * 120
    expected = (before["accuracy"] * before["rows"] + correct) / (before["rows"] + 120)
    assert quality["accuracy"] == pytest.approx(expected)
    if before["rows"] == 0:  # macro F1 does not merge from two scores
        assert quality["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro"))
    assert entry["latency_ms"]["p50"] > 0
    assert entry["drift"]["reference"] and entry["drift"]["rows"] >= 120
    if only_digit_images_logged(settings_session.storage_uri):
        # Test rows come from the training distribution. (Other modules of the session log
        # rows of zeros or uniform noise to the same model when run with this one.)
        assert entry["drift"]["drifted_features"] == []


def only_digit_images_logged(storage_uri: str) -> bool:
    """Whether every row digits-mlp logged in the last hour is one of scikit-learn's digits."""
    from sklearn.datasets import load_digits

    from kiln.actors.feedback import read_window

    digits = {tuple(row) for row in load_digits().data.astype(np.float32).tolist()}
    logged = read_window(storage_uri, "digits-mlp", time.time() - 3600).column("inputs")
    return all(tuple(row) in digits for row in logged.to_pylist() if row is not None)


def labelled_before(url: str, version: int) -> dict[str, float]:
    report = httpx.get(f"{url}/v1/models/digits-mlp/metrics?window=1h", timeout=60).json()
    for entry in report.get("versions", []):
        quality = entry.get("quality") or {}
        if entry["version"] == version and quality.get("labelled_rows"):
            return {"rows": quality["labelled_rows"], "accuracy": quality["accuracy"]}
    return {"rows": 0, "accuracy": 0.0}


def test_a_later_label_replaces_the_earlier_one(served, rows, settings_session):
    from kiln.actors.feedback import read_window

    x, y = rows
    since = time.time() - 1
    answer = post(served, ":predict", {"instances": x[:1].tolist()}).json()
    wrong = (int(y[0]) + 1) % 10
    for label in (wrong, int(y[0])):
        body = {"ids": answer["ids"], "labels": [label]}
        assert post(served, ":feedback", body).json()["accepted"] == 1
    window = read_window(settings_session.storage_uri, "digits-mlp", since).to_pylist()
    (row,) = [r for r in window if r["id"] == answer["ids"][0]]
    assert row["label"] == str(int(y[0]))
    assert np.allclose(row["inputs"], x[0])


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"ids": ["a-0", "b-0"], "labels": [1]}, 422, "one label per id"),
        ({"ids": ["a-0"], "labels": ["seven"]}, 422, "labels[0] is a string"),
        ({"ids": ["a-0"], "labels": [11]}, 422, "not a class"),
        ({"ids": ["a-0"], "labels": [True]}, 422, "labels[0] is a boolean"),
        ({"ids": [], "labels": []}, 422, "ids"),
        ({"ids": "a-0", "labels": [1]}, 422, "ids"),
    ],
)
def test_bad_feedback_gets_a_4xx_naming_the_problem(served, body, status, fragment):
    answer = post(served, ":feedback", body)
    assert answer.status_code == status
    assert fragment in answer.json()["error"]


def test_an_oversize_feedback_body_is_refused(served):
    body = {"ids": ["x" * 100] * 100_000, "labels": [1] * 100_000}
    answer = post(served, ":feedback", body)
    assert answer.status_code == 413


def test_a_bad_window_is_a_422(served):
    answer = httpx.get(f"{served}/v1/models/digits-mlp/metrics?window=forever", timeout=30)
    assert answer.status_code == 422 and "30m, 1h or 7d" in answer.json()["error"]


def scrape() -> str:
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return ""


def exported(name: str, **labels: str) -> bool:
    """A line of metric `name` for digits-mlp carrying `labels` is in Ray's Prometheus export."""
    wanted = [f'{k}="{v}"' for k, v in {"model": "digits-mlp", **labels}.items()]
    return any(
        line.startswith(name + "{") and all(label in line for label in wanted)
        for line in scrape().splitlines()
    )


def test_prometheus_metrics_count_requests_and_show_quality(
    served, rows, settings_session, registry_session
):
    from kiln.actors.monitor import QualityGauges

    x, y = rows
    answer = post(served, ":predict", {"instances": x[:8].tolist()}).json()
    post(served, ":feedback", {"ids": answer["ids"], "labels": y[:8].tolist()})
    assert post(served, ":predict", {"instances": [[1.0]]}).status_code == 422

    # Ray exports what replicas record every few seconds. Kiln's own counter, by its name:
    # another exporter's label (`..._status="422"`) once satisfied a bare substring first.
    assert wait_for(lambda: exported("ray_kiln_requests_total", status="422"), timeout_s=60)
    text = scrape()
    assert "ray_kiln_request_latency_ms_bucket" in text and "ray_kiln_batch_rows_bucket" in text
    assert "ray_kiln_feedback_labels_total" in text
    gauges = QualityGauges(settings_session.storage_uri)
    assert gauges.update(registry_session) >= 1

    # Other models' gauges (from the FeedbackStore's own loop) may be exported first.
    assert wait_for(lambda: exported("ray_kiln_model_quality", metric="accuracy"), timeout_s=60)


def test_v2_answers_carry_prediction_ids_that_take_feedback(served, rows):
    x, y = rows
    body = {
        "inputs": [
            {"name": "features", "shape": [3, 64], "datatype": "FP32", "data": x[:3].tolist()}
        ]
    }
    answer = httpx.post(f"{served}/v2/models/digits-mlp/infer", json=body, timeout=30)
    assert answer.status_code == 200
    ids = answer.json()["parameters"]["prediction_ids"]
    assert len(ids) == 3
    result = post(served, ":feedback", {"ids": ids, "labels": y[:3].tolist()})
    assert result.json() == {"accepted": 3, "unknown_ids": []}
