"""Model zoo: every Kiln model is built from a JSON-able spec dict that the registry stores.

The spec is the architecture (`spec.json`); the weights are a safetensors file. Standardisation
statistics are buffers of the model itself, so a served model needs no separate preprocessing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kiln.training.config import MODEL_KINDS
from kiln.training.errors import KilnError
from kiln.training.tabular import Encoding

REGRESSION_KINDS = ("linear", "ridge")
CNN_CHANNELS = (32, 64)
"""Widths of the CNN's two conv blocks unless the spec says otherwise (`channels`)."""


class Standardize(nn.Module):
    """(x - mean) / std with statistics computed over the training shards."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, F)
        return (x - self.mean) / self.std


class Encode(nn.Module):
    """Raw inputs (numeric values with NaN for missing, categorical slots) -> features: the
    torch twin of `kiln.training.tabular.Encoding.expand`, placed by the same index arrays.

    Its buffers are not saved with the weights: they come from the spec (`inputs`), which is
    checksummed with them. Without inputs (a model trained before they were recorded) it is
    the identity.
    """

    numeric_raw: torch.Tensor
    numeric_dest: torch.Tensor
    indicator_raw: torch.Tensor
    indicator_dest: torch.Tensor
    categorical_raw: torch.Tensor
    categorical_offset: torch.Tensor
    impute: torch.Tensor

    def __init__(self, encoding: Encoding | None) -> None:
        super().__init__()
        self.identity = encoding is None
        self.numeric_only = encoding is None or encoding.is_identity
        if encoding is None:
            return
        layout = encoding.layout
        self.num_features = layout.num_features
        for name in (
            "numeric_raw",
            "numeric_dest",
            "indicator_raw",
            "indicator_dest",
            "categorical_raw",
            "categorical_offset",
        ):
            self.register_buffer(name, torch.from_numpy(getattr(layout, name)), persistent=False)
        self.register_buffer("impute", torch.from_numpy(layout.impute), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, R) -> (B, F)
        if self.identity:
            return x
        if self.numeric_only:
            # Training rows of such a model hold no NaN (it would have an indicator): skip.
            return x if self.training else torch.where(torch.isnan(x), self.impute, x)
        out = x.new_zeros((x.shape[0], self.num_features))
        numeric = x[:, self.numeric_raw]
        out[:, self.numeric_dest] = torch.where(torch.isnan(numeric), self.impute, numeric)
        out[:, self.indicator_dest] = torch.isnan(x[:, self.indicator_raw]).to(x.dtype)
        slots = x[:, self.categorical_raw].long() + self.categorical_offset  # (B, C)
        return out.scatter(1, slots, 1.0)


class Project(nn.Module):
    """PCA: standardised features onto the principal components kept (a fixed layer; its
    matrix comes from the spec, as the encoding's buffers do). Identity without PCA."""

    components: torch.Tensor

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        pca = spec.get("pca")
        self.identity = pca is None
        if pca is not None:
            matrix = torch.tensor(pca["components"], dtype=torch.float32)  # (K, F)
            self.register_buffer("components", matrix, persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, K)
        return z if self.identity else z @ self.components.T


class SmallCNN(nn.Module):
    """Two conv blocks for square single-channel images (digits is 8x8). `channels` are the
    two blocks' widths (a pruned model's are smaller)."""

    def __init__(self, side: int, num_outputs: int, channels: tuple[int, int] = (32, 64)) -> None:
        super().__init__()
        self.side = side
        first, second = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, first, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(first, second, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        # The pooled (C, 2, 2) flattened: channel c feeds the head's columns 4c..4c+3.
        self.head = nn.Linear(second * 4, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, side*side) -> (B, out)
        x = x.view(-1, 1, self.side, self.side)
        return self.head(self.features(x).flatten(1))


class KilnModel(nn.Module):
    """Encoding (table inputs), standardisation, PCA when asked, the network body, and (for
    regression) the target's scale restored.

    A regressor's body predicts the standardised target; scaling the target leaves the
    ridge optimum unchanged for the same λ (both terms of J scale by σ²) and keeps the
    optimisation well conditioned whatever the target's units.
    """

    encode: Encode
    standardize: Standardize
    project: Project
    target_mean: torch.Tensor
    target_std: torch.Tensor

    def __init__(
        self,
        num_features: int,
        body: nn.Module,
        encoding: Encoding | None = None,
        project: Project | None = None,
    ) -> None:
        super().__init__()
        self.encode = Encode(encoding)
        self.standardize = Standardize(num_features)
        self.project = project if project is not None else Project({})
        self.body = body
        self.register_buffer("target_mean", torch.zeros(1))
        self.register_buffer("target_std", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.project(self.standardize(self.encode(x)))
        return self.body(z) * self.target_std + self.target_mean


def validate_spec(spec: dict[str, Any]) -> None:
    kind = spec.get("kind")
    if kind not in MODEL_KINDS:
        raise KilnError(f'Got "{kind}" for --model. Choose one of: {", ".join(MODEL_KINDS)}.')
    if spec.get("task") == "classification" and kind in REGRESSION_KINDS:
        raise KilnError(
            f'Got "{kind}" for --model on a classification dataset. '
            "Use logistic, mlp or cnn for classification."
        )
    if spec.get("task") == "regression" and kind in ("logistic", "cnn"):
        raise KilnError(
            f'Got "{kind}" for --model on a regression dataset. Use linear, ridge or mlp.'
        )
    encoding = Encoding.from_spec(spec)
    if kind == "cnn" and encoding is not None and not encoding.all_numeric:
        raise KilnError(
            "--model cnn reads square images of numeric pixels; this table has categorical "
            "columns. Use mlp or logistic, or choose numeric columns with --features."
        )
    if encoding is not None and encoding.num_features != spec["num_features"]:
        raise KilnError(
            f"the spec's inputs encode to {encoding.num_features} features, not "
            f"{spec['num_features']}"
        )
    if kind == "cnn" and math.isqrt(spec["num_features"]) ** 2 != spec["num_features"]:
        raise KilnError(
            f"--model cnn needs square images; got {spec['num_features']} features, "
            "which is not a square number."
        )


def num_outputs(spec: dict[str, Any]) -> int:
    return len(spec["classes"]) if spec["task"] == "classification" else 1


def build_body(spec: dict[str, Any]) -> nn.Module:
    kind, n_in, n_out = spec["kind"], body_inputs(spec), num_outputs(spec)
    if kind in ("linear", "ridge", "logistic"):
        return nn.Linear(n_in, n_out)
    if kind == "cnn":
        first, second = spec.get("channels", CNN_CHANNELS)
        return SmallCNN(math.isqrt(n_in), n_out, (first, second))
    layers: list[nn.Module] = []
    width_in = n_in
    for width in spec.get("hidden", [128, 64]):
        layers += [nn.Linear(width_in, width), nn.ReLU()]
        if spec.get("dropout", 0.0) > 0:
            layers.append(nn.Dropout(spec["dropout"]))
        width_in = width
    layers.append(nn.Linear(width_in, n_out))
    return nn.Sequential(*layers)


def build_model(spec: dict[str, Any]) -> KilnModel:
    """Build an untrained model from its spec (weights come from safetensors)."""
    validate_spec(spec)
    return KilnModel(
        spec["num_features"], build_body(spec), Encoding.from_spec(spec), Project(spec)
    )


def body_inputs(spec: dict[str, Any]) -> int:
    """Inputs of the network body: the principal components kept, else every feature."""
    pca = spec.get("pca")
    return len(pca["components"]) if pca else int(spec["num_features"])


def num_inputs(spec: dict[str, Any]) -> int:
    """Raw values per row the model takes (its features, for a model without inputs)."""
    inputs = spec.get("inputs")
    return len(inputs) if inputs else int(spec["num_features"])


def set_standardization(model: KilnModel, spec: dict[str, Any]) -> None:
    """Copy the statistics of the training shards (kept in the spec) into the model."""
    model.standardize.mean.copy_(torch.tensor(spec["mean"], dtype=torch.float32))
    model.standardize.std.copy_(torch.tensor(spec["std"], dtype=torch.float32))
    if spec["task"] == "regression":
        model.target_mean.fill_(float(spec.get("target_mean", 0.0)))
        model.target_std.fill_(float(spec.get("target_std", 1.0)))


def linear_model(spec: dict[str, Any], weight: Any, bias: Any) -> KilnModel:
    """A linear, ridge or logistic model with the given layer weights (K, F) and biases (K,),
    in the model's standardised space (as the exact and L-BFGS solvers return them)."""
    model = build_model(spec)
    set_standardization(model, spec)
    body: Any = model.body
    with torch.no_grad():
        body.weight.copy_(torch.as_tensor(weight, dtype=torch.float32).reshape(body.weight.shape))
        body.bias.copy_(torch.as_tensor(bias, dtype=torch.float32).reshape(body.bias.shape))
    return model.eval()
