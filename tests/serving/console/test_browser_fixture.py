"""The console's browser fixture proves what the /ui tests will lean on.

A Chart.js line chart, loaded from the vendored file and nothing else, draws on its canvas with
no console error; `canvas_is_drawn` tells a drawn canvas from a blank or white one; and a page
that throws or logs an error has it in `page.kiln_errors`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Page

from tests.serving.console.conftest import canvas_is_drawn

VENDOR = Path(__file__).resolve().parents[3] / "serving" / "console" / "static" / "vendor"
CHART_JS = VENDOR / "chart.umd.min.js"

# No animation, fixed size: the chart is fully drawn when `new Chart` returns.
LINE_CHART_JS = """
new Chart(document.getElementById("loss"), {
  type: "line",
  data: {
    labels: [1, 2, 3, 4, 5],
    datasets: [{ label: "loss", data: [0.9, 0.5, 0.3, 0.2, 0.15], borderColor: "#c0392b" }],
  },
  options: { animation: false, responsive: false },
});
"""


def open_html(page: Page, tmp_path: Path, body: str) -> None:
    """Load `body` as a page from a file: no server, no network."""
    html = tmp_path / "page.html"
    html.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'></head><body>{body}</body></html>"
    )
    page.goto(html.as_uri())


def vendored_version() -> str:
    """The Chart.js version the vendor README names (`chart.js@X.Y.Z`)."""
    match = re.search(r"chart\.js@(\d+\.\d+\.\d+)", (VENDOR / "README.md").read_text())
    assert match, "serving/console/static/vendor/README.md names no chart.js@version"
    return match.group(1)


def test_vendored_chart_draws_without_console_errors(page: Page, tmp_path: Path) -> None:
    open_html(page, tmp_path, '<canvas id="loss" width="400" height="200"></canvas>')
    assert not canvas_is_drawn(page, "#loss", timeout_s=0)  # blank before the chart

    page.add_script_tag(path=CHART_JS)
    page.add_script_tag(content=LINE_CHART_JS)

    assert canvas_is_drawn(page, "#loss")
    assert page.evaluate("Chart.version") == vendored_version()
    assert vendored_version().startswith("4.")
    assert page.kiln_errors == []  # type: ignore[attr-defined]


def test_white_or_transparent_canvas_is_not_drawn(page: Page, tmp_path: Path) -> None:
    open_html(
        page,
        tmp_path,
        '<canvas id="blank" width="50" height="50"></canvas>'
        '<canvas id="white" width="50" height="50"></canvas>'
        '<canvas id="dot" width="50" height="50"></canvas><p id="text">x</p>'
        "<script>"
        'const white = document.getElementById("white").getContext("2d");'
        'white.fillStyle = "#fff"; white.fillRect(0, 0, 50, 50);'
        'const dot = document.getElementById("dot").getContext("2d");'
        'dot.fillStyle = "#000"; dot.fillRect(10, 10, 1, 1);'
        "</script>",
    )

    assert not canvas_is_drawn(page, "#blank", timeout_s=0)
    assert not canvas_is_drawn(page, "#white", timeout_s=0)
    assert canvas_is_drawn(page, "#dot", timeout_s=0)  # one black pixel is enough
    with pytest.raises(ValueError, match="not a <canvas>"):
        canvas_is_drawn(page, "#text")
    with pytest.raises(ValueError, match="matches no element"):
        canvas_is_drawn(page, "#missing", timeout_s=0)


def test_page_errors_and_console_errors_are_recorded(page: Page, tmp_path: Path) -> None:
    with page.expect_event("pageerror"), page.expect_console_message(lambda m: m.type == "error"):
        open_html(
            page,
            tmp_path,
            "<script>"
            'console.log("all fine");'
            'console.error("kiln console error");'
            'throw new Error("kiln uncaught");'
            "</script>",
        )

    errors = page.kiln_errors  # type: ignore[attr-defined]
    assert len(errors) == 2, errors  # the console.log is not an error
    assert any(e.startswith("console error") and "kiln console error" in e for e in errors)
    assert any(e.startswith("page error") and "kiln uncaught" in e for e in errors)
