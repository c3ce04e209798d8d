"""A tiny language model as a registered version: its real artifacts (safetensors, spec,
tokenizer.json), for the route tests, the hostile table, the fuzz and the served tests.

Trained 40 steps on a small synthetic corpus (tests/training/test_hf_io.py `train_tiny_lm`), so
greedy answers are stable; a 64-token context keeps every forward pass in milliseconds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LM_NAME = "tiny-lm"
CONTEXT = 64


def tiny_lm_files() -> tuple[dict[str, bytes], dict[str, Any]]:
    """The artifacts and spec of a tiny trained Llama with its BPE tokenizer."""
    from kiln.training.artifacts import model_to_files
    from kiln.training.tokenizer import tokenizer_to_bytes, train_bpe
    from tests.training.test_hf_io import VOCAB_SIZE, corpus, train_tiny_lm

    tokenizer = train_bpe(corpus(), vocab_size=VOCAB_SIZE)
    model, spec = train_tiny_lm(tokenizer, CONTEXT)
    files = model_to_files(model, spec)
    files["tokenizer.json"] = tokenizer_to_bytes(tokenizer)
    return files, spec


def untrained_lm_files() -> tuple[dict[str, bytes], dict[str, Any]]:
    """A tiny random Llama's artifacts (no tokenizer): for what only reads the catalog."""
    import torch

    from kiln.training.artifacts import model_to_files
    from kiln.training.lm import build_lm, lm_spec

    spec = lm_spec("tiny", vocab_size=300, block_size=CONTEXT, layers=1, dim=32)
    torch.manual_seed(0)
    return model_to_files(build_lm(spec), spec), spec


@pytest.fixture(scope="module")
def language_replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """`tiny-lm` registered in a registry of its own (no Ray) and loaded with its engine."""
    from kiln.actors.registry import RegistryService
    from kiln.serving.engine import EngineConfig
    from kiln.serving.language import LanguageReplica

    home: Path = tmp_path_factory.mktemp("lm")
    service = RegistryService(str(home / "registry.db"), str(home / "store"), recover=False)
    files, spec = tiny_lm_files()
    record = service.register(LM_NAME, files, spec, {"perplexity": 10.0}, {})
    service.close()
    replica = LanguageReplica(
        record, str(home / "store"), "off", EngineConfig(max_batch=4, max_waiting=8)
    )
    try:
        yield replica
    finally:
        replica.close()
