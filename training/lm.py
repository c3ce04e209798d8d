"""Decoder-only language models in plain torch, with Hugging Face's parameter names.

Kiln trains, imports and serves causal language models from one file, readable like nanoGPT:
a Llama-style transformer (RMSNorm, rotary positions, SwiGLU, grouped-query attention) that
also runs Mistral and Qwen2 checkpoints, and GPT-2. Parameter names equal the keys of
`transformers`' `LlamaForCausalLM` / `GPT2LMHeadModel` state dicts, so a safetensors file moves
between Kiln and Hugging Face with no renaming (`kiln.training.hf_io`). The spec is the model's
`config.json` dict plus `"kind": "lm"`.

The KV cache (`KVCache`) is contiguous per sequence: one preallocated
`(layers, B, kv_heads, max_len, head_dim)` tensor for keys and one for values, and a length per
row. Each forward writes row b's real tokens at slots `lengths[b]...`, so rows of one batch may
hold prompts of different lengths (right padding, `num_new` real tokens per row), and a row can
be reset and refilled while the others keep decoding: what a continuous-batching engine needs.
A padded (B, T) step attends over `max(lengths)` slots with a (B, 1, T, S) mask; a paged cache
would waste less memory, but this one is simple and exact, and the engine owns the choice.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kiln.training.errors import KilnError, check_options

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GPT2LMHeadModel": "gpt2",
}
"""The Hugging Face architectures Kiln runs, and the `model_type` of each."""
MODEL_TYPES = {model_type: arch for arch, model_type in ARCHITECTURES.items()}
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "llama3")
GPT2_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
"""GPT-2's `activation_function` values and the `approximate=` of torch's GELU for each."""
SPECIAL_TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
"""The ids `kiln.training.tokenizer.train_bpe` gives <|bos|>, <|eos|> and <|pad|>."""
MIN_VOCAB_SIZE = 259
"""256 bytes and the 3 special tokens."""

PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"layers": 4, "dim": 96, "heads": 4, "kv_heads": 2, "block_size": 256},
    "small": {"layers": 8, "dim": 288, "heads": 6, "kv_heads": 2, "block_size": 512},
    "base": {"layers": 14, "dim": 768, "heads": 12, "kv_heads": 4, "block_size": 1024},
}
"""About 1M, 10M and 100M parameters with the default 8192-token vocabulary (tied embeddings);
`tests/training/test_lm.py` counts them."""

logger = logging.getLogger(__name__)


# --- specs -------------------------------------------------------------------------------------


def lm_spec(
    size: str = "tiny",
    vocab_size: int = 8192,
    block_size: int | None = None,
    layers: int | None = None,
    dim: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
) -> dict[str, Any]:
    """A Llama spec from a preset, with any option overriding it. `kv_heads` defaults to the
    preset's when `heads` is the preset's too, and to `heads` (no grouping) otherwise."""
    check_options([(size in PRESETS, "--size", size, f"one of {', '.join(PRESETS)}")])
    preset = PRESETS[size]
    num_heads = preset["heads"] if heads is None else heads
    default_kv_heads = preset["kv_heads"] if heads is None else num_heads
    num_kv_heads = default_kv_heads if kv_heads is None else kv_heads
    width = preset["dim"] if dim is None else dim
    context = preset["block_size"] if block_size is None else block_size
    num_layers = preset["layers"] if layers is None else layers
    check_shape_options(vocab_size, context, num_layers, width, num_heads, num_kv_heads)
    return {
        "kind": "lm",
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": width,
        "intermediate_size": swiglu_width(width),
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": width // num_heads,
        "max_position_embeddings": context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        **SPECIAL_TOKEN_IDS,
    }


def check_shape_options(
    vocab_size: int, block_size: int, layers: int, dim: int, heads: int, kv_heads: int
) -> None:
    """A KilnError naming the first option of `lm_spec` that cannot build a model."""
    check_options(
        [
            (vocab_size >= MIN_VOCAB_SIZE, "--vocab-size", vocab_size, "at least 259"),
            (block_size >= 2, "--block-size", block_size, "at least 2"),
            (layers >= 1, "--layers", layers, "at least 1"),
            (heads >= 1, "--heads", heads, "at least 1"),
            (kv_heads >= 1, "--kv-heads", kv_heads, "at least 1"),
        ]
    )
    check_options(  # divisions, once no divisor is 0
        [
            (dim >= 2 and dim % heads == 0, "--dim", dim, f"a multiple of --heads ({heads})"),
            (heads % kv_heads == 0, "--heads", heads, f"a multiple of --kv-heads ({kv_heads})"),
            ((dim // heads) % 2 == 0, "--dim", dim, f"--heads ({heads}) times an even number"),
        ]
    )


def swiglu_width(dim: int) -> int:
    """The MLP width Llama uses for `dim`: 8/3 of it (SwiGLU keeps 4x's parameter count),
    rounded up to a multiple of 32."""
    return 32 * math.ceil(8 * dim / 3 / 32)


def model_type_of(spec: dict[str, Any]) -> str:
    """`llama`, `mistral`, `qwen2` or `gpt2`, from the spec's architecture or model_type."""
    supported = ", ".join(ARCHITECTURES)
    architectures = spec.get("architectures") or []
    if architectures:
        if architectures[0] not in ARCHITECTURES:
            raise KilnError(
                f"The model is a {architectures[0]}; Kiln runs only {supported}: "
                "pick a model of one of these architectures."
            )
        return ARCHITECTURES[architectures[0]]
    model_type = spec.get("model_type")
    if model_type not in MODEL_TYPES:
        raise KilnError(
            f'The model_type "{model_type}" is not one Kiln runs; Kiln runs only {supported}: '
            "pick a model of one of these architectures."
        )
    return str(model_type)


def context_length(spec: dict[str, Any]) -> int:
    """The most positions the model attends over. A sliding-window model (Mistral, Qwen2 with
    use_sliding_window) is held to its window: within it, windowed attention is full attention."""
    model_type = model_type_of(spec)
    if model_type == "gpt2":
        return int(require(spec, "n_positions"))
    context = int(require(spec, "max_position_embeddings"))
    slides = model_type == "mistral" or spec.get("use_sliding_window", False)
    window = spec.get("sliding_window") if slides else None
    return min(context, int(window)) if window else context


def ties_embeddings(spec: dict[str, Any]) -> bool:
    """Whether lm_head shares the token embedding: GPT-2 does unless told not to, and the
    Llama family only when told to (the defaults of their transformers configs)."""
    return bool(spec.get("tie_word_embeddings", model_type_of(spec) == "gpt2"))


def require(spec: dict[str, Any], key: str) -> Any:
    if spec.get(key) is None:
        raise KilnError(f"The model's config has no {key}: add it to config.json.")
    return spec[key]


def build_lm(spec: dict[str, Any]) -> CausalLM:
    """The model a spec describes, randomly initialised (std `initializer_range`)."""
    model_type = model_type_of(spec)
    model: CausalLM = GPT2LM(spec) if model_type == "gpt2" else LlamaLM(spec)
    model.apply(lambda module: init_weights(module, float(spec.get("initializer_range", 0.02))))
    return model


def init_weights(module: nn.Module, std: float) -> None:
    if isinstance(module, nn.Linear | Conv1D):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)


def num_parameters(spec: dict[str, Any]) -> int:
    """Parameters of the model a spec describes (tied weights counted once), without
    allocating them."""
    with torch.device("meta"):
        model = build_lm(spec)
    return sum(parameter.numel() for parameter in model.parameters())


def check_weights(spec: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
    """A KilnError naming the first weight that is missing, unexpected or of the wrong shape.
    A tied lm_head.weight may be absent."""
    with torch.device("meta"):
        expected = build_lm(spec).state_dict()
    if ties_embeddings(spec):
        expected.pop("lm_head.weight", None)
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise KilnError(
            f"The weights do not fit config.json: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}: export the weights and config.json from the same model."
        )
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise KilnError(
                f"{key} has shape {tuple(state_dict[key].shape)} but config.json implies "
                f"{tuple(tensor.shape)}: export the weights and config.json from the same model."
            )


def load_lm(spec: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> CausalLM:
    """The model a spec describes, holding the given weights (cast to the model's float32)."""
    check_weights(spec, state_dict)
    model = build_lm(spec)
    model.load_state_dict(state_dict, strict=not ties_embeddings(spec))
    return model.eval()


# --- the KV cache ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachePlan:
    """Where one forward's tokens go in the cache and what each may attend to."""

    query_slots: torch.Tensor  # (B, T) the slot of every input token, real or padding
    rows: torch.Tensor  # (N,) the row of each real token
    columns: torch.Tensor  # (N,) its column in the input
    slots: torch.Tensor  # (N,) its slot in the cache
    new_lengths: torch.Tensor  # (B,) row lengths after this forward
    mask: torch.Tensor  # (B, 1, T, S) True where a query may attend to a key slot


class KVCache:
    """Keys and values of every layer for B sequences, contiguous per row (module docstring)."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, Hkv, S_max, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, Hkv, S_max, D)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def reset(self, rows: list[int] | None = None) -> None:
        """Forget the given rows (all by default), so new sequences can use them."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[rows] = 0

    def plan(self, seq_len: int, num_new: torch.Tensor | None = None) -> CachePlan:
        """Slots and mask for T input tokens per row, of which `num_new[b]` are real."""
        device = self.lengths.device
        if num_new is None:
            num_new = torch.full_like(self.lengths, seq_len)
        offsets = torch.arange(seq_len, device=device)  # (T,)
        query_slots = self.lengths[:, None] + offsets  # (B, T)
        real = offsets[None, :] < num_new.to(device)[:, None]  # (B, T)
        new_lengths = self.lengths + real.sum(dim=1)  # (B,)
        longest = int(new_lengths.max())
        if longest > self.max_len:
            raise KilnError(
                f"The KV cache holds {self.max_len} positions and this step needs {longest}: "
                "ask for fewer tokens."
            )
        rows, columns = real.nonzero(as_tuple=True)  # (N,), (N,)
        key_slots = torch.arange(max(longest, 1), device=device)  # (S,)
        mask = key_slots[None, None, None, :] <= query_slots[:, None, :, None]  # (B, 1, T, S)
        slots = query_slots[rows, columns]
        return CachePlan(query_slots, rows, columns, slots, new_lengths, mask)

    def store(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: CachePlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's real keys and values (B, Hkv, T, D); return every row's keys and
        values up to the longest row, (B, Hkv, S, D)."""
        k_real = k.transpose(1, 2)[plan.rows, plan.columns]  # (N, Hkv, D)
        v_real = v.transpose(1, 2)[plan.rows, plan.columns]  # (N, Hkv, D)
        self.k[layer][plan.rows, :, plan.slots] = k_real.to(self.k.dtype)
        self.v[layer][plan.rows, :, plan.slots] = v_real.to(self.v.dtype)
        num_slots = plan.mask.shape[-1]
        return self.k[layer, :, :, :num_slots], self.v[layer, :, :, :num_slots]


@dataclass
class Step:
    """What every layer of one forward shares: positions, and the cache and its plan."""

    positions: torch.Tensor  # (B, T)
    cache: KVCache | None = None
    plan: CachePlan | None = None
    cos: torch.Tensor | None = None  # (B, 1, T, D) rotary
    sin: torch.Tensor | None = None  # (B, 1, T, D)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step, layer: int, scale: float
) -> torch.Tensor:
    """Causal attention of q (B, H, T, D) over this step's keys and values (B, Hkv, T, D) and,
    with a cache, over the row's earlier ones; grouped-query when Hkv < H."""
    if step.cache is None or step.plan is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    k, v = step.cache.store(layer, k, v, step.plan)  # (B, Hkv, S, D)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=step.plan.mask, scale=scale, enable_gqa=True
    )  # (B, H, T, D)


class CausalLM(nn.Module):
    """What the Llama and GPT-2 models share: cache creation and the bookkeeping of a step."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = spec
        self.context = context_length(spec)
        self.num_layers = 0
        self.num_kv_heads = 0
        self.head_dim = 0

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty cache for `batch_size` sequences of at most `max_len` (the context)."""
        parameter = next(self.parameters())
        return KVCache(
            self.num_layers,
            batch_size,
            self.num_kv_heads,
            min(max_len or self.context, self.context),
            self.head_dim,
            dtype=parameter.dtype,
            device=parameter.device,
        )

    def begin_step(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None,
        positions: torch.Tensor | None,
        num_new: torch.Tensor | None,
    ) -> Step:
        batch_size, seq_len = input_ids.shape
        plan = None
        if cache is not None:
            assert cache.batch_size == batch_size, "one input row per cache row"
            plan = cache.plan(seq_len, num_new)
        if positions is None:
            default = torch.arange(seq_len, device=input_ids.device).expand(batch_size, -1)
            positions = plan.query_slots if plan is not None else default  # (B, T)
        self.check_positions(positions, plan)
        return Step(positions=positions, cache=cache, plan=plan)

    def check_positions(self, positions: torch.Tensor, plan: CachePlan | None) -> None:
        real = positions[plan.rows, plan.columns] if plan is not None else positions
        if real.numel() and int(real.max()) >= self.context:
            raise KilnError(
                f"Position {int(real.max())} is past the model's context of {self.context} "
                "tokens: shorten the prompt or ask for fewer tokens."
            )

    @staticmethod
    def end_step(step: Step) -> None:
        if step.cache is not None and step.plan is not None:
            step.cache.lengths.copy_(step.plan.new_lengths)


# --- Llama, Mistral, Qwen2 ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LlamaShape:
    """The sizes and switches of a Llama-family model, read once from its spec."""

    vocab_size: int
    dim: int
    mlp_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> LlamaShape:
        if spec.get("hidden_act", "silu") != "silu":
            raise KilnError(
                f'config.json asks for hidden_act "{spec["hidden_act"]}"; Kiln runs Llama-family '
                'models with "silu" only.'
            )
        dim, num_heads = (
            int(require(spec, "hidden_size")),
            int(require(spec, "num_attention_heads")),
        )
        num_kv_heads = int(spec.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise KilnError(
                f"config.json: num_attention_heads ({num_heads}) must be a multiple of "
                f"num_key_value_heads ({num_kv_heads})."
            )
        attention_bias = bool(spec.get("attention_bias", False))
        return cls(
            vocab_size=int(require(spec, "vocab_size")),
            dim=dim,
            mlp_dim=int(require(spec, "intermediate_size")),
            num_layers=int(require(spec, "num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(spec.get("head_dim") or dim // num_heads),
            eps=float(spec.get("rms_norm_eps", 1e-6)),
            # Qwen2 has biases on q, k and v (and says so nowhere in its config).
            qkv_bias=attention_bias or model_type_of(spec) == "qwen2",
            out_bias=attention_bias,
            mlp_bias=bool(spec.get("mlp_bias", False)),
        )


def rope_settings(spec: dict[str, Any]) -> dict[str, Any]:
    """Rotary settings, from `rope_parameters` (transformers 5), `rope_scaling` (4) or the
    top-level `rope_theta`: a dict with rope_type and rope_theta at least."""
    settings = dict(spec.get("rope_parameters") or spec.get("rope_scaling") or {})
    settings.setdefault("rope_theta", spec.get("rope_theta", 10000.0))
    settings["rope_type"] = settings.get("rope_type", settings.get("type", "default"))
    if settings["rope_type"] not in ROPE_TYPES:
        raise KilnError(
            f'config.json asks for rope_type "{settings["rope_type"]}"; Kiln runs '
            f"{' and '.join(ROPE_TYPES)} rotary positions only."
        )
    return settings


def rope_frequencies(spec: dict[str, Any], head_dim: int) -> torch.Tensor:
    """The rotation speed of each pair of channels, (D/2,)."""
    settings = rope_settings(spec)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # (D/2,)
    inv_freq = 1.0 / (float(settings["rope_theta"]) ** exponents)
    if settings["rope_type"] == "llama3":
        inv_freq = llama3_frequencies(inv_freq, settings)
    return inv_freq


def llama3_frequencies(inv_freq: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's context extension: slow channels (wavelength above the original context /
    low_freq_factor) turn `factor` times slower, fast ones (below / high_freq_factor) stay,
    and those between blend the two."""
    factor = float(settings["factor"])
    low, high = float(settings["low_freq_factor"]), float(settings["high_freq_factor"])
    original = float(settings["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    blend = (original / wavelength - low) / (high - low)
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, blended)
    return torch.where(wavelength < original / high, inv_freq, scaled)


class Rotary(nn.Module):
    """cos and sin of every position's rotation, in Hugging Face Llama's half-split layout."""

    inv_freq: torch.Tensor

    def __init__(self, spec: dict[str, Any], head_dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_frequencies(spec, head_dim), persistent=False)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (B, T) -> 2 x (B, 1, T, D)
        freqs = positions[..., None].float() * self.inv_freq.float()  # (B, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return angles.cos()[:, None].to(dtype), angles.sin()[:, None].to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated: the first half of each head pairs with the second half."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (B, H, T, D)
    return x * cos + rotated_half * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, shape: LlamaShape, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = shape.num_heads, shape.num_kv_heads
        self.head_dim = shape.head_dim
        q_dim, kv_dim = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
        self.q_proj = nn.Linear(shape.dim, q_dim, bias=shape.qkv_bias)
        self.k_proj = nn.Linear(shape.dim, kv_dim, bias=shape.qkv_bias)
        self.v_proj = nn.Linear(shape.dim, kv_dim, bias=shape.qkv_bias)
        self.o_proj = nn.Linear(q_dim, shape.dim, bias=shape.out_bias)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        assert step.cos is not None and step.sin is not None
        q, k = rotate(q, step.cos, step.sin), rotate(k, step.cos, step.sin)  # (B, H|Hkv, T, D)
        y = attend(q, k, v, step, self.layer, self.head_dim**-0.5)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(shape.dim, shape.mlp_dim, bias=shape.mlp_bias)
        self.up_proj = nn.Linear(shape.dim, shape.mlp_dim, bias=shape.mlp_bias)
        self.down_proj = nn.Linear(shape.mlp_dim, shape.dim, bias=shape.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, shape: LlamaShape, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(shape.dim, shape.eps)
        self.self_attn = LlamaAttention(shape, layer)
        self.post_attention_layernorm = RMSNorm(shape.dim, shape.eps)
        self.mlp = SwiGLU(shape)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        x = x + self.self_attn(self.input_layernorm(x), step)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """Everything below the head: Hugging Face's `model.` prefix."""

    def __init__(self, spec: dict[str, Any], shape: LlamaShape) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.dim)
        self.layers = nn.ModuleList(LlamaBlock(shape, i) for i in range(shape.num_layers))
        self.norm = RMSNorm(shape.dim, shape.eps)
        self.rotary_emb = Rotary(spec, shape.head_dim)


class LlamaLM(CausalLM):
    """Llama, and Mistral and Qwen2, which differ from it only in settings."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        shape = LlamaShape.from_spec(spec)
        self.num_layers, self.num_kv_heads = shape.num_layers, shape.num_kv_heads
        self.head_dim = shape.head_dim
        self.model = LlamaBody(spec, shape)
        self.lm_head = nn.Linear(shape.dim, shape.vocab_size, bias=False)
        if ties_embeddings(spec):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        num_new: torch.Tensor | None = None,
    ) -> torch.Tensor:  # (B, T) -> (B, T, V)
        """Logits of every input token. With a cache, row b's first `num_new[b]` tokens (all by
        default) extend its sequence and the rest are padding; `positions` (B, T) overrides
        the rotary positions, which default to the tokens' places in their sequences."""
        step = self.begin_step(input_ids, cache, positions, num_new)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        step.cos, step.sin = self.model.rotary_emb(step.positions, x.dtype)
        for block in self.model.layers:
            x = block(x, step)  # (B, T, C)
        self.end_step(step)
        return self.lm_head(self.model.norm(x))  # (B, T, V)


# --- GPT-2 -------------------------------------------------------------------------------------


class Conv1D(nn.Module):
    """GPT-2's linear layer: weight stored (in, out), y = x @ W + b."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(
            *x.shape[:-1], -1
        )


@dataclass(frozen=True, kw_only=True)
class GPT2Shape:
    vocab_size: int
    dim: int
    mlp_dim: int
    num_layers: int
    num_heads: int
    context: int
    eps: float
    approximate: str
    scale_by_layer: bool
    scale: bool

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> GPT2Shape:
        activation = spec.get("activation_function", "gelu_new")
        if activation not in GPT2_ACTIVATIONS:
            raise KilnError(
                f'config.json asks for activation_function "{activation}"; Kiln runs GPT-2 '
                f"with {', '.join(GPT2_ACTIVATIONS)} only."
            )
        dim, num_heads = int(require(spec, "n_embd")), int(require(spec, "n_head"))
        if dim % num_heads:
            raise KilnError(f"config.json: n_embd ({dim}) must be a multiple of n_head.")
        return cls(
            vocab_size=int(require(spec, "vocab_size")),
            dim=dim,
            mlp_dim=int(spec.get("n_inner") or 4 * dim),
            num_layers=int(require(spec, "n_layer")),
            num_heads=num_heads,
            context=int(require(spec, "n_positions")),
            eps=float(spec.get("layer_norm_epsilon", 1e-5)),
            approximate=GPT2_ACTIVATIONS[activation],
            scale_by_layer=bool(spec.get("scale_attn_by_inverse_layer_idx", False)),
            scale=bool(spec.get("scale_attn_weights", True)),
        )


class GPT2Attention(nn.Module):
    def __init__(self, shape: GPT2Shape, layer: int) -> None:
        super().__init__()
        self.layer, self.num_heads = layer, shape.num_heads
        self.head_dim = shape.dim // shape.num_heads
        self.c_attn = Conv1D(shape.dim, 3 * shape.dim)
        self.c_proj = Conv1D(shape.dim, shape.dim)
        self.scale = (self.head_dim**-0.5 if shape.scale else 1.0) / (
            layer + 1 if shape.scale_by_layer else 1
        )

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=-1)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = attend(q, k, v, step, self.layer, self.scale)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class GPT2MLP(nn.Module):
    def __init__(self, shape: GPT2Shape) -> None:
        super().__init__()
        self.c_fc = Conv1D(shape.dim, shape.mlp_dim)
        self.c_proj = Conv1D(shape.mlp_dim, shape.dim)
        self.approximate = shape.approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class GPT2Block(nn.Module):
    def __init__(self, shape: GPT2Shape, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(shape.dim, eps=shape.eps)
        self.attn = GPT2Attention(shape, layer)
        self.ln_2 = nn.LayerNorm(shape.dim, eps=shape.eps)
        self.mlp = GPT2MLP(shape)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln_1(x), step)
        return x + self.mlp(self.ln_2(x))


class GPT2Body(nn.Module):
    """Everything below the head: Hugging Face's `transformer.` prefix."""

    def __init__(self, shape: GPT2Shape) -> None:
        super().__init__()
        self.wte = nn.Embedding(shape.vocab_size, shape.dim)
        self.wpe = nn.Embedding(shape.context, shape.dim)
        self.h = nn.ModuleList(GPT2Block(shape, i) for i in range(shape.num_layers))
        self.ln_f = nn.LayerNorm(shape.dim, eps=shape.eps)


class GPT2LM(CausalLM):
    """GPT-2: learned positions, LayerNorm, GELU MLP, heads of equal count for q, k and v."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        shape = GPT2Shape.from_spec(spec)
        self.num_layers, self.num_kv_heads = shape.num_layers, shape.num_heads
        self.head_dim = shape.dim // shape.num_heads
        self.transformer = GPT2Body(shape)
        self.lm_head = nn.Linear(shape.dim, shape.vocab_size, bias=False)
        if ties_embeddings(spec):
            self.lm_head.weight = self.transformer.wte.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        num_new: torch.Tensor | None = None,
    ) -> torch.Tensor:  # (B, T) -> (B, T, V)
        """As `LlamaLM.forward`; positions index the learned position table."""
        step = self.begin_step(input_ids, cache, positions, num_new)
        # Padding tokens may sit past the table; only real tokens are checked to fit.
        places = step.positions.clamp(max=self.context - 1)  # (B, T)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(places)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, step)  # (B, T, C)
        self.end_step(step)
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
