"""Forward passes and metrics shared by training, evaluation and serving.

Serving calls `predict_outputs` too, or the same operations as an `InferencePlan`, so a
served model gives the evaluated model's answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from kiln.training.metrics import classification_metrics, regression_metrics
from kiln.training.models import Encode, KilnModel, Project, Standardize


@torch.inference_mode()
def predict_outputs(
    model: nn.Module, x: np.ndarray, device: torch.device | str = "cpu", max_batch_rows: int = 8192
) -> np.ndarray:
    """Raw model outputs (logits or values) for rows of x, as float32 numpy."""

    def run(chunk: torch.Tensor) -> np.ndarray:
        return model(chunk.to(device).float()).float().cpu().numpy()

    return by_chunks(run, x, max_batch_rows)


def by_chunks(
    run: Callable[[torch.Tensor], np.ndarray], x: np.ndarray, max_batch_rows: int
) -> np.ndarray:
    """`run` over rows of x at most `max_batch_rows` at a time, as tensors sharing the rows'
    memory (a read-only array copied first), the outputs joined; no rows give (0, 1)."""
    if len(x) > max_batch_rows:
        return np.concatenate(
            [run_rows(run, x[i : i + max_batch_rows]) for i in range(0, len(x), max_batch_rows)]
        )
    if len(x) == 0:
        return np.zeros((0, 1), dtype=np.float32)
    return run_rows(run, x)  # one chunk (a request's batch): no list, no copy of the outputs


def run_rows(run: Callable[[torch.Tensor], np.ndarray], x: np.ndarray) -> np.ndarray:
    chunk = np.ascontiguousarray(x)
    if not chunk.flags.writeable:  # shard arrays are read-only views of the object store
        chunk = chunk.copy()
    return run(torch.from_numpy(chunk))


Step = Callable[[torch.Tensor], torch.Tensor]


class InferencePlan:
    """A KilnModel's eval forward pass as a flat list of tensor operations on detached weights.

    Calling the model costs ~45 us for one row of the light serving model (64->256->10) on
    this machine, of which the arithmetic is ~8: the rest is `nn.Module.__call__` seven times
    (hooks, `__getattr__`), autograd's inference mode, the identity layers (encoding, PCA,
    the target's scale for a classifier) and `predict_outputs`' conversions. At one request at
    a time that is a tenth of a request's latency. The plan runs the same operators on the same
    tensors in the same order (`F.linear` is what `nn.Linear` runs, the standardisation the
    same subtraction and division), so its outputs equal the model's (tests compare them
    bit for bit); it only leaves out operations that do nothing in eval mode (dropout, the
    identities, multiplying by 1 and adding 0). A model it does not recognise (a CNN, a
    quantised or pruned layer, any hook or parametrisation) has no plan (`of` gives None) and
    runs through `predict_outputs`.

    Weights are bound at `of`: build the plan after the model is on its device, and again if
    its tensors are replaced (loading weights in place is seen).
    """

    def __init__(self, steps: list[Step], device: torch.device) -> None:
        self.steps = steps
        self.device = device
        self.on_cpu = device.type == "cpu"

    @classmethod
    def of(cls, model: nn.Module, device: torch.device | str = "cpu") -> InferencePlan | None:
        if type(model) is not KilnModel or _needs_the_module_calls(model):
            return None
        floats = (*model.parameters(), model.standardize.mean, model.target_std)
        if any(t.dtype != torch.float32 for t in floats):  # half precision: the model's path
            return None
        if (type(model.encode), type(model.standardize), type(model.project)) != (
            Encode,
            Standardize,
            Project,
        ):
            return None
        steps: list[Step] = []
        encode = model.encode
        if not encode.identity:
            if encode.numeric_only:
                impute = encode.impute.detach()
                steps.append(lambda x: torch.where(torch.isnan(x), impute, x))
            else:
                steps.append(encode)  # gathers and scatters; no weights, so no autograd
        mean, std = model.standardize.mean.detach(), model.standardize.std.detach()
        steps.append(lambda x: (x - mean) / std)
        if not model.project.identity:
            components_t = model.project.components.detach().T
            steps.append(lambda z: z @ components_t)
        body = _body_steps(model.body)
        if body is None:
            return None
        steps += body
        scale, shift = model.target_std.detach(), model.target_mean.detach()
        if not (bool((scale == 1).all()) and bool((shift == 0).all())):
            steps.append(lambda y: y * scale + shift)
        return cls(steps, torch.device(device))

    def __call__(self, x: np.ndarray, max_batch_rows: int = 8192) -> np.ndarray:
        """Raw outputs (N, K) float32 for rows of x, as `predict_outputs` gives them."""
        return by_chunks(self._run, x, max_batch_rows)

    def _run(self, t: torch.Tensor) -> np.ndarray:
        if not self.on_cpu:
            t = t.to(self.device)
        if t.dtype != torch.float32:
            t = t.float()
        for step in self.steps:
            t = step(t)
        return t.numpy() if self.on_cpu else t.float().cpu().numpy()


def _needs_the_module_calls(model: nn.Module) -> bool:
    """Whether the model must run through its modules: one of them is in training mode, or
    runs hooks or parametrisations (pruning's masks are both)."""
    return any(
        m.training or m._forward_hooks or m._forward_pre_hooks or parametrize.is_parametrized(m)
        for m in model.modules()
    )


def _linear(layer: nn.Linear) -> Step:
    weight = layer.weight.detach()
    bias = None if layer.bias is None else layer.bias.detach()
    return lambda x: F.linear(x, weight, bias)


def _body_steps(body: nn.Module) -> list[Step] | None:
    """The body's layers as operations: Linear, ReLU, and Dropout/Identity (nothing in eval);
    None for any other layer."""
    layers = list(body) if type(body) is nn.Sequential else [body]
    steps: list[Step] = []
    for layer in layers:
        if type(layer) is nn.Linear:
            steps.append(_linear(layer))
        elif type(layer) is nn.ReLU:
            steps.append(F.relu)
        elif type(layer) not in (nn.Dropout, nn.Identity):
            return None
    return steps


def outputs_to_predictions(outputs: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Class indices for classifiers, values for regressors."""
    if spec["task"] == "classification":
        return outputs.argmax(axis=1)
    return outputs[:, 0]


def softmax(outputs: np.ndarray) -> np.ndarray:
    shifted = outputs - outputs.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def evaluate_model(model: nn.Module, spec: dict[str, Any], x: np.ndarray, y: np.ndarray) -> dict:
    """Test metrics; y holds class indices (classification) or values (regression)."""
    predictions = outputs_to_predictions(predict_outputs(model, x), spec)
    if spec["task"] == "classification":
        return classification_metrics(y.astype(np.int64), predictions, len(spec["classes"]))
    return regression_metrics(y.astype(np.float64), predictions.astype(np.float64))
