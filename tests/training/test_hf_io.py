"""Hugging Face folders in and out: Kiln's logits equal transformers' for every architecture it
imports, an exported Kiln model opens in transformers unchanged, and what Kiln will not load
(pickle weights, other architectures) is refused by name."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kiln.training.errors import KilnError  # noqa: E402
from kiln.training.hf_io import read_hf_folder, write_hf_folder  # noqa: E402
from kiln.training.lm import build_lm, lm_spec, load_lm  # noqa: E402
from kiln.training.tokenizer import (  # noqa: E402
    BOS_ID,
    EOS_ID,
    PAD_ID,
    tokenizer_to_bytes,
    train_bpe,
)

VOCAB_SIZE = 300
LLAMA_SIZES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 128,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
ARCHITECTURE_CASES = ("llama", "llama-tied-llama3", "qwen2", "mistral", "gpt2")
PROMPT_LENGTHS = (1, 9, 40)


def hf_model(case: str, init_std: float = 0.1, seed: int = 0) -> PreTrainedModel:
    """A small random transformers model of one architecture; a wide init std so that a
    mistake anywhere moves the logits by far more than the tolerance."""
    torch.manual_seed(seed)
    sizes: dict[str, Any] = {**LLAMA_SIZES, "initializer_range": init_std}
    models: dict[str, Any] = {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**sizes)),
        "llama-tied-llama3": lambda: LlamaForCausalLM(
            LlamaConfig(**sizes, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)
        ),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**sizes)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**sizes, sliding_window=128)),
        "gpt2": lambda: GPT2LMHeadModel(
            GPT2Config(
                n_embd=64,
                n_layer=2,
                n_head=4,
                n_positions=128,
                vocab_size=VOCAB_SIZE,
                initializer_range=init_std,
                bos_token_id=None,
                eos_token_id=None,
            )
        ),
    }
    return models[case]().eval()


def saved(model: PreTrainedModel, folder: Path, **kwargs: Any) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


def prompts(seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB_SIZE, (1, n), generator=generator) for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("case", ARCHITECTURE_CASES)
def test_imported_logits_equal_transformers(case: str, tmp_path: Path) -> None:
    reference = hf_model(case)
    spec, state_dict, _, _ = read_hf_folder(saved(reference, tmp_path))
    model = load_lm(spec, state_dict)
    with torch.no_grad():
        for ids in prompts():
            expected = reference(ids).logits  # (1, T, V)
            assert expected.std() > 0.1  # not flat: a wrong weight would show
            torch.testing.assert_close(model(ids), expected, atol=1e-4, rtol=0)


def test_sharded_folder_loads(tmp_path: Path) -> None:
    reference = hf_model("qwen2")
    folder = saved(reference, tmp_path, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    spec, state_dict, _, _ = read_hf_folder(folder)
    ids = prompts()[1]
    with torch.no_grad():
        torch.testing.assert_close(load_lm(spec, state_dict)(ids), reference(ids).logits)


def test_old_gpt2_keys_and_mask_buffers_load(tmp_path: Path) -> None:
    """GPT2Model-era checkpoints: no `transformer.` prefix, and the causal mask saved."""
    reference = hf_model("gpt2")
    folder = saved(reference, tmp_path)
    from safetensors.torch import load_file, save_file

    old = {
        k.removeprefix("transformer."): v
        for k, v in load_file(folder / "model.safetensors").items()
    }
    old["h.0.attn.bias"] = torch.ones(1, 1, 128, 128)
    save_file(old, folder / "model.safetensors", metadata={"format": "pt"})
    spec, state_dict, _, _ = read_hf_folder(folder)
    ids = prompts()[1]
    with torch.no_grad():
        torch.testing.assert_close(load_lm(spec, state_dict)(ids), reference(ids).logits)


def test_pickle_only_folder_is_refused_by_name(tmp_path: Path) -> None:
    reference = hf_model("llama")
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(KilnError, match=r"only pickle weights \(pytorch_model.bin\)") as raised:
        read_hf_folder(tmp_path)
    assert "save_pretrained(safe_serialization=True)" in str(raised.value)


def test_unknown_architecture_is_refused_by_name(tmp_path: Path) -> None:
    config = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": 30}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(KilnError, match="BertForMaskedLM") as raised:
        read_hf_folder(tmp_path)
    assert "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel" in str(
        raised.value
    )


@pytest.mark.parametrize(
    ("files", "message"),
    [({}, "has no config.json"), ({"config.json": "{"}, "is not valid JSON")],
)
def test_broken_folders_are_refused(tmp_path: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(KilnError, match=message):
        read_hf_folder(tmp_path)
    with pytest.raises(KilnError, match="is not a folder"):
        read_hf_folder(tmp_path / "absent")


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path: Path) -> None:
    folder = saved(hf_model("llama"), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(KilnError, match="mlp.*has shape"):
        read_hf_folder(folder)


def test_untied_model_without_lm_head_is_refused(tmp_path: Path) -> None:
    folder = saved(hf_model("llama"), tmp_path)
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(KilnError, match="missing \\['lm_head.weight'\\]"):
        read_hf_folder(folder)


def test_extras_are_kept(tmp_path: Path) -> None:
    folder = saved(hf_model("llama"), tmp_path)
    template = {"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}
    (folder / "tokenizer_config.json").write_text(json.dumps(template))
    (folder / "tokenizer.json").write_text("{}")
    _, _, tokenizer_json, extras = read_hf_folder(folder)
    assert tokenizer_json == b"{}"
    assert json.loads(extras["tokenizer_config.json"]) == template
    assert "generation_config.json" in extras


def corpus() -> list[str]:
    words = ["kiln", "fires", "clay", "glaze", "pots", "at", "night", "and", "day", "slowly"]
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(words), (400, 8), generator=generator).tolist()
    return [" ".join(words[i] for i in row) + "." for row in picks]


def train_tiny_lm(tokenizer: Any, context: int = 64) -> tuple[Any, dict[str, Any]]:
    """A 2-layer Llama trained 40 steps on `corpus()`: logits far from flat ties, so greedy
    decoding is a stable thing to compare."""
    from kiln.training.tokenizer import encode_documents

    spec = lm_spec("tiny", vocab_size=VOCAB_SIZE, block_size=context, layers=2, dim=64)
    torch.manual_seed(0)
    model = build_lm(spec)
    stream = torch.from_numpy(encode_documents(tokenizer, corpus())).long()
    windows = stream[: len(stream) // 16 * 16].view(-1, 16)  # (N, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        batch = windows[(step * 32) % (len(windows) - 32) :][:32]  # (B, T)
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), spec


def test_kiln_model_exports_to_transformers(tmp_path: Path) -> None:
    tokenizer = train_bpe(corpus(), vocab_size=VOCAB_SIZE)
    spec = lm_spec("tiny", vocab_size=VOCAB_SIZE, block_size=64)
    torch.manual_seed(0)
    model = build_lm(spec).eval()
    folder = write_hf_folder(
        spec, model.state_dict(), tmp_path / "out", tokenizer_json=tokenizer_to_bytes(tokenizer)
    )

    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert loaded.config.tie_word_embeddings
    with torch.no_grad():
        for ids in prompts():
            torch.testing.assert_close(model(ids), loaded(ids).logits, atol=1e-4, rtol=0)

    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "kiln fires clay at night, and glazes 🔥 slowly."
    assert hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text).ids
    assert hf_tokenizer.decode(tokenizer.encode(text).ids) == text
    special = (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id)
    assert special == (BOS_ID, EOS_ID, PAD_ID)


def test_export_round_trips_into_kiln(tmp_path: Path) -> None:
    spec = lm_spec("tiny", vocab_size=VOCAB_SIZE, block_size=64)
    model = build_lm(spec).eval()
    spec_back, state_dict, tokenizer_json, extras = read_hf_folder(
        write_hf_folder(spec, model.state_dict(), tmp_path)
    )
    assert tokenizer_json is None and "tokenizer_config.json" not in extras
    assert json.loads(extras["generation_config.json"])["eos_token_id"] == EOS_ID
    ids = prompts()[2]
    with torch.no_grad():
        torch.testing.assert_close(load_lm(spec_back, state_dict)(ids), model(ids))
