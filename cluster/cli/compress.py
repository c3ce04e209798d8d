"""`kiln compress`: a registered version made smaller and faster (distil → prune → quantise),
registered as a new version of the same model with its parent and steps in its lineage. A
language model is quantised only (int8), and scored by its held-out perplexity."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.table import Table

from kiln.cli.common import (
    AddressOpt,
    EpochProgress,
    HomeOpt,
    JsonOpt,
    StorageOpt,
    app,
    check_in_catalog,
    connected,
    load_settings,
    output,
    preload,
)


@app.command()
def compress(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@ALIAS to compress.")],
    quantize: Annotated[
        str | None,
        typer.Option(
            help="int8: dynamic int8 quantisation of the Linear layers (language models too)."
        ),
    ] = None,
    prune: Annotated[
        float | None,
        typer.Option(help="Share of hidden units (CNN: channels) to remove, in (0, 1)."),
    ] = None,
    finetune_epochs: Annotated[
        int, typer.Option(help="Ray Train epochs over the training shards after pruning.")
    ] = 5,
    distill: Annotated[
        bool, typer.Option(help="Train a smaller --student on this model's outputs.")
    ] = False,
    student: Annotated[
        str | None, typer.Option(help="The student of --distill: mlp:64 or mlp:128,64.")
    ] = None,
    temperature: Annotated[
        float, typer.Option(help="--distill: softens the teacher's outputs.")
    ] = 2.0,
    alpha: Annotated[
        float, typer.Option(help="--distill: share of the teacher's soft targets in the loss.")
    ] = 0.5,
    epochs: Annotated[
        int | None, typer.Option(help="--distill epochs (default: the teacher's).")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Training data (default: the dataset in the version's lineage); for a language "
            "model, the text:URI its held-out perplexity is measured on."
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="Ray Train workers for --distill/--prune.")] = 2,
    register: Annotated[
        str | None, typer.Option(help="Register under this name (default: the same model).")
    ] = None,
    register_as: Annotated[str | None, typer.Option(hidden=True)] = None,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
) -> None:
    """Distil, prune and/or quantise a registered version into a new, smaller version."""
    from kiln.cli.aliases import renamed
    from kiln.variants import CompressRequest

    started = time.perf_counter()
    request = CompressRequest(
        ref=ref,
        quantize=quantize,
        prune=prune,
        finetune_epochs=finetune_epochs,
        distill=distill,
        student=student,
        temperature=temperature,
        alpha=alpha,
        epochs=epochs,
        data=data,
        workers=workers,
        register_as=renamed(register, register_as, "--register", "--register-as"),
    )
    settings = load_settings(address=address, home=home, storage=storage)
    if settings.embedded:
        check_in_catalog(settings, request)  # from the SQLite catalog, before Ray starts
    preload("kiln.variants", "kiln.training.loop")
    bar = EpochProgress(None if request.trains else 0, quiet=as_json)
    with bar.progress, connected(settings):
        from kiln.runtime import registry_for
        from kiln.variants import compress_and_register

        done = compress_and_register(settings, request, registry_for(settings), bar.epoch, bar.step)
        bar.step("shutting down")
    output(
        {
            "model": done.record.name,
            "version": done.record.version,
            "parent": done.parent.ref,
            "metrics": done.metrics,
            "parent_metrics": done.parent_metrics,
            "parameters": done.parameters,
            "parent_parameters": done.parent_parameters,
            "steps": done.steps,
            "elapsed_s": time.perf_counter() - started,
        },
        as_json,
        render_result,
    )


def render_result(result: dict[str, Any]) -> Table:
    if "perplexity" in result["metrics"]:
        return render_lm_result(result)
    headline = "accuracy" if "accuracy" in result["metrics"] else "r2"
    table = Table(
        title=f"kiln compress: {result['model']}@{result['version']} from {result['parent']}",
        title_justify="left",
    )
    for column in ("step", "parameters", headline):
        table.add_column(column)
    table.add_row(
        result["parent"],
        f"{result['parent_parameters']:,}",
        fmt(result["parent_metrics"].get(headline)),
    )
    for step in result["steps"]:
        table.add_row(describe(step), f"{step['parameters']:,}", fmt(step.get(f"test_{headline}")))
    return table


def render_lm_result(result: dict[str, Any]) -> Table:
    """A language model's int8 step: held-out perplexity and decode speed, before and after,
    both measured now on the same windows and the same machine."""
    table = Table(
        title=f"kiln compress: {result['model']}@{result['version']} from {result['parent']}",
        title_justify="left",
    )
    for column in ("step", "parameters", "perplexity", "generate tokens/s"):
        table.add_column(column)
    for step in result["steps"]:
        table.add_row(
            result["parent"],
            f"{result['parent_parameters']:,}",
            fmt(step["perplexity_before"]),
            f"{step['generate_tokens_per_s_before']:.1f}",
        )
        table.add_row(
            f"{describe(step)} ({step['perplexity_change']:+.2%} perplexity)",
            f"{step['parameters']:,}",
            fmt(step["perplexity_after"]),
            f"{step['generate_tokens_per_s_after']:.1f}",
        )
    return table


def describe(step: dict[str, Any]) -> str:
    if step["method"] == "distill":
        return f"distill → {step['student']} ({step['epochs']} epochs, T={step['temperature']})"
    if step["method"] == "prune":
        shape = step["to"].get("hidden") or step["to"].get("channels")
        return f"prune {step['fraction']:g} → {shape} (+{step['finetune_epochs']} epochs)"
    return f"quantise {step['method']}"


def fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
