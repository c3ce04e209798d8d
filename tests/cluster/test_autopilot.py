"""The autopilot: its verdicts without Ray, then the whole loop on shifted traffic (chaos)."""

import json
import threading
import time

import httpx
import numpy as np
import pytest

from kiln.autopilot import AutopilotConfig, compare_accuracy, compare_r2
from kiln.training.errors import KilnError
from tests.cluster.test_retrain import shift_right
from tests.conftest import wait_for


def test_a_clearly_better_canary_is_promoted_and_a_worse_one_rolled_back():
    better = compare_accuracy(90, 100, 550, 1000, min_gain=0.01)
    assert better["verdict"] == "promote" and better["gain"] == pytest.approx(0.35)
    # the one-sided 95% bound by hand: 1.645 x sqrt(.9 x .1 / 100 + .55 x .45 / 1000)
    se = np.sqrt(0.9 * 0.1 / 100 + 0.55 * 0.45 / 1000)
    assert better["lower"] == pytest.approx(0.35 - 1.6448536 * se, rel=1e-6)
    worse = compare_accuracy(40, 100, 550, 1000, min_gain=0.01)
    assert worse["verdict"] == "rollback"
    close = compare_accuracy(56, 100, 550, 1000, min_gain=0.01)
    assert close["verdict"] == "wait"


def test_regressors_compare_r2_by_bootstrap():
    rng = np.random.default_rng(0)
    y = rng.normal(size=400)
    good = (y, y + rng.normal(scale=0.3, size=400))
    bad = (y, y + rng.normal(scale=1.0, size=400))
    assert compare_r2(good, bad, min_gain=0.05)["verdict"] == "promote"
    assert compare_r2(bad, good, min_gain=0.05)["verdict"] == "rollback"


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"min_feedback": 1}, "--min-feedback"),
        ({"canary_weight": 100}, "--canary-weight"),
        ({"max_canary_s": 0}, "--max-canary-s"),
    ],
)
def test_bad_options_name_the_flag(options, flag):
    with pytest.raises(KilnError, match=flag):
        AutopilotConfig(name="m", **options)


class Traffic:
    """Shifted digits requests of 10 rows, each answer's labels sent back at once."""

    def __init__(self, url: str, x: np.ndarray, y: np.ndarray) -> None:
        self.url, self.x, self.y = url, x, y
        self.failed: list[str] = []
        self.answers: list[tuple[float, int, list[str], list[int], list[int]]] = []
        self.accepted: list[str] = []
        self.retried_feedback = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        rng = np.random.default_rng(0)
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                try:
                    self.one_request(client, rng.integers(0, len(self.x), 10))
                except httpx.HTTPError as exc:
                    self.failed.append(f"{type(exc).__name__}: {exc}")

    def one_request(self, client: httpx.Client, rows: np.ndarray) -> None:
        answer = client.post(
            f"{self.url}/v1/models/digits-auto:predict",
            json={"instances": self.x[rows].tolist()},
        )
        if answer.status_code != 200:
            self.failed.append(f"predict {answer.status_code} {answer.text[:100]}")
            return
        body = answer.json()
        labels = self.y[rows].tolist()
        self.answers.append(
            (time.time(), body["model_version"], body["ids"], body["predictions"], labels)
        )
        for _attempt in range(30):  # a 503 while the store restarts says: send again
            fed = client.post(
                f"{self.url}/v1/models/digits-auto:feedback",
                json={"ids": body["ids"], "labels": labels},
            )
            if fed.status_code != 503:
                break
            self.retried_feedback += 1
            self.stop.wait(1.0)
        if fed.status_code != 200:
            self.failed.append(f"feedback {fed.status_code} {fed.text[:100]}")
            return
        unknown = set(fed.json()["unknown_ids"])
        self.accepted += [i for i in body["ids"] if i not in unknown]

    def accuracy(self, since: float) -> float:
        hits = [
            p == t
            for at, _, _, ps, ts in self.answers
            if at >= since
            for p, t in zip(ps, ts, strict=True)
        ]
        return float(np.mean(hits)) if hits else float("nan")


@pytest.mark.slow
@pytest.mark.chaos
def test_autopilot_recovers_accuracy_on_shifted_traffic(
    trained_digits, settings_session, registry_session
):
    import ray

    from kiln.actors.feedback import feedback_stores, read_window
    from kiln.actors.registry import read_verified_files
    from kiln.actors.shards import load_shards
    from kiln.actors.sources import SourceSpec
    from kiln.autopilot import start_autopilot
    from kiln.serving_control import deploy_models

    parent = trained_digits.record
    files = read_verified_files(settings_session.storage_uri, parent)
    copy = ray.get(
        registry_session.register.remote(
            "digits-auto", files, parent.spec, parent.metrics, parent.lineage
        )
    )
    url = deploy_models(settings_session, ["digits-auto"], auth=False)
    train = load_shards(SourceSpec(uri="sklearn:digits"), "train", 1)
    try:
        _, x, y = train.read_arrays()
    finally:
        train.release()
    traffic = Traffic(url, shift_right(x), y)
    traffic.thread.start()
    started = time.time()
    config = AutopilotConfig(
        name="digits-auto",
        min_feedback=300,
        min_gain=0.01,
        on_drift=True,
        canary_weight=30,
        check_every_s=2.0,
        max_canary_s=300,
    )
    pilot = start_autopilot(config, settings_session)
    try:
        # Mid-stream, the FeedbackStore dies; replicas resend what it had not acknowledged.
        assert wait_for(lambda: len(traffic.accepted) >= 150, timeout_s=120)
        (store,) = feedback_stores(settings_session.storage_uri, 1)
        ray.kill(store, no_restart=False)

        def promoted() -> bool:
            audit = ray.get(registry_session.audit.remote(20, "autopilot-promote"))
            return any(e["target"].startswith("digits-auto@") for e in audit)

        assert wait_for(promoted, timeout_s=400, interval_s=2), ray.get(pilot.get_status.remote())
        switched = time.time()
        assert wait_for(lambda: sum(a[0] > switched for a in traffic.answers) >= 30, timeout_s=120)
    finally:
        traffic.stop.set()
        traffic.thread.join(timeout=60)
        status = ray.get(pilot.stop.remote())
        ray.kill(pilot, no_restart=True)
    # Live accuracy on the shifted traffic: what the first version answered, and after the
    # promotion.
    before = float(
        np.mean(
            [
                p == t
                for _, v, _, ps, ts in traffic.answers
                if v == copy.version
                for p, t in zip(ps, ts, strict=True)
            ]
        )
    )
    after = traffic.accuracy(switched)
    assert traffic.failed == []  # zero failed requests, across the kill and the switch
    assert before < parent.metrics["accuracy"] - 0.10  # the shift costs at least 10 points
    assert after >= before + 0.08, (before, after)
    audit = ray.get(registry_session.audit.remote(50, None))
    actions = [e["action"] for e in audit if e["target"].startswith("digits-auto")]
    assert "autopilot-retrain" in actions and "autopilot-promote" in actions
    retrained = [d for d in status["state"]["decisions"] if d["action"] == "retrain"]
    assert retrained and retrained[0]["drifted_features"]  # drift was flagged
    # No acknowledged row is lost: every accepted label is in the log, with its prediction.
    window = read_window(settings_session.storage_uri, "digits-auto", started - 5)
    ids, labels = window.column("id").to_pylist(), window.column("label").to_pylist()
    labelled = dict(zip(ids, labels, strict=True))
    missing = [i for i in traffic.accepted if labelled.get(i) is None]
    assert missing == []
    # And every prediction served is in the log (retried flushes), each once.
    served = {i for _, _, ids, _, _ in traffic.answers for i in ids}
    assert wait_for(
        lambda: (
            served
            <= set(
                read_window(
                    settings_session.storage_uri, "digits-auto", started - 5, with_inputs=False
                )
                .column("id")
                .to_pylist()
            )
        ),
        timeout_s=30,
    )
    figures = {
        "live_accuracy_before": before,
        "live_accuracy_after": after,
        "requests": len(traffic.answers),
        "feedback_retried_503": traffic.retried_feedback,
        "decisions": status["state"]["decisions"],
    }
    print(json.dumps(figures, default=str))
