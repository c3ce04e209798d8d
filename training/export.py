"""ONNX export of a Kiln model, its int8 form, and the checks that both still answer as it does.

The whole model is exported, encoding layer and PCA projection included, so an ONNX file takes
the raw inputs callers send (NaN for a missing value, a categorical column's slot) and gives
the same raw outputs (logits, or values in the target's units) as the torch model. The batch
dimension is dynamic. `quantize_onnx` applies ONNX Runtime's dynamic quantisation (int8
weights, activations quantised per batch). `check_onnx` runs ONNX Runtime against torch on
given rows and refuses a file that misses the bars of issue 15:

- fp32: max |onnx - torch| <= 1e-4 on every output. A regressor's outputs are in the target's
  units (a standardised prediction times the target's std plus its mean), where float32 itself
  rounds to more than 1e-4 for values past about 1,000, so for a regressor the bar is
  1e-4 * max(1, |torch output|) per value: absolute below 1, relative above.
- int8: the same predicted class on >= 99.5% of the rows. A regressor has no classes; its bar is
  the share of the fp32 predictions' variance the int8 ones reproduce, 1 - SSE/SST >= 0.995.

Plain torch, onnx and onnxruntime, no Ray. torch and onnx are imported inside the functions
that need them: `serving_backend` is called by `kiln serve` before Ray starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.training.errors import KilnError

if TYPE_CHECKING:
    from kiln.training.models import KilnModel

ONNX_FILE = "model.onnx"
INPUT_NAME, OUTPUT_NAME = "inputs", "outputs"
ONNX_INT8 = "int8"
"""The value of a spec's `onnx_quantized` for a variant whose model.onnx has int8 weights."""
ONNX_INT8_METHOD = "onnx-dynamic-int8"
FP32_MAX_ABS_DIFF = 1e-4
INT8_MIN_AGREEMENT = 0.995
TORCH, ONNXRUNTIME, AUTO = "torch", "onnxruntime", "auto"
BACKENDS = (TORCH, ONNXRUNTIME, AUTO)
PLATFORMS = {TORCH: "kiln-pytorch", ONNXRUNTIME: "onnxruntime_onnx"}
"""V2 metadata `platform` of each backend: Triton's name for an ONNX Runtime model; the torch
backend runs eager PyTorch (not TorchScript, so not Triton's pytorch_libtorch)."""
WEIGHTED_OPS = ("Gemm", "MatMul", "Conv")
EXAMPLE_ROWS = 2
"""Rows of the example input traced: not 0 or 1, which torch.export would specialise."""

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- export


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """Silence what the exporters print that a user cannot act on: torch.onnx's notes on
    optional torchvision ops, deprecation warnings, and onnxruntime's advice to preprocess
    (which matters for static quantisation, not for the dynamic kind used here)."""
    names = ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export", "")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def onnx_bytes(model: KilnModel, spec: dict[str, Any]) -> bytes:
    """The model as ONNX bytes: input `inputs` (batch, num_inputs) float32, output `outputs`
    (batch, num_outputs) float32, the batch dimension dynamic (the dynamo exporter)."""
    import torch

    from kiln.training.models import num_inputs

    model = model.eval()  # the encoding layer and dropout act as in serving
    example = torch.zeros((EXAMPLE_ROWS, num_inputs(spec)), dtype=torch.float32)
    with quiet_exporters():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    if program is None:  # only when given a file to write to
        raise RuntimeError("torch.onnx.export returned no program")
    return bytes(program.model_proto.SerializeToString())


def weighted_nodes(data: bytes) -> list[str]:
    """Names of the nodes with weights that int8 quantisation changes, in graph order."""
    import onnx

    graph = onnx.load_model_from_string(data).graph
    return [node.name for node in graph.node if node.op_type in WEIGHTED_OPS]


def quantize_onnx(data: bytes, keep_first_fp32: bool = False) -> bytes:
    """Dynamic int8 quantisation (ONNX Runtime): int8 weights for MatMul/Gemm and Conv, one
    scale per output channel, activations quantised to uint8 on the fly for each batch.
    `keep_first_fp32` leaves the first weighted layer in float32 (see `int8_export`).

    Weights use 7 bits of the 8 (`reduce_range`), as torch's fbgemm quantize_dynamic does: on
    x86 without VNNI (AVX2 alone, as this machine), uint8 x int8 products are summed in pairs
    into int16, which 8-bit weights can overflow. Measured on a logistic model of a table
    (tests/training/test_export.py): the same class on 97.4% of rows with 8-bit weights, and
    on 100% (max |logit diff| 0.38 -> 0.03) with 7-bit per-channel weights, at the same speed.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    excluded: list[str] = []
    if keep_first_fp32:
        first = weighted_nodes(data)[:1]
        # ONNX Runtime splits a Gemm into NAME_MatMul + NAME_Add before it quantises.
        excluded = [*first, *(f"{name}_MatMul" for name in first)]
    with tempfile.TemporaryDirectory(prefix="kiln-onnx-") as folder:
        source = os.path.join(folder, "fp32.onnx")
        target = os.path.join(folder, "int8.onnx")
        with open(source, "wb") as out:
            out.write(data)
        with quiet_exporters():
            quantize_dynamic(
                source,
                target,
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=True,
                nodes_to_exclude=excluded,
            )
        with open(target, "rb") as src:
            return src.read()


def onnxruntime_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


# ----------------------------------------------------------------------------- running


class OnnxModel:
    """An ONNX Runtime session over ONNX bytes, with Kiln's forward: (N, num_inputs) float32
    raw inputs -> (N, K) float32 raw outputs, as `kiln.training.evaluate.predict_outputs` gives."""

    def __init__(self, data: bytes, num_threads: int = 1, gpu: str = "off") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(num_threads))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only: a replica's log is not a debug trace
        self.providers = onnx_providers(gpu, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(data, options, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own types for a bad graph
            raise KilnError(f"{ONNX_FILE} could not be loaded by ONNX Runtime: {exc}") from exc
        self.num_threads = options.intra_op_num_threads

    def forward(self, x: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(x, dtype=np.float32)
        return np.asarray(self.session.run([OUTPUT_NAME], {INPUT_NAME: rows})[0])


def onnx_providers(gpu: str, available: list[str]) -> list[str]:
    """CUDA first when the replica may use a GPU (`gpu` on or auto) and this onnxruntime has
    it, else the CPU alone."""
    if gpu != "off" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# ----------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class OnnxCheck:
    """How an ONNX file's outputs compare with the torch model's on the same rows."""

    rows: int
    max_abs_diff: float
    agreement: float
    """Classifier: the share of rows with the same predicted class. Regressor: 1 - SSE/SST of
    the ONNX predictions against the torch ones."""
    within_tolerance: bool
    """Every output within the fp32 bar (module docstring)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "max_abs_diff": self.max_abs_diff,
            "agreement": self.agreement,
            "within_tolerance": self.within_tolerance,
        }


def compare_outputs(reference: np.ndarray, got: np.ndarray, spec: dict[str, Any]) -> OnnxCheck:
    """The check of `got` (ONNX Runtime) against `reference` (torch) for a model of `spec`."""
    if reference.shape != got.shape:
        raise KilnError(
            f"the ONNX model's outputs have shape {list(got.shape)}; the torch model's "
            f"{list(reference.shape)}"
        )
    diff = np.abs(got.astype(np.float64) - reference.astype(np.float64))
    diff = np.where(np.isnan(diff), np.inf, diff)  # a NaN on one side only is a failure
    max_abs = float(diff.max()) if diff.size else 0.0
    if spec["task"] == "classification":
        tolerance = np.full_like(diff, FP32_MAX_ABS_DIFF)
        agreement = (
            float(np.mean(got.argmax(axis=1) == reference.argmax(axis=1))) if len(got) else 1.0
        )
    else:
        tolerance = FP32_MAX_ABS_DIFF * np.maximum(1.0, np.abs(reference.astype(np.float64)))
        agreement = explained_share(reference[:, 0], got[:, 0])
    return OnnxCheck(len(reference), max_abs, agreement, bool(np.all(diff <= tolerance)))


def explained_share(reference: np.ndarray, got: np.ndarray) -> float:
    """1 - SSE/SST of `got` against `reference` (1.0 when they are equal)."""
    reference = reference.astype(np.float64)
    sse = float(np.sum((reference - got.astype(np.float64)) ** 2))
    sst = float(np.sum((reference - reference.mean()) ** 2)) if len(reference) else 0.0
    if sse == 0.0:
        return 1.0
    return 1.0 - sse / sst if sst > 0 else 0.0


def check_onnx(
    torch_model: KilnModel,
    spec: dict[str, Any],
    onnx_data: bytes,
    x: np.ndarray,
    quantized: bool = False,
) -> dict[str, Any]:
    """Run `onnx_data` and the torch model on rows x (raw inputs); the comparison as a dict,
    or a KilnError when it misses its bar (fp32, or int8 with `quantized`)."""
    from kiln.training.evaluate import predict_outputs

    if len(x) == 0:
        raise KilnError("no rows to check the ONNX model on: the version's test split is empty")
    reference = predict_outputs(torch_model, x)
    check = compare_outputs(reference, OnnxModel(onnx_data).forward(x), spec)
    if quantized and check.agreement < INT8_MIN_AGREEMENT:
        measure = "rows with the same class" if spec["task"] == "classification" else "1 - SSE/SST"
        raise KilnError(
            f"the int8 ONNX model agrees with the torch model on {check.agreement:.2%} "
            f"({measure}) of {check.rows} test rows, under the {INT8_MIN_AGREEMENT:.1%} bar; "
            "serve the fp32 export instead (kiln export REF --format onnx)"
        )
    if not quantized and not check.within_tolerance:
        raise KilnError(
            f"the ONNX export differs from the torch model by up to {check.max_abs_diff:.3g} on "
            f"{check.rows} test rows, over the {FP32_MAX_ABS_DIFF:g} bar; it was not stored "
            "(rerun with --debug and report it: an operator exports wrongly)"
        )
    return {**check.to_dict(), "quantized": ONNX_INT8 if quantized else None}


def int8_export(
    torch_model: KilnModel, spec: dict[str, Any], fp32_data: bytes, x: np.ndarray
) -> tuple[bytes, dict[str, Any]]:
    """The int8 form of an fp32 export that meets the int8 bar on rows x, and its check (with
    `first_layer`: int8 or fp32); a KilnError when no form does.

    Every weighted layer in int8 is tried first (the fastest). Activations are quantised per
    batch over the whole tensor, so the first layer, which reads the standardised inputs, gets
    one scale for every row of a batch: one row with a rare value (a pixel that is almost
    always 0, about 38 standard deviations out on digits) coarsens that layer's inputs for all
    the others. Measured on digits MLPs (64 -> 128 -> 64 -> 10, Adam, batches of 32, 8
    epochs, 4 seeds): the same class on 99.2-99.75% of 397 held-out rows with every layer int8
    (98.9% of the 360 test rows for the one kiln train makes in the tests), 99.75-100% with the
    first layer fp32. The cost: the wide MLP (512 -> 2048 -> 2048 -> 10, 1 thread, batch 1)
    runs in 0.55 ms all-int8, 0.87 ms with its first layer fp32 (fp32: 1.8 ms). So when
    all-int8 misses the bar, the first layer stays fp32, provided another layer is left to
    quantise.
    """
    tried: list[str] = []
    layers = len(weighted_nodes(fp32_data))
    for keep_first in (False, True) if layers > 1 else (False,):
        data = quantize_onnx(fp32_data, keep_first_fp32=keep_first)
        try:
            check = check_onnx(torch_model, spec, data, x, quantized=True)
        except KilnError as exc:
            tried.append(str(exc))
            continue
        return data, {**check, "first_layer": "fp32" if keep_first else "int8"}
    if len(tried) > 1:
        raise KilnError(f"{tried[0]}; with the first layer kept in float32 too: {tried[1]}")
    raise KilnError(tried[0])


def onnx_metrics(
    onnx_data: bytes, spec: dict[str, Any], x: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    """Test metrics of an ONNX model run by ONNX Runtime, with the keys evaluation gives
    (`kiln.training.evaluate.evaluate_model`): labels are class indices or values."""
    from kiln.training.evaluate import outputs_to_predictions
    from kiln.training.metrics import classification_metrics, regression_metrics

    predictions = outputs_to_predictions(OnnxModel(onnx_data).forward(x), spec)
    if spec["task"] == "classification":
        return classification_metrics(labels.astype(np.int64), predictions, len(spec["classes"]))
    return regression_metrics(labels.astype(np.float64), predictions.astype(np.float64))


# ----------------------------------------------------------------------------- serving


def serving_backend(
    spec: dict[str, Any], artifacts: dict[str, str] | list[str], backend: str, ref: str
) -> str:
    """The backend (torch or onnxruntime) a version is served with when `backend` is asked
    for, or a KilnError that says what to do instead. `auto`: onnxruntime when the version
    has model.onnx, else torch."""
    if backend not in BACKENDS:
        raise KilnError(f'Got "{backend}" for --backend. Use torch, onnxruntime or auto.')
    has_onnx = ONNX_FILE in artifacts
    if backend == AUTO:
        return ONNXRUNTIME if has_onnx else TORCH
    if backend == ONNXRUNTIME and not has_onnx:
        raise KilnError(
            f"{ref} has no {ONNX_FILE} to serve with --backend onnxruntime; run "
            f"`kiln export {ref} --format onnx` first, or use --backend torch or auto"
        )
    if backend == TORCH and spec.get("onnx_quantized"):
        raise KilnError(
            f"{ref} is an ONNX {spec['onnx_quantized']} variant: its accuracy is that of its "
            f"{ONNX_FILE}, which only ONNX Runtime runs. Use --backend onnxruntime or auto"
        )
    return backend
