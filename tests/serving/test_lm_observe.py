"""A served language model is observable: its generations go into the prediction log and take
feedback by the `id` of their OpenAI answer, its `ray_kiln_lm_*` series reach Prometheus, the
window report (`kiln monitor`, the console) shows its serving numbers, and a deployment scaled
to zero answers its first request.

Real Ray, real Serve over loopback HTTP, real FeedbackStore actors writing Parquet.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
import ray

from tests.conftest import wait_for
from tests.serving.lm_fixtures import LM_NAME, tiny_lm_files


@pytest.fixture(scope="module")
def registered_lm(ray_local, registry_session) -> Any:
    files, spec = tiny_lm_files()
    return ray.get(registry_session.register.remote(LM_NAME, files, spec, {"perplexity": 10.0}, {}))


@pytest.fixture(scope="module")
def served_lm(registered_lm, settings_session) -> str:
    from kiln.serving_control import deploy_models

    return deploy_models(settings_session, [LM_NAME], auth=False, lm_max_batch=4)


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def complete(url: str, prompt: str = "kiln", **extra: Any) -> dict[str, Any]:
    body = {"model": LM_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}
    answer = post(url, "/v1/completions", body)
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def streamed_chat(url: str, content: str, n: int) -> tuple[str, dict[int, str]]:
    """The id and each choice's text of a streamed chat answer."""
    body = {
        "model": LM_NAME,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 6,
        "n": n,
        "seed": 3,
        "stream": True,
    }
    texts: dict[int, str] = {}
    response_id = ""
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            response_id = chunk["id"]
            for choice in chunk["choices"]:
                piece = choice["delta"].get("content") or ""
                texts[choice["index"]] = texts.get(choice["index"], "") + piece
    return response_id, texts


def send_feedback(url: str, body: dict[str, Any]) -> httpx.Response:
    """POST :feedback, sent again while it answers 503 (a FeedbackStore still starting on a
    busy machine: the answer asks for exactly that)."""
    answers: list[httpx.Response] = []

    def sent() -> bool:
        answers.append(post(url, f"/v1/models/{LM_NAME}:feedback", body))
        return answers[-1].status_code != 503

    wait_for(sent, timeout_s=120, interval_s=2)
    return answers[-1]


def logged_files(storage_uri: str, kind: str) -> list[dict[str, Any]]:
    """Every row of the model's Parquet files of `kind` (predictions or labels), read back."""
    from pathlib import Path

    folder = Path(storage_uri) / "monitoring" / LM_NAME / kind
    rows: list[dict[str, Any]] = []
    for path in sorted(folder.glob("day=*/*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows


def test_a_generation_is_logged_and_labelled_by_the_id_its_answer_carries(
    served_lm, settings_session
):
    done = complete(served_lm, "kiln fires")
    chat_id, chat_texts = streamed_chat(served_lm, "glaze the pots", n=2)
    assert done["id"].startswith("cmpl-") and chat_id.startswith("chatcmpl-")

    feedback = send_feedback(
        served_lm, {"ids": [done["id"], f"{chat_id}-1"], "labels": [4, "a better answer"]}
    )
    assert feedback.status_code == 200, feedback.text
    assert feedback.json() == {"accepted": 2, "unknown_ids": []}

    rows = {r["id"]: r for r in logged_files(settings_session.storage_uri, "predictions")}
    first = rows[f"{done['id']}-0"]
    assert first["prompt"] == "kiln fires" and first["endpoint"] == "completions"
    assert first["completion"] == done["choices"][0]["text"]
    assert first["completion_tokens"] == done["usage"]["completion_tokens"]
    assert first["prompt_tokens"] == done["usage"]["prompt_tokens"]
    assert first["ttft_ms"] > 0 and first["finish_reason"] == done["choices"][0]["finish_reason"]
    for index in (0, 1):  # one row per choice of the streamed chat, the rendered prompt in it
        row = rows[f"{chat_id}-{index}"]
        assert row["completion"] == chat_texts[index] and "glaze the pots" in row["prompt"]
        assert row["endpoint"] == "chat.completions" and row["choice"] == index
    labels = {r["id"]: r["label"] for r in logged_files(settings_session.storage_uri, "labels")}
    assert labels[f"{done['id']}-0"] == "4"
    assert labels[f"{chat_id}-1"] == json.dumps("a better answer")


def test_feedback_on_an_unknown_or_bad_id_says_so(served_lm):
    answer = send_feedback(served_lm, {"ids": ["cmpl-nosuch"], "labels": [1]})
    assert answer.json() == {"accepted": 0, "unknown_ids": ["cmpl-nosuch"]}
    bad = send_feedback(served_lm, {"ids": ["cmpl-nosuch"], "labels": [None]})
    assert bad.status_code == 422 and "score" in bad.json()["error"]


def scrape() -> str:
    port = ray._private.worker.global_worker.node.metrics_export_port
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return ""


def lm_value(text: str, name: str) -> float:
    """The summed value of series `name` for the tiny LM in a Prometheus text export."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if match and f'model="{LM_NAME}"' in match.group(1):
            total += float(match.group(2))
    return total


def test_prometheus_shows_the_lm_series_with_counts(served_lm):
    for i in range(3):
        complete(served_lm, f"kiln {i}")
    names = (
        "ray_kiln_lm_requests_total",
        "ray_kiln_lm_prompt_tokens_total",
        "ray_kiln_lm_completion_tokens_total",
        "ray_kiln_lm_time_to_first_token_s_count",
        "ray_kiln_lm_inter_token_latency_s_count",
    )
    # Ray exports what replicas record every few seconds.
    assert wait_for(lambda: all(lm_value(scrape(), n) > 0 for n in names), timeout_s=90), [
        (n, lm_value(scrape(), n)) for n in names
    ]
    text = scrape()
    assert lm_value(text, "ray_kiln_lm_requests_total") >= 3
    assert re.search(rf'ray_kiln_lm_kv_cache_usage\{{[^}}]*model="{LM_NAME}"', text)
    assert re.search(rf'ray_kiln_lm_queue_depth\{{[^}}]*model="{LM_NAME}"', text)


def test_the_window_report_and_the_metrics_endpoint_show_the_lm_numbers(
    served_lm, settings_session, registry_session
):
    from kiln.actors.monitor import build_report

    for i in range(2):
        complete(served_lm, f"pots {i}")
    records = {r.version: r for r in ray.get(registry_session.list_versions.remote(LM_NAME))}

    def report() -> dict[str, Any]:
        return build_report(settings_session.storage_uri, LM_NAME, records, 3600)

    assert wait_for(lambda: bool(report()["versions"]), timeout_s=30)
    (entry,) = report()["versions"]
    assert entry["kind"] == "lm" and entry["requests"] >= 2
    assert entry["completion_tokens"] > 0 and entry["prompt_tokens"] > 0
    assert entry["time_to_first_token_ms"]["p50"] > 0
    assert entry["inter_token_latency_ms"]["p99"] >= entry["inter_token_latency_ms"]["p50"] > 0
    assert entry["kv_cache_usage"]["max"] is not None and entry["queue_depth"]["max"] >= 0

    metrics = httpx.get(f"{served_lm}/v1/models/{LM_NAME}/metrics?window=1h", timeout=60)
    assert metrics.status_code == 200, metrics.text
    live = metrics.json()
    assert live["kind"] == "lm" and live["requests"] >= 2  # this replica, since it started
    assert live["window"]["versions"][0]["requests"] >= 2  # the logged window


def test_the_console_fragment_shows_the_lm_numbers(served_lm):
    complete(served_lm, "clay")
    fragment = f"{served_lm}/ui/fragments/models/{LM_NAME}/monitor"
    assert wait_for(lambda: 'class="card lm"' in httpx.get(fragment, timeout=60).text, 30)
    page = httpx.get(fragment, timeout=60)
    assert page.status_code == 200, page.text[:300]
    assert "time to first token p50 / p99 ms" in page.text and 'class="card lm"' in page.text
    assert "cost per 1,000 output tokens" in page.text


def live_replicas() -> list[str]:
    from tests.serving.test_reliability import live_replicas as found

    return found()


@pytest.mark.slow
def test_a_language_model_scaled_to_zero_answers_its_first_request(registered_lm, settings_session):
    from kiln.serving_control import deploy_models

    url = deploy_models(
        settings_session,
        [LM_NAME],
        auth=False,
        min_replicas=0,
        max_replicas=1,
        downscale_delay_s=2,
        upscale_delay_s=0,
    )
    assert wait_for(lambda: not live_replicas(), timeout_s=120), "never scaled to zero"
    started = time.monotonic()
    done = complete(url, "kiln fires")
    assert done["choices"][0]["text"] and done["usage"]["completion_tokens"] > 0
    assert live_replicas()
    print(f"first request after scale-to-zero answered in {time.monotonic() - started:.1f} s")
