"""Model artifacts without pickle: weights as safetensors, architecture as spec.json.

`model_to_files` and `model_from_files` are the only ways Kiln turns a model into bytes and
back. Loading parses JSON and safetensors; no code from an artifact ever runs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from kiln.training.compress import is_quantized, load_quantized, quantized_state
from kiln.training.errors import CorruptArtifactError
from kiln.training.models import KilnModel, build_model

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "spec.json"
CONFIG_FILE = "config.json"
"""A language model's Hugging Face config (its spec.json is the same dict plus Kiln's keys)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_language_model(spec: dict[str, Any]) -> bool:
    return spec.get("kind") == "lm"


def model_to_files(model: KilnModel, spec: dict[str, Any]) -> dict[str, bytes]:
    if is_language_model(spec):
        return lm_to_files(model, spec)
    if is_quantized(spec):  # int8 layers as int8 tensors and their scales
        state = quantized_state(model)
    else:
        state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    return {
        WEIGHTS_FILE: save_safetensors(state),
        SPEC_FILE: json.dumps(spec, sort_keys=True, indent=2).encode(),
    }


def model_from_files(files: dict[str, bytes]) -> tuple[KilnModel, dict[str, Any]]:
    """Rebuild a model from its spec.json and safetensors bytes; bad bytes name the file."""
    try:
        spec = json.loads(files[SPEC_FILE])
    except (KeyError, ValueError) as exc:
        raise CorruptArtifactError(f"{SPEC_FILE} is missing or not valid JSON: {exc}") from exc
    try:
        state = load_safetensors(files[WEIGHTS_FILE])
        if is_language_model(spec):
            from kiln.training.lm import load_lm
            from kiln.training.lm_compress import load_quantized_lm

            if is_quantized(spec):  # int8 layers: int8 weights and their scales
                return load_quantized_lm(spec, state), spec  # type: ignore[return-value]
            return load_lm(spec, state), spec  # type: ignore[return-value]
        if is_quantized(spec):
            model = load_quantized(spec, state)
        else:
            model = build_model(spec)
            model.load_state_dict(state)
    except (KeyError, SafetensorError, RuntimeError) as exc:
        raise CorruptArtifactError(f"{WEIGHTS_FILE} could not be loaded: {exc}") from exc
    model.eval()
    return model, spec


def lm_to_files(model: Any, spec: dict[str, Any]) -> dict[str, bytes]:
    """A language model as Hugging Face files beside Kiln's spec.json: model.safetensors with
    Hugging Face key names (a tied lm_head left out) and config.json, so the version's folder
    is one `transformers` opens (tokenizer files are added by whoever has the tokenizer). An
    int8 model keeps the names, its Linear weights int8 beside their `.weight_scale`."""
    from kiln.training.hf_io import export_tensors, hf_config
    from kiln.training.lm_compress import quantized_lm_state

    if is_quantized(spec):
        state = quantized_lm_state(model, spec)
    else:
        state = export_tensors(spec, model.state_dict())
    return {
        WEIGHTS_FILE: save_safetensors(state, metadata={"format": "pt"}),
        SPEC_FILE: json.dumps(spec, sort_keys=True, indent=2).encode(),
        CONFIG_FILE: json.dumps(hf_config(spec), sort_keys=True, indent=2).encode(),
    }


def verify_files(files: dict[str, bytes], checksums: dict[str, str]) -> None:
    """Raise CorruptArtifactError naming the first file whose sha256 differs from the catalog."""
    for name, expected in sorted(checksums.items()):
        if name not in files:
            raise CorruptArtifactError(f"artifact {name} is missing")
        actual = sha256_hex(files[name])
        if actual != expected:
            raise CorruptArtifactError(
                f"artifact {name} failed its checksum (expected sha256 {expected[:12]}..., "
                f"got {actual[:12]}...); it was changed after registration"
            )
