"""The plain-torch language model: presets and their validation, Hugging Face key names, and
the KV cache, which must give the logits of a full forward however the tokens arrive (one by
one, in chunks, in padded rows of different lengths, in a row reset while others decode)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from kiln.training import tokenizer as kiln_tokenizer  # noqa: E402
from kiln.training.errors import KilnError  # noqa: E402
from kiln.training.lm import (  # noqa: E402
    SPECIAL_TOKEN_IDS,
    CausalLM,
    KVCache,
    LlamaLM,
    build_lm,
    context_length,
    lm_spec,
    num_parameters,
)

VOCAB_SIZE = 300
GPT2_SPEC: dict[str, Any] = {
    "kind": "lm",
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 64,
    "vocab_size": VOCAB_SIZE,
}


def small_spec(**overrides: Any) -> dict[str, Any]:
    spec = lm_spec("tiny", vocab_size=VOCAB_SIZE, block_size=64, layers=2, dim=32, heads=4)
    return {**spec, "num_key_value_heads": 2, "initializer_range": 0.1, **overrides}


def seeded(spec: dict[str, Any]) -> CausalLM:
    torch.manual_seed(0)
    return build_lm(spec).eval()


MODELS = {"llama": lambda: seeded(small_spec()), "gpt2": lambda: seeded(GPT2_SPEC)}


def random_ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB_SIZE, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("size", "target"), [("tiny", 1e6), ("small", 1e7), ("base", 1e8)])
def test_presets_have_their_nominal_size(size: str, target: float) -> None:
    count = num_parameters(lm_spec(size, vocab_size=8192))
    assert 0.65 * target <= count <= 1.35 * target


def test_num_parameters_counts_the_built_model() -> None:
    spec = small_spec(tie_word_embeddings=False)
    model = build_lm(spec)
    assert num_parameters(spec) == sum(p.numel() for p in model.parameters())
    assert num_parameters(small_spec()) == num_parameters(spec) - VOCAB_SIZE * 32


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"dim": 100, "heads": 8}, "--dim"),
        ({"heads": 6, "kv_heads": 4}, "--heads"),
        ({"dim": 96, "heads": 32}, "--dim"),  # head_dim 3: rotary needs an even one
        ({"layers": 0}, "--layers"),
        ({"heads": 0}, "--heads"),
        ({"kv_heads": 0}, "--kv-heads"),
        ({"block_size": 1}, "--block-size"),
        ({"vocab_size": 100}, "--vocab-size"),
        ({"size": "huge"}, "--size"),
    ],
)
def test_lm_spec_names_the_bad_option(options: dict[str, Any], flag: str) -> None:
    with pytest.raises(KilnError, match=f"for {flag}. {flag} must be") as raised:
        lm_spec(**options)
    assert "\n" not in str(raised.value)


def test_lm_spec_overrides_and_defaults() -> None:
    spec = lm_spec("small", vocab_size=1000, block_size=128, heads=8)
    assert (spec["num_attention_heads"], spec["num_key_value_heads"]) == (8, 8)
    assert spec["head_dim"] * 8 == spec["hidden_size"]
    assert context_length(spec) == 128
    assert lm_spec("tiny")["num_key_value_heads"] < lm_spec("tiny")["num_attention_heads"]


def test_special_ids_match_the_tokenizer() -> None:
    ids = (kiln_tokenizer.BOS_ID, kiln_tokenizer.EOS_ID, kiln_tokenizer.PAD_ID)
    assert tuple(SPECIAL_TOKEN_IDS.values()) == ids


def test_parameter_names_equal_transformers_keys() -> None:
    spec = lm_spec("tiny", vocab_size=VOCAB_SIZE, layers=2)
    hf_keys = {k: v.shape for k, v in LlamaForCausalLM(LlamaConfig(**spec)).state_dict().items()}
    assert {k: v.shape for k, v in build_lm(spec).state_dict().items()} == hf_keys
    gpt2 = GPT2LMHeadModel(GPT2Config(**GPT2_SPEC)).state_dict()
    hf_gpt2 = {k: v.shape for k, v in gpt2.items() if not k.endswith(".attn.bias")}
    assert {k: v.shape for k, v in build_lm(GPT2_SPEC).state_dict().items()} == hf_gpt2


def test_tied_head_shares_the_embedding() -> None:
    model, untied = build_lm(small_spec()), build_lm(small_spec(tie_word_embeddings=False))
    assert isinstance(model, LlamaLM) and isinstance(untied, LlamaLM)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


@pytest.mark.parametrize("name", MODELS)
def test_cached_decoding_equals_full_forward(name: str) -> None:
    model = MODELS[name]()
    ids = random_ids(2, 12)
    with torch.no_grad():
        full = model(ids)  # (B, T, V)
        cache = model.new_cache(2, max_len=12)
        chunks = [model(ids[:, :5], cache=cache), model(ids[:, 5:9], cache=cache)]
        chunks += [model(ids[:, t : t + 1], cache=cache) for t in range(9, 12)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [12, 12]


@pytest.mark.parametrize("name", MODELS)
def test_padded_rows_of_different_lengths_equal_each_alone(name: str) -> None:
    model = MODELS[name]()
    lengths = [3, 9, 6]
    rows = [random_ids(1, n, seed=n) for n in lengths]
    padded = torch.zeros(3, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, : row.shape[1]] = row
    with torch.no_grad():
        cache = model.new_cache(3, max_len=10)
        batched = model(padded, cache=cache, num_new=torch.tensor(lengths))  # (3, 9, V)
        next_ids = random_ids(3, 1, seed=7)
        step = model(next_ids, cache=cache)  # (3, 1, V)
        for i, row in enumerate(rows):
            alone = model(torch.cat([row, next_ids[i : i + 1]], dim=1))[0]  # (n + 1, V)
            torch.testing.assert_close(batched[i, : lengths[i]], alone[:-1], atol=1e-5, rtol=0)
            torch.testing.assert_close(step[i, 0], alone[-1], atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [4, 10, 7]


def test_a_reset_row_is_refilled_while_another_decodes() -> None:
    """What continuous batching does: row 1 finishes and takes a new prompt; row 0 goes on."""
    model = MODELS["llama"]()
    first, second, newcomer = random_ids(1, 6, seed=1), random_ids(1, 4, seed=2), random_ids(1, 3)
    with torch.no_grad():
        cache = model.new_cache(2, max_len=8)
        model(torch.cat([first[:, :4], second]), cache=cache)
        cache.reset([1])
        step_ids = torch.cat([first[:, 4:6], newcomer[:, :2]])  # (2, 2)
        step = model(step_ids, cache=cache, num_new=torch.tensor([2, 2]))
        torch.testing.assert_close(step[0], model(first)[0, 4:6], atol=1e-5, rtol=0)
        torch.testing.assert_close(step[1], model(newcomer[:, :2])[0], atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [6, 2]


def test_idle_rows_are_left_untouched() -> None:
    model = MODELS["llama"]()
    with torch.no_grad():
        cache = model.new_cache(2, max_len=8)
        model(random_ids(2, 8), cache=cache)  # both rows full
        keys = cache.k.clone()
        model(random_ids(2, 1), cache=cache, num_new=torch.tensor([0, 0]))
    assert torch.equal(cache.k, keys) and cache.lengths.tolist() == [8, 8]


def test_positions_past_the_context_are_refused() -> None:
    model = MODELS["gpt2"]()
    with pytest.raises(KilnError, match="Position 64 is past the model's context of 64"):
        model(random_ids(1, 65))
    cache = model.new_cache(1, max_len=4)
    with pytest.raises(KilnError, match="The KV cache holds 4 positions and this step needs 5"):
        model(random_ids(1, 5), cache=cache)


def test_sliding_window_caps_the_context() -> None:
    spec = {**small_spec(), "architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    assert context_length({**spec, "sliding_window": 32}) == 32
    assert context_length({**spec, "sliding_window": None}) == 64
    qwen = {**small_spec(), "architectures": ["Qwen2ForCausalLM"], "sliding_window": 16}
    assert context_length(qwen) == 64
    assert context_length({**qwen, "use_sliding_window": True}) == 16


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_act": "gelu"}, 'hidden_act "gelu"'),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, 'rope_type "yarn"'),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"architectures": ["T5ForConditionalGeneration"]}, "T5ForConditionalGeneration"),
        ({"hidden_size": None}, "no hidden_size"),
    ],
)
def test_unsupported_specs_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(KilnError, match=message):
        build_lm(small_spec(**overrides))


def test_the_model_learns() -> None:
    """A few optimizer steps lower the loss: gradients reach every parameter."""
    model = seeded(small_spec()).train()
    ids = random_ids(4, 16) % 8 + 3  # a small alphabet so a few steps suffice
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        logits = model(ids[:, :-1])  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert all(p.grad is not None for p in model.parameters())


def test_kv_cache_shape() -> None:
    cache = KVCache(3, 2, 4, 16, 8)
    assert cache.k.shape == (3, 2, 4, 16, 8) and cache.max_len == 16 and cache.batch_size == 2
