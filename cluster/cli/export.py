"""`kiln export`: a registered version as ONNX (fp32, or int8 as a new version), checked against
the torch model on the version's test rows before anything is stored."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from kiln.cli.common import (
    AddressOpt,
    HomeOpt,
    JsonOpt,
    KeyOpt,
    StorageOpt,
    app,
    check_in_catalog,
    connected,
    console,
    load_settings,
    open_client,
    output,
    preload,
)
from kiln.training.errors import KilnError


@app.command()
def export(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@ALIAS to export.")],
    format: Annotated[
        str,
        typer.Option(help="onnx, or hf for a language model (a folder transformers loads)."),
    ] = "onnx",
    out: Annotated[str | None, typer.Option(help="--format hf: the folder to write.")] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="int8: ONNX Runtime's dynamic int8 quantisation, registered as a new version."
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(help="Rows to check the export on (default: the version's test split)."),
    ] = None,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
    key: KeyOpt = None,
) -> None:
    """Export a registered version to ONNX, checked against torch on its test rows; a language
    model to a Hugging Face folder (--format hf --out DIR)."""
    from kiln.exporting import ExportRequest

    started = time.perf_counter()
    if format == "hf" or out is not None:
        export_hf_folder(ref, format, out, quantize, as_json, address, home, storage, key)
        return
    request = ExportRequest(ref=ref, format=format, quantize=quantize, data=data, key=key)
    settings = load_settings(address=address, home=home, storage=storage)
    if settings.embedded:
        check_in_catalog(settings, request)  # from the SQLite catalog, before Ray starts
    preload("onnxscript")  # the exporter's import (seconds), beside Ray's start
    with connected(settings):
        from kiln.exporting import export_version
        from kiln.runtime import registry_for

        with console.status("exporting") as status:
            done = export_version(
                settings, request, registry_for(settings), lambda step: status.update(step)
            )
    result = done.to_dict() | {"elapsed_s": round(time.perf_counter() - started, 3)}
    output(result, as_json, render_result)


def export_hf_folder(
    ref: str,
    format: str,
    out: str | None,
    quantize: str | None,
    as_json: bool,
    address: str | None,
    home: str | None,
    storage: str | None,
    key: str | None,
) -> None:
    """`kiln export REF --format hf --out DIR`: read from the catalog, no Ray started."""
    from kiln.language import export_hf

    if format != "hf":
        raise KilnError(f"Got --out with --format {format}. --out is for --format hf.")
    if not out:
        raise KilnError("Give the folder to write with --out DIR (--format hf).")
    if quantize:
        raise KilnError("--quantize is for --format onnx; --format hf writes float32 weights.")
    with open_client(address, home, storage, key) as client:
        result = export_hf(client, ref, out)
    output(result, as_json, lambda r: f"wrote {r['ref']} to {r['out']}: {', '.join(r['files'])}")


def render_result(result: dict[str, Any]) -> str:
    check = result["check"]
    rows = f"{check['rows']} test rows"
    if result["quantize"] is None:
        return (
            f"{result['ref']}: {result['file']} (sha256 {result['sha256'][:12]}...) matches torch "
            f"on {rows} (max abs diff {check['max_abs_diff']:.2g}); "
            f"serve it with kiln serve {result['ref']} --backend onnxruntime (or auto)"
        )
    headline = "accuracy" if "accuracy" in result["metrics"] else "r2"
    parent_value = result["parent_metrics"].get(headline)
    was = f" ({result['exported']}: {parent_value:.4f})" if parent_value is not None else ""
    agrees = (
        f"same class as torch on {check['agreement']:.2%} of {rows}"
        if headline == "accuracy"
        else f"1 - SSE/SST against torch {check['agreement']:.4f} on {rows}"
    )
    return (
        f"registered {result['ref']}: ONNX int8 of {result['exported']}, {headline} "
        f"{result['metrics'][headline]:.4f}{was}; {agrees}; "
        f"serve it with kiln serve {result['ref']} (ONNX Runtime)"
    )
