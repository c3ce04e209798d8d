"""The console's routes under `/ui`: page shells, their server-rendered bodies, static files.

`GET /ui/...` answers the same static shell for every page (it holds no data and needs no
key); its script fetches `GET /ui/fragments/...` (the same path) with the key as
`Authorization: Bearer` and puts the HTML rendered here into the page. A fragment answers 401
without a live key and 403 for a model the key may not see, as the API does; the shell shows
both. `POST /ui/api/.../explain` is the explain page's one JSON call. The routes stay out of
/openapi.json: they are pages, not API. Read-only: nothing here changes the catalog.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, ConfigDict, Field

from kiln.actors.monitor import parse_window
from kiln.serving.console import pages
from kiln.serving.console.data import Console
from kiln.serving.dependencies import BearerDep
from kiln.serving.explain import MAX_EXPLAIN_STEPS
from kiln.training.errors import KilnError
from kiln.training.explain import METHODS, ExplainConfig, FeatureSpace
from kiln.training.models import num_inputs

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
STATIC_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
DEFAULT_WINDOW = "15m"
REFRESH_S = 5
"""How often the monitoring page asks for its body again."""
MAX_ATTRIBUTIONS_SHOWN = 20
SweepId = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")]
"""What a sweep id looks like (`sweep-<model>-<time>-<hex>`); anything else is a 422 here."""

router = APIRouter(prefix="/ui", include_in_schema=False)


_console_source: list[Callable[[], Console]] = []
"""Where Serve's app finds its replica's Console (`use_console`, set once by serving/app.py)."""


def use_console(source: Callable[[], Console]) -> None:
    """Make `get_console` answer `source()`. Serve's app sets this instead of a FastAPI
    dependency override: with any override present, FastAPI rebuilds every dependency of every
    route on every request (measured: a third of the light model's replica CPU)."""
    _console_source[:] = [source]


async def get_console() -> Console:
    """The Console of the process serving the pages: set by serving/app.py (`use_console`);
    `kiln ui`'s own app overrides this dependency."""
    if not _console_source:
        raise RuntimeError("no console is configured in this application")
    return _console_source[0]()


ConsoleDep = Annotated[Console, Depends(get_console)]


async def get_secret(credentials: BearerDep) -> str | None:
    """The caller's `Authorization: Bearer` secret, if any (the Console judges it)."""
    return credentials.credentials if credentials else None


SecretDep = Annotated[str | None, Depends(get_secret)]


def when(ts: Any) -> str:
    if not isinstance(ts, int | float) or not math.isfinite(ts):
        return ""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def short_json(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters.update(when=when, number=number, short_json=short_json)


def render(template: str, **context: Any) -> HTMLResponse:
    return HTMLResponse(templates.get_template(template).render(**context))


# ----------------------------------------------------------------------------- shells

SHELL_PATHS = (
    "",
    "/",
    "/models/{name}",
    "/models/{name}/variants",
    "/models/{name}/monitor",
    "/models/{name}/versions/{version}",
    "/models/{name}/versions/{version}/explain",
    "/sweeps",
    "/sweeps/{sweep_id}",
)


async def shell(console: ConsoleDep) -> HTMLResponse:
    """The page frame; its script loads the body with the key (module docstring)."""
    return render("shell.html", auth=console.auth is not None)


for _path in SHELL_PATHS:
    router.add_api_route(_path, shell, methods=["GET"], response_class=HTMLResponse)


STATIC_FILES = {
    path.relative_to(STATIC_DIR).as_posix(): path
    for path in STATIC_DIR.rglob("*")
    if path.suffix in STATIC_TYPES
}
"""Every file the console serves, by its path under static/: a request's path is only ever
looked up here, never joined to a folder."""


@router.get("/static/{path:path}")
async def static(path: str) -> Response:
    """Files of serving/console/static only: no other path is reachable from here."""
    target = STATIC_FILES.get(path)
    if target is None:
        raise HTTPException(404, f"no console file {path[:100]!r}")
    return Response(
        target.read_bytes(),
        media_type=STATIC_TYPES[target.suffix],
        headers={"Cache-Control": "max-age=3600"},
    )


# ----------------------------------------------------------------------------- fragments


@router.get("/fragments/models")
async def models_page(console: ConsoleDep, secret: SecretDep) -> HTMLResponse:
    viewer = await console.viewer(secret)
    models = [m for m in await console.models() if viewer.sees(m["name"])]
    # One registry call per model, concurrently: the page waits for the slowest, not the sum.
    numbered = [m for m in models if m["latest_version"] is not None]
    records = await asyncio.gather(
        *(console.version(m["name"], m["latest_version"]) for m in numbered)
    )
    latest = {m["name"]: r for m, r in zip(numbered, records, strict=True)}
    return render("models.html", models=pages.model_rows(models, latest))


@router.get("/fragments/models/{name}")
async def model_page(name: str, console: ConsoleDep, secret: SecretDep) -> HTMLResponse:
    await console.viewer_of(secret, name)
    records, aliases = await console.versions(name), await console.aliases(name)
    return render("model.html", name=name, versions=pages.version_rows(records, aliases))


@router.get("/fragments/models/{name}/versions/{version}")
async def version_page(
    name: str, version: int, console: ConsoleDep, secret: SecretDep
) -> HTMLResponse:
    viewer = await console.viewer_of(secret, name)
    record = await console.version(name, version)
    visible = [m["name"] for m in await console.models() if viewer.sees(m["name"])]
    everything = [
        r for found in await asyncio.gather(*map(console.versions, visible)) for r in found
    ]
    view = pages.version_view(
        record, await console.aliases(name), everything, await console.profiles(name, version)
    )
    return render("version.html", name=name, **view)


@router.get("/fragments/models/{name}/variants")
async def variants_page(name: str, console: ConsoleDep, secret: SecretDep) -> HTMLResponse:
    await console.viewer_of(secret, name)
    rows = await console.variants(name)
    return render("variants.html", name=name, rows=rows, chart=pages.variants_chart(rows))


@router.get("/fragments/models/{name}/monitor")
async def monitor_page(
    name: str,
    console: ConsoleDep,
    secret: SecretDep,
    window: Annotated[str, Query(max_length=16)] = DEFAULT_WINDOW,
) -> HTMLResponse:
    await console.viewer_of(secret, name)
    try:
        window_s = parse_window(window)
    except ValueError as exc:
        raise HTTPException(422, f"window {exc}") from exc
    report, series = await console.monitoring(name, window_s)
    return render(
        "monitor.html",
        name=name,
        window=window,
        refresh_s=REFRESH_S,
        rendered_at=time.time(),
        **pages.monitor_view(report, series),
    )


def refuse_language_model(record: Any) -> None:
    """409 for a language model: feature attributions are for models of table rows."""
    if record.spec.get("kind") == "lm":
        raise HTTPException(
            409, f"{record.ref} is a language model; explanations are for tabular models"
        )


@router.get("/fragments/models/{name}/versions/{version}/explain")
async def explain_page(
    name: str, version: int, console: ConsoleDep, secret: SecretDep
) -> HTMLResponse:
    await console.viewer_of(secret, name)
    record = await console.version(name, version)
    refuse_language_model(record)
    space = FeatureSpace.from_spec(record.spec)
    return render(
        "explain.html",
        name=name,
        record=record,
        inputs=space.input_names,
        rows=await console.sample_rows(record),
        methods=METHODS,
    )


@router.get("/fragments/sweeps")
async def sweeps_page(console: ConsoleDep, secret: SecretDep) -> HTMLResponse:
    viewer = await console.viewer(secret)
    sweeps = [s for s in await console.sweeps() if viewer.sees(str(s.get("name", "")))]
    return render("sweeps.html", sweeps=sweeps)


@router.get("/fragments/sweeps/{sweep_id}")
async def sweep_page(sweep_id: SweepId, console: ConsoleDep, secret: SecretDep) -> HTMLResponse:
    viewer = await console.viewer(secret)
    summary = await console.sweep(sweep_id)
    if not viewer.sees(str(summary.get("name", ""))):
        await console.viewer_of(secret, summary["name"])
    params = sorted({k for t in summary.get("trials", []) for k in t.get("config", {})})
    return render(
        "sweep.html",
        sweep=summary,
        params=params,
        heatmap=pages.heatmap_cells(summary.get("heatmap"), summary.get("mode", "max")),
        charts=pages.sweep_charts(summary),
    )


# ----------------------------------------------------------------------------- explain


class ConsoleExplainRequest(BaseModel):
    """One row to explain: `row` (an index into the stored training sample) or `instance`."""

    model_config = ConfigDict(extra="forbid")
    row: int | None = Field(None, ge=0)
    instance: list[float] | None = Field(None, max_length=100_000)
    method: str = "integrated_gradients"
    n_steps: int = Field(50, ge=1, le=MAX_EXPLAIN_STEPS)


@router.post("/api/models/{name}/versions/{version}/explain")
async def explain_row(
    name: str,
    version: int,
    body: ConsoleExplainRequest,
    console: ConsoleDep,
    secret: SecretDep,
) -> JSONResponse:
    await console.viewer_of(secret, name)
    record = await console.version(name, version)
    refuse_language_model(record)
    try:
        config = ExplainConfig(method=body.method, n_steps=body.n_steps)
    except KilnError as exc:
        raise HTTPException(422, str(exc)) from exc
    x = await chosen_row(console, record, body)
    predictions, explanations = await console.explain(record, x, config)
    space = FeatureSpace.from_spec(record.spec)
    found = explanations[0]
    order = np.argsort(-np.abs(np.asarray(found.attributions)))[:MAX_ATTRIBUTIONS_SHOWN]
    return JSONResponse(
        {
            "ref": record.ref,
            "prediction": predictions[0],
            "method": found.method,
            "target": found.target,
            "baseline": found.baseline,
            "convergence_delta": found.convergence_delta,
            "inputs": [space.input_names[i] for i in order],
            "values": [float(x[0, i]) for i in order],
            "attributions": [found.attributions[i] for i in order],
        }
    )


async def chosen_row(console: Console, record: Any, body: ConsoleExplainRequest) -> np.ndarray:
    """The row to explain as (1, num_inputs) float32, or a 422 that says what to send."""
    width = num_inputs(record.spec)
    if (body.row is None) == (body.instance is None):
        raise HTTPException(422, "send either row (a sample row's index) or instance (values)")
    if body.instance is not None:
        values = body.instance
        if len(values) != width:
            raise HTTPException(
                422,
                f"instance has {len(values)} values; {record.ref} takes {width}, in input order",
            )
        if not all(math.isfinite(v) for v in values):
            raise HTTPException(422, "instance holds a value that is not a finite number")
        return np.asarray([values], dtype=np.float32)
    rows = await console.sample_rows(record)
    if body.row is not None and body.row >= len(rows):
        raise HTTPException(
            422, f"row {body.row} does not exist; {record.ref}'s stored sample has {len(rows)}"
        )
    return np.asarray([rows[body.row or 0]], dtype=np.float32)
