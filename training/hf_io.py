"""Hugging Face model folders in and out: how language models enter and leave Kiln.

A folder that `save_pretrained` wrote (config.json, safetensors weights, tokenizer files) is the
interchange format: `read_hf_folder` turns one into a Kiln spec and a state dict that
`kiln.training.lm.load_lm` runs unchanged, and `write_hf_folder` writes the same files back, so
`transformers.AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` open a
Kiln model as they would any other. Only safetensors are read: pickle weights
(`pytorch_model.bin`) can run code when loaded, so they are refused by name.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kiln.training import lm
from kiln.training.errors import KilnError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
EXTRA_FILES = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
"""Kept as bytes beside the weights: the chat template lives in tokenizer_config.json."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DROPPED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
"""Buffers some checkpoints save that are not weights (GPT-2's causal mask, rotary speeds)."""
NOT_CONFIG_KEYS = ("kind", "transformers_version")
SPECIAL_TOKENS = ("bos", "eos", "pad")

logger = logging.getLogger(__name__)

HFFolder = tuple[dict[str, Any], dict[str, torch.Tensor], bytes | None, dict[str, bytes]]
"""(spec, state dict, tokenizer.json bytes or None, other files' bytes by name)."""


def read_hf_folder(path: str | Path) -> HFFolder:
    """The spec, weights, tokenizer and extra files of a Hugging Face causal-LM folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise KilnError(f"{folder} is not a folder: give the folder save_pretrained wrote.")
    check_safetensors(folder)  # a pickle-only folder is refused by name before anything else
    spec = read_spec(folder)
    state_dict = normalize_keys(spec, read_weights(folder))
    lm.check_weights(spec, state_dict)
    tokenizer_path = folder / TOKENIZER_FILE
    tokenizer_json = tokenizer_path.read_bytes() if tokenizer_path.is_file() else None
    extras = {
        name: (folder / name).read_bytes() for name in EXTRA_FILES if (folder / name).is_file()
    }
    return spec, state_dict, tokenizer_json, extras


def read_spec(folder: Path) -> dict[str, Any]:
    """config.json as a Kiln spec, once its architecture is one Kiln runs."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise KilnError(f"{folder} has no config.json: save the model with save_pretrained.")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise KilnError(f"{config_path} is not valid JSON ({error}): fix or re-save it.") from error
    spec = {key: value for key, value in config.items() if key not in NOT_CONFIG_KEYS}
    model_type = lm.model_type_of(spec)
    spec.setdefault("architectures", [lm.MODEL_TYPES[model_type]])
    spec["model_type"] = model_type
    lm.context_length(spec)  # refuses a config missing its context now, not at the first call
    return {"kind": "lm", **spec}


def check_safetensors(folder: Path) -> None:
    """A KilnError naming the pickle files of a folder that has no safetensors weights."""
    has_safetensors = (folder / WEIGHTS_FILE).is_file() or (folder / INDEX_FILE).is_file()
    if not has_safetensors and any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()):
        read_weights(folder)


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or every shard that model.safetensors.index.json names."""
    if (folder / WEIGHTS_FILE).is_file():
        return load_file(folder / WEIGHTS_FILE)
    if (folder / INDEX_FILE).is_file():
        return read_shards(folder)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise KilnError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); Kiln loads safetensors "
            "only: save it with save_pretrained(safe_serialization=True)."
        )
    raise KilnError(
        f"{folder} holds no {WEIGHTS_FILE}: save the model with "
        "save_pretrained(safe_serialization=True)."
    )


def read_shards(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / INDEX_FILE).read_text())
    weight_map: dict[str, str] = index.get("weight_map", {})
    state_dict: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or not (folder / shard).is_file():
            raise KilnError(
                f"{INDEX_FILE} names the shard {shard!r}, which is not a file in {folder}: "
                "copy every shard beside it."
            )
        state_dict.update(load_file(folder / shard))
    missing = sorted(set(weight_map) - set(state_dict))
    if missing:
        raise KilnError(f"The shards lack {missing[:3]}, which {INDEX_FILE} lists: re-save them.")
    return state_dict


def normalize_keys(
    spec: dict[str, Any], state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Drop saved buffers that are not weights; give old GPT-2 checkpoints (keys `h.0...`,
    `wte.weight`, as `GPT2Model` saved them) the `transformer.` prefix."""
    kept = {k: v for k, v in state_dict.items() if not k.endswith(DROPPED_SUFFIXES)}
    if lm.model_type_of(spec) != "gpt2":
        return kept
    return {
        key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}": tensor
        for key, tensor in kept.items()
    }


def write_hf_folder(
    spec: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    out_dir: str | Path,
    tokenizer_json: bytes | None = None,
    tokenizer_config: bytes | dict[str, Any] | None = None,
    generation_config: bytes | dict[str, Any] | None = None,
) -> Path:
    """Write a folder `transformers` loads as it loads its own: config.json, float32
    model.safetensors, and the tokenizer files when a tokenizer is given."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    lm.check_weights(spec, state_dict)
    write_json(folder / "config.json", hf_config(spec))
    save_file(export_tensors(spec, state_dict), folder / WEIGHTS_FILE, metadata={"format": "pt"})
    if tokenizer_json is not None:
        (folder / TOKENIZER_FILE).write_bytes(tokenizer_json)
        write_json_or_bytes(
            folder / "tokenizer_config.json",
            tokenizer_config or default_tokenizer_config(spec, tokenizer_json),
        )
    elif tokenizer_config is not None:
        write_json_or_bytes(folder / "tokenizer_config.json", tokenizer_config)
    write_json_or_bytes(
        folder / "generation_config.json", generation_config or default_generation_config(spec)
    )
    return folder


def hf_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as config.json: its HF keys, the architecture, float32, and the rotary base
    both where transformers 4 reads it (rope_theta) and where 5 does (rope_parameters)."""
    model_type = lm.model_type_of(spec)
    config = {key: value for key, value in spec.items() if key not in NOT_CONFIG_KEYS}
    config["architectures"] = [lm.MODEL_TYPES[model_type]]
    config["model_type"] = model_type
    config["torch_dtype"] = config["dtype"] = "float32"
    if model_type in lm.LLAMA_FAMILY and not (
        config.get("rope_parameters") or config.get("rope_scaling")
    ):
        theta = float(config.get("rope_theta", 10000.0))
        config["rope_theta"] = theta
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    return config


def export_tensors(
    spec: dict[str, Any], state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """float32, contiguous, on the CPU; a tied lm_head.weight left out as transformers does."""
    tied = lm.ties_embeddings(spec)
    return {
        key: tensor.detach().to("cpu", torch.float32).contiguous()
        for key, tensor in state_dict.items()
        if not (tied and key == "lm_head.weight")
    }


def default_tokenizer_config(spec: dict[str, Any], tokenizer_json: bytes) -> dict[str, Any]:
    """What AutoTokenizer needs to open tokenizer.json: the class, the special tokens (read by
    the ids the spec names) and the context length."""
    added = json.loads(tokenizer_json).get("added_tokens", [])
    names = {token["id"]: token["content"] for token in added}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": lm.context_length(spec),
        "clean_up_tokenization_spaces": False,
    }
    for role in SPECIAL_TOKENS:
        token_id = spec.get(f"{role}_token_id")
        if isinstance(token_id, int) and token_id in names:
            config[f"{role}_token"] = names[token_id]
    return config


def default_generation_config(spec: dict[str, Any]) -> dict[str, Any]:
    ids = {f"{role}_token_id": spec.get(f"{role}_token_id") for role in SPECIAL_TOKENS}
    return {key: value for key, value in ids.items() if value is not None}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_json_or_bytes(path: Path, payload: bytes | dict[str, Any]) -> None:
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        write_json(path, payload)
