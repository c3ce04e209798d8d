"""Attributions of a Kiln model's predictions to its inputs, computed by Captum.

Kiln writes none of the attribution methods: integrated gradients, feature ablation and
GradientSHAP are Captum's (`captum.attr`). This module is the glue that decides what they
attribute and against which baseline, so `:explain` (serving/explain.py) and `kiln explain`
(cluster/cli/explain.py) answer the same:

- **Space.** Attributions are computed on the model's *encoded features* (the output of its
  `Encode` layer: numbers with missing values imputed, a 0/1 missing-indicator, one-hot
  category slots), then summed per input column. The raw inputs cannot carry gradients: a
  category is an integer slot the model scatters into a one-hot vector, and a missing value is
  a NaN it replaces. Summing a column's features keeps completeness: the per-input attributions
  still add up to f(x) − f(baseline).
- **Baseline.** The training mean in that space: a numeric feature's mean (the spec's
  standardisation statistics), a missing-indicator's share of missing rows, and for a one-hot
  slot its category's share of the training rows (from the category counts in the spec; the
  standardisation leaves one-hot columns at mean 0, so its mean is not the training mean).
  A categorical input's attribution is then how much this row's category moves the output
  away from a row with the training mix of categories: Σ_c w_c·(1[x = c] − p_c) for a linear
  model. A missing numeric value is attributed through its imputed value and its indicator.
- **GradientSHAP** draws its baselines from the training rows stored with the version (the
  drift reference's `sample`, raw inputs encoded as above) when the version has one, and from
  the training marginals otherwise: Gaussian around the mean with the training std for numeric
  features, a category drawn by its training share for a categorical input. The answer's
  `baseline` says which. Its `n_samples` is the request's `n_steps`.
- **Target.** A classifier's attributions are of the target class's logit (the raw output;
  probabilities saturate), the predicted class unless one is asked for; a regressor's of its
  value.

`completeness_gap` is the check integrated gradients must pass: Σ attributions against
f(x) − f(baseline), relative.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from kiln.training.compress import is_quantized
from kiln.training.errors import KilnError
from kiln.training.models import KilnModel
from kiln.training.tabular import CATEGORICAL, NUMERIC, Encoding

logger = logging.getLogger(__name__)

INTEGRATED_GRADIENTS = "integrated_gradients"
FEATURE_ABLATION = "feature_ablation"
GRADIENT_SHAP = "gradient_shap"
METHODS = (INTEGRATED_GRADIENTS, FEATURE_ABLATION, GRADIENT_SHAP)
GRADIENT_METHODS = (INTEGRATED_GRADIENTS, GRADIENT_SHAP)
DEFAULT_STEPS = 50
SHAP_BASELINE_ROWS = 200
"""Baseline rows GradientSHAP draws from (a seeded subset of the reference sample, or generated)."""
INTERNAL_BATCH_ROWS = 4096
"""Rows per forward pass inside integrated gradients (bounds memory for 64 × 200 steps)."""
TRAINING_MEAN = "training mean"
REFERENCE_SAMPLE = "training sample (reference.safetensors)"
GAUSSIAN_SAMPLE = (
    "gaussian around the training mean with the training std (categories by training share); "
    "this version has no reference.safetensors"
)


@dataclass(frozen=True)
class ExplainConfig:
    """One explanation request: the method, its steps, and the target class (a label)."""

    method: str = INTEGRATED_GRADIENTS
    n_steps: int = DEFAULT_STEPS
    """Integrated gradients' steps; GradientSHAP's baseline draws; unused by ablation."""
    target: Any = None
    """A class label as the model predicts it; None: the predicted class (a regressor: None)."""
    seed: int = 0
    """GradientSHAP's draws (the same request explains the same way)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise KilnError(f'Got "{self.method}" for method. Choose one of: {", ".join(METHODS)}.')
        if isinstance(self.n_steps, bool) or not isinstance(self.n_steps, int) or self.n_steps < 1:
            raise KilnError(f'Got "{self.n_steps}" for n_steps. Use a whole number of 1 or more.')


@dataclass(frozen=True)
class FeatureSpace:
    """A model's encoded features and the input column each one belongs to."""

    input_names: list[str]
    feature_names: list[str]
    owner: np.ndarray
    """(F,) the input each feature belongs to."""

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> FeatureSpace:
        encoding = Encoding.from_spec(spec)
        if encoding is None:
            names = [f"x{i}" for i in range(int(spec["num_features"]))]
            return cls(names, names, np.arange(len(names)))
        owner = [i for i, c in enumerate(encoding.inputs) for _ in range(c.width)]
        return cls(encoding.names, encoding.feature_names(), np.asarray(owner, dtype=np.int64))

    @property
    def grouped(self) -> bool:
        """Some input spans several features (a one-hot category, a missing-indicator)."""
        return len(self.input_names) != len(self.feature_names)

    def per_input(self, attributions: np.ndarray) -> np.ndarray:
        """(N, F) feature attributions summed per input: (N, R)."""
        out = np.zeros((attributions.shape[0], len(self.input_names)), dtype=np.float64)
        np.add.at(out.T, self.owner, attributions.T.astype(np.float64))
        return out

    def first_of_group(self, attributions: np.ndarray) -> np.ndarray:
        """(N, F) attributions equal within each input's group (ablation): (N, R)."""
        firsts = np.unique(self.owner, return_index=True)[1]
        return attributions[:, firsts].astype(np.float64)

    def mask(self) -> torch.Tensor:
        """Captum's feature_mask: the features of one input are ablated together. (1, F)"""
        return torch.from_numpy(self.owner).unsqueeze(0)


@dataclass
class Explanation:
    """One instance's attributions (per input), as `:explain` answers them."""

    attributions: list[float]
    method: str
    baseline: str
    target: Any
    convergence_delta: float | None
    feature_attributions: list[float] | None = field(default=None)
    """Per encoded feature (each one-hot slot, each indicator) where inputs span several."""

    def to_dict(self) -> dict[str, Any]:
        out = {
            "attributions": self.attributions,
            "method": self.method,
            "baseline": self.baseline,
            "target": self.target,
            "convergence_delta": self.convergence_delta,
        }
        if self.feature_attributions is not None:
            out["feature_attributions"] = self.feature_attributions
        return out


class FeatureForward(nn.Module):
    """A KilnModel from its encoded features on: standardise, project, body, target scale.

    (B, F) -> (B, K); the same arithmetic as `KilnModel.forward` after its `encode`.
    """

    def __init__(self, model: KilnModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.body(m.project(m.standardize(z))) * m.target_std + m.target_mean


# ------------------------------------------------------------------------------ baselines


def category_shares(spec: dict[str, Any]) -> dict[int, np.ndarray]:
    """Feature offset of each categorical input -> its slots' training shares (kept
    categories, other, missing)."""
    encoding = Encoding.from_spec(spec)
    if encoding is None:
        return {}
    shares: dict[int, np.ndarray] = {}
    offset = 0
    for column in encoding.inputs:
        if column.kind == CATEGORICAL:
            counts = np.asarray([*column.counts, column.other_count, column.missing_count], float)
            total = counts.sum()
            shares[offset] = counts / total if total > 0 else np.zeros(column.width)
        offset += column.width
    return shares


def training_mean(spec: dict[str, Any]) -> np.ndarray:
    """The training rows' mean in the encoded-feature space (F,), float32 (module docstring)."""
    num_features = int(spec["num_features"])
    mean = np.asarray(spec.get("mean", [0.0] * num_features), dtype=np.float64)
    for offset, shares in category_shares(spec).items():
        mean[offset : offset + len(shares)] = shares
    return mean.astype(np.float32)


def training_std(spec: dict[str, Any]) -> np.ndarray:
    """The training rows' std of the numeric features and indicators (F,); one-hot slots get
    √(p(1 − p)) of their share (unused by the sampler, which draws categories whole)."""
    num_features = int(spec["num_features"])
    std = np.asarray(spec.get("std", [1.0] * num_features), dtype=np.float64)
    for offset, shares in category_shares(spec).items():
        std[offset : offset + len(shares)] = np.sqrt(shares * (1 - shares))
    return std.astype(np.float32)


def encode_raw(model: KilnModel, x: np.ndarray) -> torch.Tensor:
    """Raw inputs (N, R) float32 -> encoded features (N, F), through the model's own layer."""
    with torch.no_grad():
        return model.encode.eval()(torch.from_numpy(np.ascontiguousarray(x, np.float32))).float()


def gaussian_baselines(spec: dict[str, Any], num_rows: int, seed: int) -> np.ndarray:
    """(num_rows, F) rows drawn from the training marginals: numeric features Gaussian around
    their mean with their std, indicators 0/1 by their share, a category by its share."""
    rng = np.random.default_rng(seed)
    mean, std = training_mean(spec), training_std(spec)
    rows = rng.normal(mean, std, size=(num_rows, len(mean))).astype(np.float32)
    encoding = Encoding.from_spec(spec)
    if encoding is None:
        return rows
    offset = 0
    for column in encoding.inputs:
        if column.kind == NUMERIC and column.indicator:
            p = mean[offset + 1]
            rows[:, offset + 1] = rng.random(num_rows) < p
        elif column.kind == CATEGORICAL:
            shares = category_shares(spec)[offset]
            slots = rng.choice(len(shares), size=num_rows, p=shares / max(shares.sum(), 1e-12))
            rows[:, offset : offset + column.width] = np.eye(column.width)[slots]
        offset += column.width
    return rows


def shap_baselines(
    model: KilnModel, spec: dict[str, Any], reference_sample: np.ndarray | None, seed: int
) -> tuple[torch.Tensor, str]:
    """GradientSHAP's baseline rows (S, F) and how the answer names them."""
    if reference_sample is not None and len(reference_sample):
        rows = np.asarray(reference_sample, dtype=np.float32)
        if len(rows) > SHAP_BASELINE_ROWS:  # a seeded subset: the sample may be in shard order
            picked = np.random.default_rng(seed).choice(len(rows), SHAP_BASELINE_ROWS, False)
            rows = rows[np.sort(picked)]
        return encode_raw(model, rows), REFERENCE_SAMPLE
    return torch.from_numpy(gaussian_baselines(spec, SHAP_BASELINE_ROWS, seed)), GAUSSIAN_SAMPLE


# ------------------------------------------------------------------------------- targets


def resolve_targets(spec: dict[str, Any], target: Any, outputs: np.ndarray) -> list[int]:
    """The output column to explain per instance: the asked class, else the predicted one."""
    if spec["task"] != "classification":
        if target is not None:
            raise KilnError(f"target {target!r} given, but this model is a regressor; omit it")
        return [0] * len(outputs)
    if target is None:
        return [int(i) for i in np.asarray(outputs).argmax(axis=1)]
    classes = list(spec["classes"])
    for i, label in enumerate(classes):
        if type(label) is type(target) and label == target:  # 1 is not True, nor "1"
            return [i] * len(outputs)
    shown = ", ".join(map(repr, classes[:20])) + (", ..." if len(classes) > 20 else "")
    raise KilnError(f"target {target!r} is not a class of this model; its classes: {shown}")


# ----------------------------------------------------------------------------- explaining


def check_explainable(spec: dict[str, Any], method: str) -> None:
    """A KilnError for a version this method cannot explain faithfully."""
    if spec.get("onnx_quantized"):
        raise KilnError(
            "this version is an ONNX int8 model: its torch weights are its fp32 parent's, so "
            "Kiln cannot explain the int8 answers; explain its parent version instead"
        )
    if is_quantized(spec) and method in GRADIENT_METHODS:
        raise KilnError(
            f"method {method} needs gradients, which int8 layers do not have; use method "
            "feature_ablation, or explain the version's fp32 parent"
        )


def explain_rows(
    model: KilnModel,
    spec: dict[str, Any],
    x: np.ndarray,
    config: ExplainConfig,
    reference_sample: np.ndarray | None = None,
    outputs: np.ndarray | None = None,
) -> list[Explanation]:
    """Explanations of raw inputs x (N, R) float32 by `config.method` (module docstring).

    `outputs` (N, K) are the served answers for x, which pick each instance's predicted class;
    without them the model's own outputs do. `reference_sample` (S, R) is the version's
    training sample (GradientSHAP baselines).
    """
    check_explainable(spec, config.method)
    model = model.eval()
    space = FeatureSpace.from_spec(spec)
    z = encode_raw(model, x)  # (N, F)
    forward = FeatureForward(model).eval()
    if outputs is None:
        with torch.no_grad():
            outputs = forward(z).numpy()
    targets = resolve_targets(spec, config.target, outputs)
    features, deltas, baseline = attribute(model, spec, z, targets, config, reference_sample)
    if config.method == FEATURE_ABLATION:
        per_input = space.first_of_group(features)
    else:
        per_input = space.per_input(features)
    labels = target_labels(spec, targets)
    return [
        Explanation(
            attributions=[float(v) for v in per_input[i]],
            method=config.method,
            baseline=baseline,
            target=labels[i],
            convergence_delta=None if deltas is None else float(deltas[i]),
            feature_attributions=(
                [float(v) for v in features[i]]
                if space.grouped and config.method != FEATURE_ABLATION
                else None
            ),
        )
        for i in range(len(x))
    ]


def target_labels(spec: dict[str, Any], targets: list[int]) -> list[Any]:
    if spec["task"] != "classification":
        return [None] * len(targets)
    return [spec["classes"][t] for t in targets]


def attribute(
    model: KilnModel,
    spec: dict[str, Any],
    z: torch.Tensor,
    targets: list[int],
    config: ExplainConfig,
    reference_sample: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Captum's attributions (N, F) of encoded features z, per-instance convergence deltas
    (None for ablation) and the baseline's name."""
    # Imported here: Captum takes seconds and brings matplotlib, and a replica that never
    # explains (or `kiln` parsing its options) need not pay for it.
    from captum.attr import FeatureAblation, GradientShap, IntegratedGradients

    forward = FeatureForward(model).eval()
    mean = torch.from_numpy(training_mean(spec)).unsqueeze(0)  # (1, F)
    target = torch.as_tensor(targets, dtype=torch.long)
    if config.method == INTEGRATED_GRADIENTS:
        attributions, delta = IntegratedGradients(forward).attribute(
            z,
            baselines=mean.expand_as(z),
            target=target,
            n_steps=config.n_steps,
            internal_batch_size=max(INTERNAL_BATCH_ROWS, 2 * len(z)),
            return_convergence_delta=True,
        )
        return attributions.detach().numpy(), delta.detach().numpy(), TRAINING_MEAN
    if config.method == FEATURE_ABLATION:
        space = FeatureSpace.from_spec(spec)
        with torch.no_grad():
            attributions = FeatureAblation(forward).attribute(
                z,
                baselines=mean,
                target=target,
                feature_mask=space.mask(),
                perturbations_per_eval=min(len(space.input_names), 16),
            )
        return attributions.detach().numpy(), None, TRAINING_MEAN
    baselines, named = shap_baselines(model, spec, reference_sample, config.seed)
    with seeded(config.seed):
        attributions, delta = GradientShap(forward).attribute(
            z,
            baselines=baselines,
            n_samples=config.n_steps,
            stdevs=0.0,
            target=target,
            return_convergence_delta=True,
        )
    per_instance = delta.detach().numpy().reshape(len(z), config.n_steps).mean(axis=1)
    return attributions.detach().numpy(), per_instance, named


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Captum draws GradientSHAP's baselines and points with numpy's global generator (and
    torch's): seed both for the block and restore them after, so one request explains the
    same way every time. (One explain runs at a time per process: serving/explain.py.)"""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        np.random.set_state(state)


def completeness_gap(
    model: KilnModel,
    spec: dict[str, Any],
    x: np.ndarray,
    explanations: list[Explanation],
    baseline: np.ndarray | None = None,
) -> np.ndarray:
    """Per instance |Σ attributions − (f(x) − f(baseline))| / |f(x) − f(baseline)|, for the
    explained target (baseline: the training mean, in the encoded space). (N,)"""
    forward = FeatureForward(model).eval()
    z = encode_raw(model, x)
    base = torch.from_numpy(training_mean(spec) if baseline is None else baseline).unsqueeze(0)
    targets = [
        0 if e.target is None else list(spec["classes"]).index(e.target) for e in explanations
    ]
    with torch.no_grad():
        fx = forward(z).numpy()[np.arange(len(z)), targets]
        fb = forward(base).numpy()[0, targets]
    totals = np.asarray([math.fsum(e.attributions) for e in explanations])
    change = fx.astype(np.float64) - fb
    return np.abs(totals - change) / np.maximum(np.abs(change), 1e-12)
