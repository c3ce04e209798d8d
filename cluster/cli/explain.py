"""`kiln explain`: a registered version's attributions for one or a few rows, on the driver.

The version's torch model is rebuilt from its checksummed files (any backend: an ONNX export
keeps its spec.json and weights) and explained by training/explain.py, the same code the served
`:explain` runs, so no model needs to be served. On the embedded default it reads the local
catalog and store without starting Ray; with --address it asks the cluster's Registry actor.
The rows come as JSON (`--instance`, as `:predict` takes them) or as row N of a dataset
(`--row N --data URI`, counted from 0 in the table as stored, before any split).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

from kiln.cli.common import (
    AddressOpt,
    HomeOpt,
    JsonOpt,
    StorageOpt,
    app,
    console,
    open_client,
    output,
)
from kiln.training.errors import KilnError

if TYPE_CHECKING:
    import numpy as np

# training/explain.py's names, repeated so that `kiln` (every command imports this module)
# does not import torch and Captum to parse its options (test_explain_cli checks they agree).
METHODS = ("integrated_gradients", "feature_ablation", "gradient_shap")
INTEGRATED_GRADIENTS = METHODS[0]
DEFAULT_STEPS = 50

MAX_PLOTTED = 6
"""Instances drawn in one --plot figure (one panel each)."""
MAX_BARS = 20
"""Inputs per panel: the largest attributions; the rest are summed into one bar."""


@app.command()
def explain(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@ALIAS to explain.")],
    instance: Annotated[
        str | None,
        typer.Option(
            help="The row as JSON, as :predict takes it: '[0, 1.5, ...]', '{\"age\": 31, ...}' "
            "or a list of such rows."
        ),
    ] = None,
    row: Annotated[
        int | None, typer.Option(help="Explain row N (from 0) of --data instead.")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="The dataset --row is read from (a URI or sklearn:NAME).")
    ] = None,
    method: Annotated[str, typer.Option(help=", ".join(METHODS) + ".")] = INTEGRATED_GRADIENTS,
    target: Annotated[
        str | None,
        typer.Option(
            help="The class to explain (default: the predicted one); none for a regressor."
        ),
    ] = None,
    steps: Annotated[
        int, typer.Option(help="Integrated gradients' steps; GradientSHAP's baseline draws.")
    ] = DEFAULT_STEPS,
    plot: Annotated[
        Path | None, typer.Option(help="Write the attributions as a bar chart to FILE.png.")
    ] = None,
    as_json: JsonOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
) -> None:
    """Attribute a version's prediction to its inputs (Captum), sorted by size."""
    from kiln.training.explain import ExplainConfig, explain_rows
    from kiln.training.models import num_inputs

    started = time.perf_counter()
    check_options(instance, row, data, plot)
    with open_client(address, home, storage) as client:
        record = client.resolve(ref)
        storage_uri = str(client._call("get_storage_uri"))
    spec = record.spec
    config = ExplainConfig(method=method, n_steps=steps, target=target_value(spec, target))
    x = read_instances(spec, instance) if instance is not None else read_row(spec, data, row)
    if x.shape[1] != num_inputs(spec):  # a synthetic set of another width
        raise KilnError(f"{ref} takes {num_inputs(spec)} values a row; got {x.shape[1]}")
    from kiln.serving.explain import load_explained
    from kiln.training.evaluate import predict_outputs

    with console.status(f"explaining {record.ref} ({method})"):
        explained = load_explained(storage_uri, record)
        outputs = predict_outputs(explained.model, x)
        explanations = explain_rows(explained.model, spec, x, config, explained.reference, outputs)
    result = explain_result(record.ref, spec, x, outputs, explanations)
    result["elapsed_s"] = round(time.perf_counter() - started, 3)
    if plot is not None:
        write_plot(result, plot)
        console.print(f"wrote {plot}", markup=False)
    output(result, as_json, render_result)


def check_options(
    instance: str | None, row: int | None, data: str | None, plot: Path | None
) -> None:
    """One line naming the bad option before anything loads."""
    if (instance is None) == (row is None):
        raise KilnError("Give either --instance JSON or --row N --data URI (one of them).")
    if row is not None and data is None:
        raise KilnError(f"Got --row {row} without --data. Say which dataset: --data URI.")
    if row is not None and row < 0:
        raise KilnError(f'Got "{row}" for --row. Rows count from 0.')
    if plot is not None and plot.suffix.lower() != ".png":
        raise KilnError(f'Got "{plot}" for --plot. Give a file name ending in .png.')


def target_value(spec: dict[str, Any], text: str | None) -> Any:
    """--target as the class it names (classes may be numbers, booleans or strings)."""
    if text is None:
        return None
    if spec["task"] != "classification":
        raise KilnError(f'Got "{text}" for --target, but {spec["kind"]} here is a regressor.')
    for label in spec["classes"]:
        if class_text(label) == text.strip().lower() or str(label) == text:
            return label
    shown = ", ".join(class_text(c) for c in spec["classes"][:20])
    raise KilnError(f'Got "{text}" for --target. Choose one of the classes: {shown}.')


def class_text(label: Any) -> str:
    return str(label).lower() if isinstance(label, bool) else str(label)


def read_instances(spec: dict[str, Any], text: str) -> np.ndarray:
    """--instance JSON as raw inputs (N, num_inputs), checked as :predict checks a body."""
    from kiln.serving.host import numeric_rows
    from kiln.serving.schemas import RequestError
    from kiln.training.tabular import Encoding

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise KilnError(f"Got {text[:40]!r} for --instance, which is not JSON: {exc}") from exc
    single = isinstance(value, dict) or (
        isinstance(value, list) and not any(isinstance(v, list | dict) for v in value)
    )
    instances = [value] if single else value
    if not isinstance(instances, list) or not instances:
        raise KilnError("Got an empty --instance. Give a row: '[v1, v2, ...]' or an object.")
    encoding = Encoding.from_spec(spec)
    try:
        if encoding is not None:
            return encoding.rows_to_inputs(instances)
        return numeric_rows(instances, int(spec["num_features"]))
    except (RequestError, ValueError) as exc:
        raise KilnError(f"--instance: {exc}") from exc


def read_row(spec: dict[str, Any], data: str | None, row: int | None) -> np.ndarray:
    """Row N of a dataset as the version's raw inputs (1, num_inputs)."""
    from kiln.actors.sources import load_file_table, load_sklearn, parse_synthetic, synthetic_rows
    from kiln.training.data import batch_features
    from kiln.training.tabular import Encoding

    assert data is not None and row is not None  # check_options
    if data.startswith("synthetic:"):
        synthetic = parse_synthetic(data)
        check_row(row, synthetic.rows, data)
        return batch_features(synthetic_rows(synthetic, row, row + 1)).copy()
    table = (
        load_sklearn(data.split(":", 1)[1])
        if data.startswith("sklearn:")
        else (load_file_table(data))
    )
    check_row(row, table.num_rows, data)
    values = table.slice(row, 1).to_pylist()[0]
    encoding = Encoding.from_spec(spec)
    if encoding is None:
        raise KilnError(
            "this version records no input names, so a table row cannot be matched to its "
            "inputs; give the values with --instance '[...]'"
        )
    absent = [n for n in encoding.names if n not in values]
    if absent:
        raise KilnError(
            f"{data} has no column {absent[0]!r}, an input of this model; its inputs: "
            f"{encoding.names_preview()}"
        )
    try:
        return encoding.rows_to_inputs([{n: values[n] for n in encoding.names}])
    except ValueError as exc:
        raise KilnError(f"row {row} of {data}: {exc}") from exc


def check_row(row: int, num_rows: int, data: str) -> None:
    if row >= num_rows:
        raise KilnError(f'Got "{row}" for --row; {data} has {num_rows} rows (0 to {num_rows - 1}).')


# ------------------------------------------------------------------------------- output


def explain_result(
    ref: str, spec: dict[str, Any], x: np.ndarray, outputs: np.ndarray, explanations: list
) -> dict[str, Any]:
    """The command's result: the HTTP answer's fields, plus each row's values as given."""
    from kiln.training.evaluate import outputs_to_predictions
    from kiln.training.explain import FeatureSpace

    predicted = outputs_to_predictions(outputs, spec).tolist()
    if spec["task"] == "classification":
        predicted = [spec["classes"][i] for i in predicted]
    space = FeatureSpace.from_spec(spec)
    return {
        "ref": ref,
        "predictions": predicted,
        "inputs": space.input_names,
        "values": [shown_values(spec, r) for r in x],
        "explanations": [e.to_dict() for e in explanations],
    }


def shown_values(spec: dict[str, Any], raw: np.ndarray) -> list[Any]:
    """A row's raw inputs as a person reads them: numbers, category names, null if missing."""
    from kiln.training.tabular import CATEGORICAL, MISSING, OTHER, Encoding

    encoding = Encoding.from_spec(spec)
    shown: list[Any] = []
    for j, value in enumerate(raw.tolist()):
        column = encoding.inputs[j] if encoding is not None else None
        if column is not None and column.kind == CATEGORICAL:
            names = [*column.categories, OTHER, MISSING]
            shown.append(names[int(value)])
        else:
            shown.append(None if math.isnan(value) else value)
    return shown


def render_result(result: dict[str, Any]) -> Group:
    """Per row: a headline, then its inputs by |attribution|, largest first."""
    parts: list[Any] = []
    for i, explanation in enumerate(result["explanations"]):
        attributions = explanation["attributions"]
        total = sum(abs(a) for a in attributions) or 1.0
        table = Table("input", "value")
        table.add_column("attribution", justify="right")
        table.add_column("share", justify="right")
        for j in sorted(range(len(attributions)), key=lambda j: -abs(attributions[j])):
            table.add_row(
                result["inputs"][j],
                value_text(result["values"][i][j]),
                f"{attributions[j]:+.4g}",
                f"{abs(attributions[j]) / total:.1%}",
            )
        parts += [Text(f"{result['ref']} row {i}: {headline(result, i)}", style="bold"), table]
    return Group(*parts)


def value_text(value: Any) -> str:
    if value is None:
        return "(missing)"
    return f"{value:g}" if isinstance(value, float) else str(value)


def headline(result: dict[str, Any], i: int) -> str:
    e = result["explanations"][i]
    target = "" if e["target"] is None else f", explaining {e['target']}"
    delta = e["convergence_delta"]
    shown = "" if delta is None else f", convergence delta {delta:.2g}"
    return (
        f"predicted {result['predictions'][i]}{target} ({e['method']}, baseline: "
        f"{e['baseline'].split(';')[0]}{shown})"
    )


def write_plot(result: dict[str, Any], path: Path) -> None:
    """Horizontal bars of each row's largest attributions, one panel per row."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    explanations = result["explanations"][:MAX_PLOTTED]
    bars = min(MAX_BARS, len(result["inputs"]))
    fig, axes = plt.subplots(
        len(explanations), 1, figsize=(7, 0.35 * bars * len(explanations) + 1.2), squeeze=False
    )
    for i, (ax, explanation) in enumerate(zip(axes[:, 0], explanations, strict=True)):
        names, values = top_bars(result["inputs"], explanation["attributions"], MAX_BARS)
        colours = ["#c0392b" if v < 0 else "#2e86c1" for v in values]
        ax.barh(range(len(values)), values, color=colours)
        ax.set_yticks(range(len(values)), names, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_title(f"{result['ref']} row {i}: {headline(result, i)}", fontsize=8)
    axes[-1, 0].set_xlabel("attribution (output units)")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise KilnError(f'Got "{path}" for --plot, which cannot be written: {exc}') from exc
    finally:
        plt.close(fig)


def top_bars(names: list[str], values: list[float], most: int) -> tuple[list[str], list[float]]:
    """The `most` largest |values| (the rest summed as one bar), largest first."""
    order = sorted(range(len(values)), key=lambda j: -abs(values[j]))
    if len(order) <= most:
        return [names[j] for j in order], [values[j] for j in order]
    kept, rest = order[: most - 1], order[most - 1 :]
    return (
        [names[j] for j in kept] + [f"{len(rest)} others"],
        [values[j] for j in kept] + [float(sum(values[j] for j in rest))],
    )
