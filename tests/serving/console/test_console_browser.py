"""The console in a real browser (headless Chromium through Playwright), served by Kiln's
Serve app with keys required: the key flow, 401 and 403 shown as such, every page loading
without console errors with its charts drawn, and the monitoring page following new traffic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from tests.serving.console.conftest import CONSOLE_MODEL, canvas_is_drawn
from tests.serving.test_http import digits_test_rows  # noqa: F401 (a fixture)

TIMEOUT_MS = 60_000
SCREENSHOTS = os.environ.get("KILN_SCREENSHOTS")
"""A folder: the page tests also save a screenshot of each page there (README's "Console")."""


SHOT_NAMES = {
    "/ui": "models",
    f"/ui/models/{CONSOLE_MODEL}/versions/1": "version",
    f"/ui/models/{CONSOLE_MODEL}/variants": "variants",
    "/ui/sweeps/console-grid": "sweep-grid",
}


def screenshot(page, name: str) -> None:
    if SCREENSHOTS:
        page.set_viewport_size({"width": 1280, "height": 900})
        page.wait_for_timeout(300)  # Chart.js redraws at the new size on its resize observer
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"))


def with_key(page, secret: str):
    """The key as the console keeps it, set before the page's own scripts run."""
    page.add_init_script(f"sessionStorage.setItem('kiln.apiKey', {secret!r})")
    return page


def open_page(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("#content h1", timeout=TIMEOUT_MS)


def test_the_console_asks_for_a_key_once_and_keeps_it(page, console_url, console_keys):
    open_page(page, f"{console_url}/ui")
    assert page.locator("#content h1").inner_text() == "An API key is needed"
    assert page.locator("#key-form").is_visible()
    page.fill("#key-input", console_keys["model"])
    page.click("#key-form button")
    page.wait_for_selector("#models", timeout=TIMEOUT_MS)
    assert page.locator("#models").inner_text().count(CONSOLE_MODEL) >= 1
    assert "digits-mlp" not in page.locator("#models").inner_text()  # not this key's model
    assert page.locator("#key-state").is_visible() and not page.locator("#key-form").is_visible()
    page.click(f"#models a[href='/ui/models/{CONSOLE_MODEL}']")
    page.wait_for_selector("#versions", timeout=TIMEOUT_MS)  # the next page: no new prompt
    assert page.evaluate("sessionStorage.getItem('kiln.apiKey')") == console_keys["model"]
    assert page.kiln_errors == []


def test_a_refused_key_shows_401_and_asks_again(page, console_url):
    with_key(page, "kiln_0123456789ab_not-a-real-secret")
    open_page(page, f"{console_url}/ui")
    assert page.locator("#error h1").inner_text() == "401 Unauthorized"
    assert "invalid API key" in page.locator("#error").inner_text()
    assert page.locator("#key-form").is_visible()
    assert page.evaluate("sessionStorage.getItem('kiln.apiKey')") is None


def test_a_model_the_key_may_not_see_shows_403(page, console_url, console_keys):
    with_key(page, console_keys["other"])
    open_page(page, f"{console_url}/ui/models/{CONSOLE_MODEL}/versions/1")
    assert page.locator("#error h1").inner_text() == "403 Forbidden"
    assert f"predict:{CONSOLE_MODEL}" in page.locator("#error").inner_text()


@pytest.mark.parametrize(
    ("path", "selector", "charts"),
    [
        ("/ui", "#models", []),
        (f"/ui/models/{CONSOLE_MODEL}", "#versions", []),
        (f"/ui/models/{CONSOLE_MODEL}/versions/1", "#artifacts", ["#curves-chart"]),
        (f"/ui/models/{CONSOLE_MODEL}/variants", "#variants", ["#variants-chart"]),
        ("/ui/sweeps", "#sweeps", []),
        ("/ui/sweeps/console-grid", "#heatmap", ["#trials-chart"]),
    ],
)
def test_each_page_loads_without_errors_and_draws_its_charts(
    page, console_url, console_keys, console_sweeps, path, selector, charts
):
    with_key(page, console_keys["admin"])
    open_page(page, f"{console_url}{path}")
    page.wait_for_selector(selector, timeout=TIMEOUT_MS)
    for chart in charts:
        assert canvas_is_drawn(page, chart), chart
    assert page.kiln_errors == []
    screenshot(page, SHOT_NAMES.get(path, path.strip("/").replace("/", "-")))


def test_the_sweep_page_of_a_lambda_path_draws_the_path(
    page, console_url, console_keys, console_sweeps
):
    with_key(page, console_keys["admin"])
    open_page(page, f"{console_url}/ui/sweeps/{console_sweeps['path']}")
    assert canvas_is_drawn(page, "#path-chart")
    assert page.locator("#trials tbody tr").count() > 50  # one row per λ of the path
    assert "learning rate is not searched" in page.locator("#content").inner_text()
    assert page.locator("#trials tr.best").count() == 1  # the λ it registered
    assert page.kiln_errors == []
    screenshot(page, "sweep")


def test_the_explain_page_draws_the_attributions_of_a_row(page, console_url, console_keys):
    with_key(page, console_keys["model"])
    open_page(page, f"{console_url}/ui/models/{CONSOLE_MODEL}/versions/2/explain")
    page.select_option("#explain-row", "3")
    rows = page.evaluate("JSON.parse(document.getElementById('explain-form').dataset.rows)")
    assert json.loads(page.input_value("#explain-instance")) == rows[3]  # the chosen row shown
    page.click("#explain-form button")
    page.wait_for_selector("#explain-status[data-done]", timeout=TIMEOUT_MS)
    assert "prediction" in page.locator("#explain-status").inner_text()
    assert canvas_is_drawn(page, "#explain-chart")
    assert page.kiln_errors == []
    screenshot(page, "explain")


def test_the_monitoring_page_follows_new_requests_and_feedback(
    page,
    console_url,
    console_keys,
    digits_test_rows,  # noqa: F811
):
    x, y = digits_test_rows

    def post(verb: str, body: dict, key: str) -> dict:
        answer = httpx.post(
            f"{console_url}/v1/models/{CONSOLE_MODEL}:{verb}",
            json=body,
            headers={"Authorization": f"Bearer {console_keys[key]}"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        return answer.json()

    post("predict", {"instances": x[:4].tolist()}, "model")
    with_key(page, console_keys["model"])
    open_page(page, f"{console_url}/ui/models/{CONSOLE_MODEL}/monitor")

    def shown() -> int:
        return int(page.locator("#total-requests").inner_text())

    assert wait_for(lambda: shown() >= 1, timeout_s=60, interval_s=1)
    assert page.locator("#quality-chart").count() == 0  # no feedback yet
    before = shown()
    for start in range(0, 40, 8):
        answer = post("predict", {"instances": x[start : start + 8].tolist()}, "model")
        post(
            "feedback", {"ids": answer["ids"], "labels": y[start : start + 8].tolist()}, "feedback"
        )
    # The page asks for its body again every 5 s; the replica flushes its log every second.
    assert wait_for(lambda: shown() >= before + 5, timeout_s=60, interval_s=1), shown()
    assert wait_for(lambda: page.locator("#quality-chart").count() == 1, timeout_s=60)
    for chart in ("#requests-chart", "#latency-chart", "#quality-chart"):
        assert canvas_is_drawn(page, chart), chart
    card = page.locator(".card[data-version='2']")
    assert "labelled rows" in card.inner_text() and "accuracy" in card.inner_text()
    assert page.kiln_errors == []
    screenshot(page, "monitor")
