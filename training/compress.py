"""Making a trained model smaller and faster: dynamic int8 quantisation, structured pruning,
and the distillation loss. Plain torch; `cluster/variants.py` runs the training parts on Ray.

Every function here takes a model and its spec and returns a new model and a new spec, so a
compressed variant is rebuilt from its spec like any other version:

- **Pruning** removes whole hidden units of an MLP (whole channels of the CNN) by weight norm,
  so the matrices really shrink: the spec's `hidden` (or `channels`) is smaller and the pruned
  model is an ordinary model of that size. Masks would leave every matrix its size and give
  no speed-up.
- **Quantisation** replaces the body's Linear layers by torch's dynamic int8 Linear
  (`torch.ao.quantization.quantize_dynamic`, per-output-channel symmetric scales). The weights
  are stored as int8 tensors with their float scales in safetensors (`quantized_state`), and
  `load_quantized` rebuilds the int8 layers from them: nothing is unpickled. Why that and not
  torchao's `quantize_`: measured on this machine's AVX2 CPU, one thread, 512→2048→2048→10
  MLP, quantize_dynamic ran a batch of 1 in 0.68 ms and of 64 in 19 ms, torchao's
  Int8DynamicActivationInt8WeightConfig 7.8 ms and 337 ms (fp32 eager: 1.9 ms and 25 ms).
  Conv layers stay fp32: dynamic quantisation has no CPU kernel for them.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as qdynamic
from torch.nn import functional as F

from kiln.training.errors import CorruptArtifactError, KilnError
from kiln.training.models import CNN_CHANNELS, KilnModel, SmallCNN, build_model, set_standardization

QUANTIZATION_METHOD = "dynamic-int8"
INT8_SUFFIX = ".weight_int8"
SCALE_SUFFIX = ".weight_scale"
ZERO_POINT_SUFFIX = ".weight_zero_point"
STUDENT_KINDS = ("mlp",)


# ----------------------------------------------------------------------------- quantisation


def is_quantized(spec: dict[str, Any]) -> bool:
    return spec.get("quantization") is not None


def quantize_model(model: KilnModel, spec: dict[str, Any]) -> tuple[KilnModel, dict[str, Any]]:
    """A dynamic int8 copy of `model` (its body's Linear layers) and the spec that rebuilds it."""
    if is_quantized(spec):
        raise KilnError(
            "this version is already quantised (int8); quantise its fp32 parent instead"
        )
    quantized = copy.deepcopy(model).eval()
    with warnings.catch_warnings():  # torch 2.13 warns that eager quantisation moves to torchao
        warnings.simplefilter("ignore")
        quantized.body = torch.ao.quantization.quantize_dynamic(
            quantized.body,
            {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
            dtype=torch.qint8,
        )
    layers = [name for name, m in quantized.body.named_modules() if isinstance(m, qdynamic.Linear)]
    new_spec = {
        **spec,
        "quantization": {
            "method": QUANTIZATION_METHOD,
            "scheme": "per-channel symmetric",
            "layers": [f"body.{name}" for name in layers],
            "engine": torch.backends.quantized.engine,
        },
    }
    return quantized, new_spec


def quantized_state(model: KilnModel) -> dict[str, torch.Tensor]:
    """Every tensor of a quantised model as plain tensors: the int8 layers' weights (int8), their
    per-channel scales and zero points, and their fp32 biases; everything else as saved."""
    state: dict[str, torch.Tensor] = {}
    int8_layers = {
        f"body.{name}": m
        for name, m in model.body.named_modules()
        if isinstance(m, qdynamic.Linear)
    }
    for name, tensor in model.state_dict().items():
        if not any(name.startswith(prefix + ".") for prefix in int8_layers):
            state[name] = tensor.detach().cpu().contiguous()
    for prefix, layer in int8_layers.items():
        weight = layer.weight()  # a per-channel quantised tensor (out, in)
        state[prefix + INT8_SUFFIX] = weight.int_repr().contiguous()
        state[prefix + SCALE_SUFFIX] = weight.q_per_channel_scales().to(torch.float64).contiguous()
        state[prefix + ZERO_POINT_SUFFIX] = weight.q_per_channel_zero_points().contiguous()
        bias = layer.bias()
        state[prefix + ".bias"] = (
            bias if bias is not None else torch.zeros(weight.shape[0])
        ).detach()
    return state


def load_quantized(spec: dict[str, Any], state: dict[str, torch.Tensor]) -> KilnModel:
    """Rebuild a quantised model from its spec and `quantized_state` tensors.

    The fp32 model is built from the spec, its fp32 tensors loaded, and each listed Linear is
    replaced by a dynamic int8 Linear holding exactly the stored int8 weights and scales.
    """
    model = build_model(spec)
    layers = spec["quantization"].get("layers", [])
    rest = {k: v for k, v in state.items() if not any(k.startswith(p + ".") for p in layers)}
    expected = {k for k in model.state_dict() if not any(k.startswith(p + ".") for p in layers)}
    if set(rest) != expected:
        missing, extra = sorted(expected - set(rest)), sorted(set(rest) - expected)
        raise CorruptArtifactError(
            f"the int8 weights do not match the spec (missing {missing[:3]}, unexpected "
            f"{extra[:3]})"
        )
    model.load_state_dict(rest, strict=False)
    for prefix in layers:
        fp32 = model.get_submodule(prefix)
        if not isinstance(fp32, nn.Linear):
            raise CorruptArtifactError(f"the spec lists {prefix} as int8 but it is no Linear")
        parent_name, _, child = prefix.rpartition(".")
        model.get_submodule(parent_name).register_module(child, int8_linear(fp32, state, prefix))
    return model.eval()


def int8_linear(fp32: nn.Linear, state: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    """A dynamic int8 Linear of `fp32`'s shape with the stored weights, checked for shape."""
    try:
        ints = state[prefix + INT8_SUFFIX]
        scales = state[prefix + SCALE_SUFFIX].to(torch.float64)
        zero_points = state[prefix + ZERO_POINT_SUFFIX].to(torch.int64)
        bias = state[prefix + ".bias"].to(torch.float32)
    except KeyError as exc:
        raise CorruptArtifactError(f"the int8 weights lack {exc.args[0]}") from exc
    out_features, in_features = fp32.weight.shape
    if (
        ints.dtype != torch.int8
        or tuple(ints.shape) != (out_features, in_features)
        or tuple(scales.shape) != (out_features,)
        or tuple(zero_points.shape) != (out_features,)
        or tuple(bias.shape) != (out_features,)
        or not bool(torch.isfinite(scales).all() and (scales > 0).all())
    ):
        raise CorruptArtifactError(f"the int8 weights of {prefix} do not match its shape")
    # Integers times their scales are exactly representable: quantising them back gives the
    # stored integers again.
    weight = torch.quantize_per_channel(
        ints.to(torch.float64).mul(scales[:, None]).float(), scales, zero_points, 0, torch.qint8
    )
    layer = qdynamic.Linear(in_features, out_features, dtype=torch.qint8)
    layer.set_weight_bias(weight, bias)
    return layer


# ----------------------------------------------------------------------------- pruning


def prune_model(
    model: KilnModel, spec: dict[str, Any], fraction: float
) -> tuple[KilnModel, dict[str, Any]]:
    """Remove `fraction` of each hidden layer's units (CNN: channels), the least important by
    weight norm, and return the smaller model and its spec (weights copied, not retrained)."""
    check_fraction(fraction)
    if is_quantized(spec):
        raise KilnError("this version is quantised (int8); prune its fp32 parent instead")
    if spec["kind"] in ("linear", "ridge", "logistic"):
        raise KilnError(
            f"--prune removes hidden units, and a {spec['kind']} model has none: nothing to "
            "prune. Distil it into an MLP (--distill --student mlp:64) or quantise it."
        )
    if spec["kind"] == "cnn":
        return prune_cnn(model, spec, fraction)
    return prune_mlp(model, spec, fraction)


def check_fraction(fraction: float) -> None:
    if not 0 < fraction < 1 or math.isnan(fraction):
        raise KilnError(
            f'Got "{fraction}" for --prune. Give the share of hidden units to remove, in (0, 1), '
            "e.g. 0.5."
        )


def kept_count(width: int, fraction: float) -> int:
    return max(1, int(round(width * (1.0 - fraction))))


def top_units(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in their original order."""
    return torch.topk(scores, keep).indices.sort().values


def prune_mlp(
    model: KilnModel, spec: dict[str, Any], fraction: float
) -> tuple[KilnModel, dict[str, Any]]:
    """Unit j of hidden layer l scores ‖W_l[j, :]‖·‖W_{l+1}[:, j]‖: what flows in times what
    flows out (a unit with either side near zero contributes nothing)."""
    linears = [m for m in model.body.modules() if isinstance(m, nn.Linear)]
    weights = [(lin.weight.detach().clone(), lin.bias.detach().clone()) for lin in linears]
    hidden: list[int] = []
    for layer in range(len(weights) - 1):
        w_in, b_in = weights[layer]
        w_out, b_out = weights[layer + 1]
        scores = w_in.norm(dim=1) * w_out.norm(dim=0)
        keep = top_units(scores, kept_count(len(scores), fraction))
        weights[layer] = (w_in[keep], b_in[keep])
        weights[layer + 1] = (w_out[:, keep], b_out)
        hidden.append(len(keep))
    new_spec = {**spec, "hidden": hidden}
    pruned = build_model(new_spec)
    pruned.load_state_dict(without_body(model.state_dict()), strict=False)
    new_linears = [m for m in pruned.body.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for lin, (w, b) in zip(new_linears, weights, strict=True):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
    return pruned.eval(), new_spec


def prune_cnn(
    model: KilnModel, spec: dict[str, Any], fraction: float
) -> tuple[KilnModel, dict[str, Any]]:
    """Channels scored like MLP units: a kernel's norm times the norm of what reads it."""
    body = model.body
    assert isinstance(body, SmallCNN)
    conv1, conv2 = convolutions(body)
    head = body.head
    first, second = spec.get("channels", CNN_CHANNELS)
    w1, b1 = conv1.weight.detach(), bias_of(conv1).detach()  # (C1, 1, 3, 3)
    w2, b2 = conv2.weight.detach(), bias_of(conv2).detach()  # (C2, C1, 3, 3)
    wh = head.weight.detach().view(head.out_features, second, 4)  # (K, C2, 4)
    keep1 = top_units(
        w1.flatten(1).norm(dim=1) * w2.transpose(0, 1).flatten(1).norm(dim=1),
        kept_count(first, fraction),
    )
    w2 = w2[:, keep1]
    keep2 = top_units(
        w2.flatten(1).norm(dim=1) * wh.transpose(0, 1).flatten(1).norm(dim=1),
        kept_count(second, fraction),
    )
    new_spec = {**spec, "channels": [len(keep1), len(keep2)]}
    pruned = build_model(new_spec)
    pruned.load_state_dict(without_body(model.state_dict()), strict=False)
    new_body = pruned.body
    assert isinstance(new_body, SmallCNN)
    new_conv1, new_conv2 = convolutions(new_body)
    with torch.no_grad():
        new_conv1.weight.copy_(w1[keep1])
        bias_of(new_conv1).copy_(b1[keep1])
        new_conv2.weight.copy_(w2[keep2])
        bias_of(new_conv2).copy_(b2[keep2])
        new_body.head.weight.copy_(wh[:, keep2].reshape(head.out_features, -1))
        new_body.head.bias.copy_(head.bias.detach())
    return pruned.eval(), new_spec


def convolutions(body: SmallCNN) -> tuple[nn.Conv2d, nn.Conv2d]:
    first, second = body.features[0], body.features[2]
    assert isinstance(first, nn.Conv2d) and isinstance(second, nn.Conv2d)
    return first, second


def bias_of(conv: nn.Conv2d) -> torch.Tensor:
    assert conv.bias is not None, "SmallCNN's convolutions have biases"
    return conv.bias


def without_body(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's tensors outside its body (standardisation, target scale)."""
    return {k: v for k, v in state.items() if not k.startswith("body.")}


def count_parameters(model: nn.Module) -> int:
    """Weights and biases, int8 layers included (their packed weights are not parameters)."""
    total = sum(p.numel() for p in model.parameters())
    for layer in model.modules():
        if isinstance(layer, qdynamic.Linear):
            total += layer.weight().numel() + layer.out_features
    return total


# ----------------------------------------------------------------------------- distillation


def parse_student(text: str) -> list[int]:
    """`mlp:64` or `mlp:128,64` -> the student's hidden widths."""
    kind, _, widths = text.partition(":")
    try:
        hidden = [int(w) for w in widths.split(",")] if widths else []
    except ValueError:
        hidden = []
    if kind.strip() not in STUDENT_KINDS or not hidden or any(w < 1 for w in hidden):
        raise KilnError(
            f'Got "{text}" for --student. Give an MLP and its hidden widths, e.g. mlp:64 or '
            "mlp:128,64."
        )
    return hidden


def student_spec(teacher_spec: dict[str, Any], hidden: list[int]) -> dict[str, Any]:
    """The teacher's inputs, standardisation, PCA and classes with an MLP body of `hidden`."""
    spec = {
        k: v
        for k, v in teacher_spec.items()
        if k not in ("quantization", "channels", "hidden", "dropout", "onnx_quantized")
    }
    return {**spec, "kind": "mlp", "hidden": list(hidden)}


def new_student(spec: dict[str, Any]) -> KilnModel:
    model = build_model(spec)
    set_standardization(model, spec)
    return model


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    task: str,
    temperature: float,
    alpha: float,
    target_std: float = 1.0,
) -> torch.Tensor:
    """α·(soft loss) + (1-α)·(hard loss).

    Classification: the soft loss is KL(teacher ‖ student) of the temperature-softened outputs,
    times T² so its gradients keep their size as T changes (Hinton et al., 2015); the hard loss
    is cross-entropy with the labels. Regression: half the squared error to the teacher's
    prediction and to the label, in units of the target's variance (as `objective`).
    """
    if task == "classification":
        soft = F.kl_div(
            F.log_softmax(student / temperature, dim=1),
            F.log_softmax(teacher / temperature, dim=1),
            reduction="batchmean",
            log_target=True,
        ) * (temperature**2)
        hard = F.cross_entropy(student, targets)
    else:
        pred = student.squeeze(-1)
        soft = 0.5 * F.mse_loss(pred, teacher.squeeze(-1)) / target_std**2
        hard = 0.5 * F.mse_loss(pred, targets) / target_std**2
    return alpha * soft + (1.0 - alpha) * hard


def check_distillation(temperature: float, alpha: float) -> None:
    if not temperature > 0 or math.isinf(temperature):
        raise KilnError(f'Got "{temperature}" for --temperature. Use a positive number, e.g. 4.')
    if not 0 <= alpha <= 1:
        raise KilnError(
            f'Got "{alpha}" for --alpha. Give the soft targets\' share of the loss in [0, 1], '
            "e.g. 0.7."
        )
