"""int8 language models: a decoder's Linear layers as int8 weights run by torch's dynamic int8
kernels on CPU, stored as plain safetensors under Hugging Face's key names, and the held-out
perplexity that says what the quantisation cost. Plain torch; `cluster/variants.py` brings the
held-out text back through Ray.

- **What is quantised.** Every Linear of every block (q/k/v/o, gate/up/down; GPT-2's Conv1D
  c_attn, c_proj, c_fc) and the output head, per output channel, symmetric (scale = max |w| /
  127). Token embeddings stay fp32: a lookup costs nothing to compute, and keeping them lets a
  tied head be quantised on its own (its int8 copy adds vocab x dim bytes, a quarter of the fp32
  table it reads from). The head is where a small model's decode time goes: SmolLM-135M's
  49152 x 576 head is a fifth of its weights.
- **Files.** `model.layers.0.mlp.up_proj.weight` is the int8 (out, in) tensor (GPT-2's Conv1D
  keeps its (in, out) layout) and `model.layers.0.mlp.up_proj.weight_scale` its (out,) float32
  scales; biases, norms and embeddings keep their names and float32. The spec's `quantization`
  (as tabular int8 models have it, `training/compress.py`) lists the int8 layers, so
  `load_quantized_lm` knows which tensors to expect: nothing is unpickled.
- **Kernels.** On CPU an int8 layer runs `torch.ops.quantized.linear_dynamic` (fbgemm: the
  activations quantised per tensor at run time, int8 x int8 products). Off the CPU (a GPU, or
  a bf16 model) it multiplies by its dequantised weight instead.

Measured on this repository's 2-core AVX2 machine (AMD EPYC, no VNNI), tokens/s of one greedy
request (16 prompt tokens, 32 new, best of 9 interleaved runs, 1 thread), random weights:
SmolLM-135M's shape 14.7 fp32 → 25.3 int8 (2 threads: 15.7 → 28.7); `lm_spec("small")`
111 → 120 (2 threads: 145 → 155), where per-call overhead, not weight bandwidth, bounds a
10M-parameter model. Per decoded token on SmolLM-135M's shape: fp32 84 ms, int8 with an fp32
head 59 ms, int8 head too 38 ms; `torch._weight_int8pack_mm` (int8 weights, fp32 arithmetic)
was 3.4x slower than fp32, and the onednn engine 1.3x slower. The head's int8 copy cost 0.1%
perplexity or less on tiny models trained on `json/*.py`. Resident after loading, SmolLM-135M's
shape takes 398 MiB int8 against 654 MiB fp32 (fbgemm keeps a packed copy of the integers
beside them), and 237 MiB of files against 513.

One caveat of per-tensor activation scales: a row's int8 products depend a little on what
shares its batch, so the engine's "greedy tokens equal a request alone" holds exactly for fp32
only (8 of 8 requests of a tiny model kept every token in a batch of 8).
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from kiln.training.compress import QUANTIZATION_METHOD, SCALE_SUFFIX, is_quantized
from kiln.training.errors import CorruptArtifactError, KilnError
from kiln.training.lm import (
    CausalLM,
    Conv1D,
    Rotary,
    build_lm,
    model_type_of,
    rope_frequencies,
    ties_embeddings,
)

INT8_MAX = 127
EVAL_BATCH = 16
"""Held-out windows per forward when scoring perplexity (as training's evaluation)."""
HEAD = "lm_head"
EMBEDDINGS = {"llama": "model.embed_tokens", "mistral": "model.embed_tokens"}
EMBEDDINGS |= {"qwen2": "model.embed_tokens", "gpt2": "transformer.wte"}
"""The token embedding a tied head shares, by model type."""

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the layer


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W stored as int8 per output channel and its float32 scales.

    `weight` is the int8 tensor in the layout of the layer it replaced ((out, in) for a Linear,
    (in, out) for GPT-2's Conv1D) and `weight_scale` the (out,) scales, so `state_dict()` has
    the Hugging Face key names. On CPU float32 the product runs fbgemm's dynamic int8 kernel on
    weights packed once here; the int8 `weight` shares the memory fbgemm keeps of them.
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self, ints: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, transposed: bool
    ) -> None:
        super().__init__()
        self.transposed = transposed
        rows = ints.t() if transposed else ints  # (out, in)
        self.out_features, self.in_features = rows.shape
        quantized = quantized_weight(rows, scales)
        self._packed = torch.ops.quantized.linear_prepack(quantized, bias)
        # The int8 tensor as a view of the quantised one's storage (not a second copy).
        shared = torch.empty(0, dtype=torch.int8).set_(
            quantized.untyped_storage(), 0, quantized.shape, quantized.stride()
        )
        self.register_buffer("weight", shared.t() if transposed else shared)
        self.register_buffer("weight_scale", scales.to(torch.float32).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if x.device.type == "cpu" and x.dtype == torch.float32:
            return torch.ops.quantized.linear_dynamic(x, self._packed, reduce_range=True)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the int8 one stands for, (out, in)."""
        rows = self.weight.t() if self.transposed else self.weight
        return rows.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantized_weight(ints: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """A per-channel qint8 tensor of the (out, in) integers and their scales, exactly: integers
    times their scales quantise back to the same integers."""
    scales64 = scales.to(torch.float64)
    values = ints.to(torch.float64).mul(scales64[:, None]).float().contiguous()
    zero_points = torch.zeros(len(scales64), dtype=torch.int64)
    with warnings.catch_warnings():  # torch 2.13 deprecates quantised tensors for torchao
        warnings.simplefilter("ignore")
        return torch.quantize_per_channel(values, scales64, zero_points, 0, torch.qint8)


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of an (out, in) float weight: the integers and the (out,) scales
    (an all-zero row gets scale 1)."""
    rows = weight.detach().float()
    peak = rows.abs().amax(dim=1)  # (out,)
    scales = torch.where(peak > 0, peak / INT8_MAX, torch.ones_like(peak))
    ints = torch.round(rows / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return ints, scales


def int8_layer(layer: nn.Linear | Conv1D) -> Int8Linear:
    """The int8 twin of a Linear or Conv1D."""
    transposed = isinstance(layer, Conv1D)
    weight = layer.weight.detach()
    ints, scales = int8_rows(weight.t() if transposed else weight)
    bias = layer.bias.detach() if layer.bias is not None else None
    return Int8Linear(ints.t() if transposed else ints, scales, bias, transposed)


# ----------------------------------------------------------------------------- the model


def quantizable_layers(model: nn.Module) -> list[str]:
    """The names of the model's Linear and Conv1D layers: every block's and the head."""
    return [
        name for name, module in model.named_modules() if isinstance(module, nn.Linear | Conv1D)
    ]


def quantize_lm(model: CausalLM, spec: dict[str, Any]) -> tuple[CausalLM, dict[str, Any]]:
    """An int8 copy of a language model (module docstring) and the spec that rebuilds it."""
    if is_quantized(spec):
        raise KilnError(
            "this version is already quantised (int8); quantise its fp32 parent instead"
        )
    quantized = copy.deepcopy(model).eval()
    layers = quantizable_layers(quantized)
    for name, layer in linear_layers(quantized, layers).items():
        replace_layer(quantized, name, int8_layer(layer))
    new_spec = {
        **spec,
        "quantization": {
            "method": QUANTIZATION_METHOD,
            "scheme": "int8 weights per output channel (symmetric), activations per tensor",
            "layers": layers,
            "engine": torch.backends.quantized.engine,
        },
    }
    return quantized, new_spec


def linear_layers(model: nn.Module, names: list[str]) -> dict[str, nn.Linear | Conv1D]:
    """The named layers, each checked to be a Linear or Conv1D."""
    found: dict[str, nn.Linear | Conv1D] = {}
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear | Conv1D):
            raise CorruptArtifactError(f"the spec lists {name} as int8 but it is no Linear")
        found[name] = layer
    return found


def replace_layer(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    (model.get_submodule(parent) if parent else model).register_module(child, layer)


def quantized_lm_state(model: CausalLM, spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of an int8 language model as saved: int8 weights and their scales, the rest
    float32, a tied fp32 head left out (the embedding holds it)."""
    int8 = set(spec["quantization"]["layers"])
    drop_head = ties_embeddings(spec) and HEAD not in int8
    return {
        name: tensor.detach().cpu().contiguous()
        if tensor.dtype == torch.int8
        else tensor.detach().to("cpu", torch.float32).contiguous()
        for name, tensor in model.state_dict().items()
        if not (drop_head and name == f"{HEAD}.weight")
    }


def load_quantized_lm(spec: dict[str, Any], state: dict[str, torch.Tensor]) -> CausalLM:
    """Rebuild an int8 language model from its spec and `quantized_lm_state` tensors: the
    model of the spec, built without memory, takes the stored float tensors as they are and an
    Int8Linear of the stored integers for each listed layer; names and shapes checked first.
    (Built as an fp32 model first, SmolLM-135M's shape held 810 MiB after loading, more than
    its fp32 version.)"""
    with torch.device("meta"):
        model = build_lm(spec)
    layers = list(spec["quantization"].get("layers", []))
    fp32 = linear_layers(model, layers)
    int8_keys = {f"{name}.{part}" for name in layers for part in ("weight", "bias")}
    int8_keys |= {name + SCALE_SUFFIX for name in layers}
    expected = {k for k in model.state_dict() if k not in int8_keys}
    tied_fp32_head = ties_embeddings(spec) and HEAD not in layers
    if tied_fp32_head:
        expected.discard(f"{HEAD}.weight")
    check_keys(expected, {k for k in state if k not in int8_keys})
    model.load_state_dict({k: state[k].float() for k in expected}, strict=False, assign=True)
    for name, layer in fp32.items():
        replace_layer(model, name, stored_int8_layer(layer, state, name))
    if tied_fp32_head:
        model.get_submodule(HEAD).weight = model.get_submodule(
            EMBEDDINGS[model_type_of(spec)]
        ).weight
    for module in model.modules():
        if isinstance(module, Rotary):  # not saved: computed from the spec
            frequencies = rope_frequencies(spec, model.head_dim)
            module.register_buffer("inv_freq", frequencies, persistent=False)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()]), "a tensor unset"
    return model.eval()


def check_keys(expected: set[str], found: set[str]) -> None:
    if expected != found:
        missing, extra = sorted(expected - found), sorted(found - expected)
        raise CorruptArtifactError(
            f"the int8 weights do not match the spec (missing {missing[:3]}, unexpected "
            f"{extra[:3]})"
        )


def stored_int8_layer(
    layer: nn.Linear | Conv1D, state: dict[str, torch.Tensor], name: str
) -> Int8Linear:
    """The Int8Linear of `layer`'s shape holding the stored integers and scales."""
    try:
        ints, scales = state[f"{name}.weight"], state[name + SCALE_SUFFIX].float()
    except KeyError as exc:
        raise CorruptArtifactError(f"the int8 weights lack {exc.args[0]}") from exc
    bias = state.get(f"{name}.bias")
    transposed = isinstance(layer, Conv1D)
    out_features = layer.weight.shape[1 if transposed else 0]
    if (layer.bias is None) != (bias is None):
        raise CorruptArtifactError(f"the int8 weights of {name} do not match its bias")
    if (
        ints.dtype != torch.int8
        or tuple(ints.shape) != tuple(layer.weight.shape)
        or tuple(scales.shape) != (out_features,)
        or (bias is not None and tuple(bias.shape) != (out_features,))
        or not bool(torch.isfinite(scales).all() and (scales > 0).all())
    ):
        raise CorruptArtifactError(f"the int8 weights of {name} do not match its shape")
    return Int8Linear(ints, scales, bias, transposed)


# ----------------------------------------------------------------------------- perplexity


@torch.inference_mode()
def held_out_loss(model: nn.Module, windows: np.ndarray) -> tuple[float, int]:
    """(Σ token cross-entropy, tokens) of the model over (N, T + 1) windows: inputs are each
    window's first T tokens, targets its last T (as training's evaluation scores them)."""
    total, count = 0.0, 0
    for start in range(0, len(windows), EVAL_BATCH):
        tokens = torch.from_numpy(np.asarray(windows[start : start + EVAL_BATCH], np.int64))
        logits = model(tokens[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum"
        )
        total += float(loss)
        count += tokens[:, 1:].numel()
    return total, count


def perplexity_of(model: nn.Module, windows: np.ndarray) -> float:
    total, count = held_out_loss(model, windows)
    if count == 0:
        raise KilnError("there are no held-out windows to score the model on")
    return math.exp(min(total / count, 50.0))


def perplexity_step(before: float, after: float, windows: np.ndarray) -> dict[str, Any]:
    """The lineage's record of what quantising cost: both perplexities on the same windows and
    the relative change (0.01 = 1% worse)."""
    return {
        "perplexity_before": before,
        "perplexity_after": after,
        "perplexity_change": after / before - 1.0,
        "eval_windows": int(len(windows)),
        "eval_tokens": int(len(windows) * max(windows.shape[1] - 1, 0)) if windows.ndim else 0,
    }


def logit_cosine(reference: nn.Module, other: nn.Module, tokens: torch.Tensor) -> float:
    """Mean cosine similarity of two models' logit vectors over (B, T) tokens."""
    with torch.inference_mode():
        a, b = reference(tokens), other(tokens)  # (B, T, V)
    return float(F.cosine_similarity(a.flatten(0, 1), b.flatten(0, 1), dim=-1).mean())
