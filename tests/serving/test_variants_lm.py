"""`kiln models compare` counts a language model's parameters (Hugging Face tensor names, no
`body.` prefix), and an int8 copy's as stored: its int8 weights, not their scales."""

from __future__ import annotations

import json
import struct

import pyarrow.fs as pafs
import torch

from kiln.serving.variants import count_parameters, parameters_in
from kiln.training.artifacts import model_to_files
from kiln.training.lm import build_lm, lm_spec
from kiln.training.lm_compress import quantize_lm


def header_of(weights: bytes) -> dict:
    (length,) = struct.unpack("<Q", weights[:8])
    return json.loads(weights[8 : 8 + length])


def test_a_language_models_parameters_are_all_its_tensors_and_int8_counts_what_it_stores(
    tmp_path,
):
    spec = lm_spec("tiny", vocab_size=300, block_size=32, layers=2, dim=32)
    torch.manual_seed(0)
    model = build_lm(spec).eval()
    expected = sum(p.numel() for p in model.parameters())  # tied head counted once
    files = model_to_files(model, spec)
    assert parameters_in(header_of(files["model.safetensors"])) == expected > 0

    quantized, quantized_spec = quantize_lm(model, spec)
    int8 = model_to_files(quantized, quantized_spec)["model.safetensors"]
    names = header_of(int8)
    assert any(name.endswith("_scale") for name in names)  # scales stored, not counted
    # The int8 head is a tensor of its own (the fp32 embedding it was tied to stays).
    assert "lm_head.weight" in names
    expected += 300 * 32
    assert parameters_in(names) == expected
    path = tmp_path / "model.safetensors"
    path.write_bytes(int8)
    assert count_parameters(pafs.LocalFileSystem(), str(path)) == expected


def test_a_tabular_models_count_is_still_its_body():
    header = {
        "__metadata__": {"format": "pt"},
        "body.0.weight": {"shape": [4, 3]},
        "body.0.weight_scale": {"shape": [4]},
        "encode.mean": {"shape": [3]},
    }
    assert parameters_in(header) == 12
