"""int8 language models without Ray: the int8 model's logits stay close to the fp32 ones on a
trained model, its files keep Hugging Face's key names (int8 weights beside float32 scales, no
pickle) and load back into the same model, a bad file is refused by name, every architecture
(Llama, Qwen2's biases, GPT-2's Conv1D) quantises, and the serving engine runs the int8 model
greedily as `generate` does."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tokenizers import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kiln.serving.engine import Engine, EngineConfig, GenerationRequest  # noqa: E402
from kiln.training.artifacts import WEIGHTS_FILE, model_from_files, model_to_files  # noqa: E402
from kiln.training.compress import is_quantized  # noqa: E402
from kiln.training.errors import CorruptArtifactError, KilnError  # noqa: E402
from kiln.training.generate import generate  # noqa: E402
from kiln.training.lm import build_lm, lm_spec  # noqa: E402
from kiln.training.lm_compress import (  # noqa: E402
    Int8Linear,
    int8_layer,
    logit_cosine,
    perplexity_of,
    perplexity_step,
    quantize_lm,
)
from kiln.training.lm_data import eval_windows  # noqa: E402
from kiln.training.tokenizer import encode_documents, train_bpe  # noqa: E402
from tests.training.test_hf_io import VOCAB_SIZE, corpus  # noqa: E402

CONTEXT = 64
Model = tuple[Any, dict[str, Any], Tokenizer, np.ndarray]
"""(the trained CausalLM, its spec, its tokenizer, the held-out token stream)."""


def files_of(model: Any, spec: dict[str, Any]) -> dict[str, bytes]:
    return model_to_files(model, spec)


def loaded_lm(files: dict[str, bytes]) -> tuple[Any, dict[str, Any]]:
    """A language model from its files (`model_from_files` is typed for tabular models)."""
    return model_from_files(files)


@pytest.fixture(scope="module")
def trained() -> Model:
    """A tiny Llama trained 60 steps on the first nine tenths of a small corpus; the last tenth
    is its held-out stream."""
    texts = corpus()
    tokenizer = train_bpe(texts, vocab_size=VOCAB_SIZE)
    stream = encode_documents(tokenizer, texts).astype(np.int64)
    cut = len(stream) * 9 // 10
    spec = lm_spec("tiny", vocab_size=VOCAB_SIZE, block_size=CONTEXT, layers=2, dim=64)
    torch.manual_seed(0)
    model = build_lm(spec)
    train = torch.from_numpy(stream[:cut])
    windows = train[: len(train) // 33 * 33].view(-1, 33)  # (N, 33)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        batch = windows[(step * 32) % (len(windows) - 32) :][:32]  # (B, T + 1)
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), spec, tokenizer, stream[cut:]


def test_int8_logits_are_close_to_fp32_on_a_trained_model(trained: Model) -> None:
    model, spec, _, held_out = trained
    quantized, new_spec = quantize_lm(model, spec)
    layers = new_spec["quantization"]["layers"]
    assert len(layers) == 2 * 7 + 1 and "lm_head" in layers  # q k v o gate up down, and the head
    assert sum(isinstance(m, Int8Linear) for m in quantized.modules()) == len(layers)
    embeddings = quantized.get_parameter("model.embed_tokens.weight")
    assert embeddings.dtype == torch.float32  # embeddings stay fp32
    assert not any(isinstance(m, Int8Linear) for m in model.modules())  # the fp32 one untouched

    windows = eval_windows(held_out, CONTEXT, 16)
    assert logit_cosine(model, quantized, torch.from_numpy(windows[:, :-1])) > 0.99
    before, after = perplexity_of(model, windows), perplexity_of(quantized, windows)
    step = perplexity_step(before, after, windows)
    assert abs(step["perplexity_change"]) < 0.02
    assert step["eval_tokens"] == len(windows) * CONTEXT

    with pytest.raises(KilnError, match="already quantised"):
        quantize_lm(quantized, new_spec)


def test_files_keep_hugging_face_names_and_load_the_same_model(trained: Model) -> None:
    model, spec, _, held_out = trained
    quantized, new_spec = quantize_lm(model, spec)
    files = files_of(quantized, new_spec)
    state = load_safetensors(files[WEIGHTS_FILE])
    up = "model.layers.0.mlp.up_proj"
    assert state[f"{up}.weight"].dtype == torch.int8
    assert state[f"{up}.weight_scale"].dtype == torch.float32
    assert tuple(state[f"{up}.weight_scale"].shape) == (state[f"{up}.weight"].shape[0],)
    assert state["model.embed_tokens.weight"].dtype == torch.float32
    assert state["lm_head.weight"].dtype == torch.int8  # the tied head's own int8 copy
    assert state["model.norm.weight"].dtype == torch.float32
    written = json.loads(files["spec.json"])
    assert is_quantized(written) and written["quantization"]["method"] == "dynamic-int8"

    loaded, loaded_spec = loaded_lm(files)
    assert loaded_spec == new_spec
    tokens = torch.from_numpy(eval_windows(held_out, CONTEXT, 4)[:, :-1])
    with torch.inference_mode():
        assert torch.equal(loaded(tokens), quantized(tokens))
    # Twice through the files: the same bytes.
    assert files_of(loaded, loaded_spec)[WEIGHTS_FILE] == files[WEIGHTS_FILE]
    # An int8 version is smaller than its fp32 parent.
    assert len(files[WEIGHTS_FILE]) < 0.7 * len(files_of(model, spec)[WEIGHTS_FILE])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("model.layers.1.self_attn.q_proj.weight_scale"), "lack"),
        (lambda s: s.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}), "shape"),
        (
            lambda s: s.update(
                {"model.layers.0.mlp.down_proj.weight_scale": -s["model.norm.weight"][:64]}
            ),
            "shape",
        ),
        (lambda s: s.pop("model.norm.weight"), "missing"),
        (lambda s: s.update({"model.norm.weight": torch.ones(3)}), "could not be loaded"),
        (lambda s: s.update({"surprise": torch.zeros(1)}), "unexpected"),
    ],
)
def test_a_bad_int8_file_is_refused_by_name(trained: Model, change: Any, message: str) -> None:
    model, spec, _, _ = trained
    quantized, new_spec = quantize_lm(model, spec)
    files = files_of(quantized, new_spec)
    state = load_safetensors(files[WEIGHTS_FILE])
    change(state)
    files[WEIGHTS_FILE] = save_safetensors(state)
    with pytest.raises(CorruptArtifactError, match=message):
        loaded_lm(files)


def test_a_tied_head_left_fp32_shares_the_embedding_again(trained: Model) -> None:
    model, spec, _, held_out = trained
    quantized, new_spec = quantize_lm(model, spec)
    head = torch.nn.Linear(64, VOCAB_SIZE, bias=False)
    head.weight = quantized.get_parameter("model.embed_tokens.weight")
    quantized.lm_head = head
    layers = [name for name in new_spec["quantization"]["layers"] if name != "lm_head"]
    new_spec["quantization"] = {**new_spec["quantization"], "layers": layers}
    files = files_of(quantized, new_spec)
    assert "lm_head.weight" not in load_safetensors(files[WEIGHTS_FILE])  # as transformers saves
    loaded, _ = loaded_lm(files)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    tokens = torch.from_numpy(eval_windows(held_out, CONTEXT, 2)[:, :-1])
    with torch.inference_mode():
        assert torch.equal(loaded(tokens), quantized(tokens))


QWEN2 = {
    "kind": "lm",
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
GPT2 = {
    "kind": "lm",
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "vocab_size": VOCAB_SIZE,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 64,
}


@pytest.mark.parametrize("spec", [QWEN2, GPT2], ids=["qwen2-biases", "gpt2-conv1d"])
def test_every_architecture_quantises_and_round_trips(spec: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = build_lm({**spec, "initializer_range": 0.2}).eval()  # wide: logits far from flat
    for module in model.modules():  # non-zero biases, so a lost bias shows
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.nn.Parameter):
            torch.nn.init.normal_(bias, std=0.1)
    quantized, new_spec = quantize_lm(model, spec)
    tokens = torch.randint(3, VOCAB_SIZE, (2, 24))
    assert logit_cosine(model, quantized, tokens) > 0.99
    loaded, _ = loaded_lm(files_of(quantized, new_spec))
    with torch.inference_mode():
        assert torch.equal(loaded(tokens), quantized(tokens))
    state = load_safetensors(files_of(quantized, new_spec)[WEIGHTS_FILE])
    if spec["model_type"] == "gpt2":  # Conv1D keeps its (in, out) layout
        assert tuple(state["transformer.h.0.mlp.c_fc.weight"].shape) == (64, 256)
        assert tuple(state["transformer.h.0.mlp.c_fc.weight_scale"].shape) == (256,)
    else:
        assert state["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float32


def test_off_the_cpu_kernel_an_int8_layer_multiplies_by_its_dequantised_weight() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 32)
    layer = int8_layer(linear)
    x = torch.randn(5, 48)
    exact = x.double() @ layer.dequantized().double().T + layer.bias.double()  # type: ignore[union-attr]
    assert torch.allclose(layer(x.double()), exact, atol=1e-9)  # the fallback: no fbgemm
    assert torch.allclose(layer(x).double(), exact, atol=0.05)  # fbgemm, activations in 8 bits
    assert (layer.dequantized() - linear.weight).abs().max() <= linear.weight.abs().max() / 254


def test_the_engine_runs_the_int8_model_greedily(trained: Model) -> None:
    model, spec, tokenizer, _ = trained
    quantized, new_spec = loaded_lm(files_of(*quantize_lm(model, spec)))
    prompt = tokenizer.encode("kiln fires clay at").ids
    expected = generate(quantized, new_spec, prompt, 16, stop_ids=[]).token_ids
    engine = Engine(quantized, new_spec, tokenizer, EngineConfig(max_batch=2, device="cpu"))
    request = GenerationRequest(
        prompt_ids=tuple(prompt), max_tokens=16, temperature=0.0, stop_token_ids=()
    )
    handle = engine.submit(request)
    engine.run_until_idle()
    tokens = [token for delta in handle.drain() for token in delta.token_ids]
    assert tokens == expected and len(tokens) == 16
    # The fp32 model mostly agrees: int8 rounding may flip a near-tie late in the sequence.
    reference = generate(model, spec, prompt, 16, stop_ids=[]).token_ids
    assert tokens[:4] == reference[:4]
