"""A headless Chromium for the /ui console tests, driven by Playwright's sync API.

The browser is Debian's Chromium (`make browser` installs it with apt), launched through
`executable_path`: Playwright never downloads a browser of its own, so the tests run on an
offline machine. With no Chromium the browser tests skip, and the reason names `make browser`.

Fixtures:
- `chromium_path` (session): `$KILN_CHROMIUM`, else `chromium` or `chromium-browser` on PATH.
- `browser` (package): one headless Chromium for the tests of this folder.
- `page` (function): a Playwright `Page` in a fresh browser context (no cookies or storage
  shared between tests), closed after the test. `page.kiln_errors` is a `list[str]` of the
  page's console messages of type "error" (failed resource loads among them) and its uncaught
  exceptions, each prefixed with where it came from: `assert page.kiln_errors == []`.
  Playwright delivers these events while a Playwright call runs, so assert on the list after
  one (a `canvas_is_drawn`, a `page.evaluate`), or wrap the action in `page.expect_event`.

`canvas_is_drawn(page, selector)` says whether a canvas (a Chart.js chart) has any pixel that
is neither fully transparent nor white, i.e. whether the chart drew anything at all. Import it
with `from tests.serving.console.conftest import canvas_is_drawn`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

# The sandbox needs user namespaces a container or CI runner may not grant; /dev/shm is small
# in containers; there is no GPU to composite with in a headless test.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]

# True when the canvas has a pixel that is neither fully transparent nor pure white; NOT_CANVAS
# (truthy, so a wait ends at once) when the selector names another element; false while nothing
# matches it yet. The canvas is copied onto a 2D canvas first so that the check reads any
# context type (a WebGL canvas too) without touching the chart's own context.
NOT_CANVAS = "not a canvas"
CANVAS_DRAWN_JS = """
(selector) => {
  const canvas = document.querySelector(selector);
  if (canvas === null) return false;
  if (!(canvas instanceof HTMLCanvasElement)) return NOT_CANVAS;
  if (canvas.width === 0 || canvas.height === 0) return false;
  const copy = document.createElement("canvas");
  copy.width = canvas.width;
  copy.height = canvas.height;
  const context = copy.getContext("2d");
  context.drawImage(canvas, 0, 0);
  const rgba = context.getImageData(0, 0, copy.width, copy.height).data;
  for (let i = 0; i < rgba.length; i += 4) {
    const white = rgba[i] === 255 && rgba[i + 1] === 255 && rgba[i + 2] === 255;
    if (rgba[i + 3] !== 0 && !white) return true;
  }
  return false;
}
""".replace("NOT_CANVAS", json.dumps(NOT_CANVAS))


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """The Chromium binary: `$KILN_CHROMIUM` when set, else the one on PATH."""
    chosen = os.environ.get("KILN_CHROMIUM")
    if chosen:
        # A path someone set on purpose: a wrong one fails loudly rather than skipping.
        if not (os.path.isfile(chosen) and os.access(chosen, os.X_OK)):
            pytest.fail(f"KILN_CHROMIUM={chosen} is not an executable file; unset it or fix it.")
        return chosen
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no Chromium on PATH (nor KILN_CHROMIUM): run `make browser`")
    return found


# Package scope, not session: between its calls the sync API leaves its event loop marked as
# this thread's running loop, so while it lives every later test's `asyncio.run()` fails
# (tests/serving/test_auth.py). Stopped after this folder's tests, the loop goes with it.
@pytest.fixture(scope="package")
def browser(chromium_path: str) -> Iterator[Browser]:
    """One headless Chromium for the console tests, closed after the last of them."""
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(
            executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        playwright.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page in a fresh context, recording its console errors in `page.kiln_errors`."""
    context = browser.new_context()
    try:
        new_page = context.new_page()
        errors: list[str] = []
        new_page.kiln_errors = errors  # type: ignore[attr-defined]
        new_page.on("console", lambda message: record_console_error(errors, message))
        new_page.on("pageerror", lambda error: errors.append(f"page error: {error.message}"))
        yield new_page
    finally:
        context.close()


def record_console_error(errors: list[str], message: ConsoleMessage) -> None:
    """Append a console message of type "error", with the script place that logged it."""
    if message.type != "error":
        return
    where = message.location
    errors.append(f"console error at {where.get('url')}:{where.get('lineNumber')}: {message.text}")


def canvas_is_drawn(page: Page, selector: str, timeout_s: float = 5.0) -> bool:
    """Whether the canvas at `selector` has a pixel that is neither transparent nor white.

    Waits up to `timeout_s` for that (a chart may draw after its data arrives); 0 checks once.
    Raises ValueError when the selector matches no element or a non-canvas one, so that a typo
    does not read as a blank chart.
    """
    if timeout_s <= 0:
        drawn = page.evaluate(CANVAS_DRAWN_JS, selector)
    else:
        try:
            handle = page.wait_for_function(CANVAS_DRAWN_JS, arg=selector, timeout=timeout_s * 1000)
            drawn = handle.json_value()
        except PlaywrightTimeoutError:
            drawn = False
    if drawn == NOT_CANVAS:
        raise ValueError(f"{selector!r} matches an element that is not a <canvas>")
    if not drawn and page.locator(selector).count() == 0:
        raise ValueError(f"{selector!r} matches no element on {page.url}")
    return bool(drawn)


# ----------------------------------------------------------------------------- a served model

CONSOLE_MODEL = "console-digits"


@pytest.fixture(scope="package")
def console_versions(trained_digits, settings_session, registry_session):
    """digits-mlp@1's files registered twice under their own name: @1 as trained, @2 as a
    variant of it (lineage parent @1, a compression step), each with a latency profile, so
    the variants page has two points. The profiles are figures written by hand: these tests
    are about the pages, `kiln models profile` is tested in tests/cluster."""
    import ray

    from kiln.actors.registry import read_verified_files

    record = trained_digits.record
    files = read_verified_files(settings_session.storage_uri, record)
    first = ray.get(
        registry_session.register.remote(
            CONSOLE_MODEL, files, record.spec, record.metrics, {**record.lineage, "parent": None}
        )
    )
    second = ray.get(
        registry_session.register.remote(
            CONSOLE_MODEL,
            files,
            record.spec,
            {**record.metrics, "accuracy": record.metrics["accuracy"] - 0.02},
            {
                **record.lineage,
                "parent": first.ref,
                "compression": [{"method": "quantize", "dtype": "int8"}],
            },
        )
    )
    for found, p50 in ((first, 0.50), (second, 0.30)):
        profile = {
            "b1_p50_ms": p50,
            "b1_p99_ms": p50 * 2,
            "b64_p50_ms": p50 * 8,
            "b64_p99_ms": p50 * 12,
            "rows_per_s_b64": 64_000 / (p50 * 8),
            "threads": 1,
        }
        ray.get(
            registry_session.record_profile.remote(CONSOLE_MODEL, found.version, "torch", profile)
        )
    return first, second


@pytest.fixture(scope="package")
def console_keys(registry_session):
    """Secrets of an admin key, a key for the console's model and a key for another model."""
    import ray

    def secret(*scopes: str) -> str:
        return str(ray.get(registry_session.create_key.remote(list(scopes), None))["secret"])

    return {
        "admin": secret("admin"),
        "model": secret(f"predict:{CONSOLE_MODEL}"),
        "feedback": secret(f"feedback:{CONSOLE_MODEL}"),
        "other": secret("predict:some-other-model"),
    }


@pytest.fixture(scope="package")
def console_url(console_versions, settings_session):
    """Kiln's Serve app serving console-digits (its latest, @2) with keys required; the base
    URL, whose /ui is the console."""
    from kiln.serving_control import deploy_models

    return deploy_models(settings_session, [CONSOLE_MODEL], auth=True)


@pytest.fixture(scope="package")
def console_sweeps(console_versions, settings_session, registry_session):
    """Two sweeps in storage: a real λ path (`kiln tune --model ridge` at its defaults on
    diabetes, registered as console-ridge) and a minibatch grid over (lr, λ) of the console's
    model, its trials written by hand through tuning/report.py's summary (a real grid sweep
    takes minutes; tests/tuning/test_sweeps.py runs one and checks its summary)."""
    import time

    from kiln.actors.sources import SourceSpec
    from kiln.actors.sweeps import publish_sweep
    from kiln.requests import SweepRequest
    from kiln.training.config import TrainConfig
    from kiln.tune_pipeline import tune_and_register
    from kiln.tuning.config import SweepConfig
    from kiln.tuning.report import sweep_summary
    from kiln.tuning.space import SearchSpace, default_l2_range
    from kiln.tuning.tuner import TrialSummary

    base = TrainConfig(model="ridge", workers=1)
    request = SweepRequest(
        data="sklearn:diabetes",
        source=SourceSpec(uri="sklearn:diabetes"),
        train=base,
        sweep=SweepConfig(space=SearchSpace.from_dict({"l2": default_l2_range(base)})),
        name="console-ridge",
    )
    path = tune_and_register(settings_session, request, registry_session)
    trials = []
    for i, (lr, l2) in enumerate([(1e-3, 0.0), (1e-3, 1e-2), (1e-2, 0.0), (1e-2, 1e-2)]):
        curve = [0.5 + 0.1 * i + 0.05 * epoch for epoch in range(4)]
        history = [{"epoch": e, "val_accuracy": v, "val_loss": 1 - v} for e, v in enumerate(curve)]
        trials.append(
            TrialSummary(
                trial_id=f"trial-{i}",
                config={"lr": lr, "l2": l2},
                metrics=history[-1],
                best=max(curve),
                epochs=4,
                history=history,
                status="TERMINATED",
            )
        )
    grid = {
        **sweep_summary(trials, "val_accuracy", "max", path=False),
        "sweep_id": "console-grid",
        "name": CONSOLE_MODEL,
        "created_at": time.time(),
        "registered": console_versions[1].ref,
        "best_trial_id": "trial-3",
        "solver": "minibatch",
        "scheduler": "asha",
        "search": "random",
        "selection": "best val_accuracy over the trials",
        "searched": ["lr", "l2"],
        "notes": [],
        "test_metrics": {},
        "elapsed_s": 1.0,
    }
    publish_sweep(settings_session.storage_uri, grid)
    return {"path": path.sweep_id, "grid": "console-grid"}
