"""Language-model versions in and out of the registry: `kiln models import hf:DIR`,
`kiln export REF --format hf`, and offline `kiln generate`.

A language-model version holds Hugging Face files (model.safetensors with HF key names,
config.json, tokenizer.json, tokenizer_config.json, generation_config.json) beside Kiln's
spec.json, each with its sha256 in the catalog. These functions work through the Python
client, so on the embedded default they read and write the SQLite catalog and the storage
folder directly: no Ray starts for an import, an export or a generation.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.actors.catalog import VersionRecord
from kiln.actors.registry import read_verified_files
from kiln.training.errors import KilnError

HF_SCHEME = "hf:"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

logger = logging.getLogger(__name__)


def hf_folder_of(uri: str) -> Path:
    """`hf:/path/to/folder` (or `hf:~/...`) -> the folder; a KilnError for anything else."""
    if not uri.startswith(HF_SCHEME):
        raise KilnError(
            f'Got "{uri}" to import. Give a local Hugging Face folder as hf:DIR, '
            "e.g. kiln models import hf:/models/SmolLM-135M"
        )
    return Path(uri[len(HF_SCHEME) :]).expanduser()


def default_import_name(folder: Path) -> str:
    """A registry name from the folder's name: lowercase letters, digits and '-'."""
    cleaned = "".join(c if c.isalnum() else "-" for c in folder.resolve().name.lower())
    return "-".join(part for part in cleaned.split("-") if part)[:64] or "imported-lm"


def import_hf(client: Any, uri: str, name: str | None = None) -> VersionRecord:
    """Register a local Hugging Face causal-LM folder as a new version of `name`."""
    from kiln.training.artifacts import model_to_files
    from kiln.training.hf_io import read_hf_folder
    from kiln.training.lm import context_length, load_lm, num_parameters

    folder = hf_folder_of(uri)
    spec, state, tokenizer_json, extras = read_hf_folder(folder)
    spec = {**spec, "kind": "lm"}
    model = load_lm(spec, state)
    files = model_to_files(model, spec)  # type: ignore[arg-type]
    if tokenizer_json is not None:
        files[TOKENIZER_FILE] = tokenizer_json
    files.update(extras)
    lineage: dict[str, Any] = {
        "dataset_uri": None,
        "source": f"hf:{folder.resolve()}",
        "tokenizer_source": f"hf:{folder.resolve()}" if tokenizer_json else None,
        "train_config": {},
    }
    metrics = {
        "parameters": num_parameters(spec),
        "context_length": context_length(spec),
        "chat_template": has_chat_template(extras.get(TOKENIZER_CONFIG_FILE)),
        "generate_tokens_per_s": generation_speed(model, spec),
    }
    target = name or default_import_name(folder)
    return client.register(target, files, spec, metrics, lineage)  # type: ignore[no-any-return]


def has_chat_template(tokenizer_config: bytes | None) -> bool:
    if not tokenizer_config:
        return False
    try:
        return bool(json.loads(tokenizer_config).get("chat_template"))
    except ValueError:
        return False


SPEED_PROMPT_TOKENS = 16
SPEED_NEW_TOKENS = 32


def generation_speed(model: Any, spec: dict[str, Any]) -> float:
    """Greedy decode tokens/s of one request (16 prompt tokens, 32 new ones; the better of two
    runs after a warm-up), on this process's threads: the figure `kiln models compare` shows
    beside perplexity."""
    import torch

    from kiln.training.generate import generate
    from kiln.training.lm import context_length

    prompt = list(range(3, 3 + min(SPEED_PROMPT_TOKENS, context_length(spec) // 2)))
    new = min(SPEED_NEW_TOKENS, context_length(spec) - len(prompt) - 1)
    best = 0.0
    with torch.inference_mode():
        generate(model, spec, prompt, 2, stop_ids=[])  # warm-up: the first passes allocate
        for _ in range(2):  # the better of two: a busy machine slows one down
            started = time.perf_counter()
            result = generate(model, spec, prompt, new, stop_ids=[])
            elapsed = time.perf_counter() - started
            best = max(best, len(result.token_ids) / elapsed if elapsed > 0 else 0.0)
    return round(best, 2)


@dataclass
class LoadedLM:
    """A language-model version ready to run: model, spec, tokenizer and its files."""

    record: VersionRecord
    model: Any
    spec: dict[str, Any]
    tokenizer: Any
    files: dict[str, bytes]


def require_language_model(record: VersionRecord) -> None:
    if record.spec.get("kind") != "lm":
        raise KilnError(
            f"{record.ref} is a {record.spec.get('kind')} model, not a language model; "
            "generate with a version trained with --model lm or imported with kiln models import"
        )


def load_version_lm(client: Any, ref: str) -> LoadedLM:
    """A language-model version's verified files, loaded (no code from them runs)."""
    from kiln.training.artifacts import model_from_files
    from kiln.training.tokenizer import tokenizer_from_bytes

    record = client.resolve(ref)
    require_language_model(record)
    files = read_verified_files(client.settings.storage_uri, record)
    model, spec = model_from_files(files)
    if TOKENIZER_FILE not in files:
        raise KilnError(f"{record.ref} has no tokenizer.json; it cannot turn text into tokens")
    return LoadedLM(record, model.eval(), spec, tokenizer_from_bytes(files[TOKENIZER_FILE]), files)


def export_hf(client: Any, ref: str, out_dir: str) -> dict[str, Any]:
    """Write a language-model version as a folder `transformers` loads unchanged."""
    from kiln.training.compress import is_quantized
    from kiln.training.hf_io import write_hf_folder

    loaded = load_version_lm(client, ref)
    if is_quantized(loaded.spec):
        parent = loaded.record.lineage.get("parent") or "its fp32 parent"
        raise KilnError(
            f"{loaded.record.ref} is an int8 variant; --format hf writes float32 weights: "
            f"export {parent} instead"
        )
    folder = write_hf_folder(
        loaded.spec,
        loaded.model.state_dict(),
        out_dir,
        tokenizer_json=loaded.files.get(TOKENIZER_FILE),
        tokenizer_config=loaded.files.get(TOKENIZER_CONFIG_FILE),
        generation_config=loaded.files.get(GENERATION_CONFIG_FILE),
    )
    written = sorted(p.name for p in folder.iterdir() if p.is_file())
    return {"ref": loaded.record.ref, "format": "hf", "out": str(folder), "files": written}


def generate_text(
    client: Any,
    ref: str,
    prompt: str,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: list[str] | None = None,
) -> dict[str, Any]:
    """`kiln generate`: one prompt's completion (without the prompt) and its speed."""
    import torch

    from kiln.training.generate import check_prompt, generate
    from kiln.training.lm import context_length
    from kiln.training.tokenizer import prompt_token_ids

    if max_tokens < 1:
        raise KilnError(f'Got "{max_tokens}" for --max-tokens. Use 1 or more.')
    loaded = load_version_lm(client, ref)
    if not prompt:
        raise KilnError("Got an empty --prompt. Give some text to continue.")
    prompt_ids = prompt_token_ids(loaded.spec, loaded.tokenizer, prompt)
    check_prompt(prompt_ids, context_length(loaded.spec))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    result = generate(
        loaded.model,
        loaded.spec,
        prompt_ids,
        max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=tuple(stop or ()),
        tokenizer=loaded.tokenizer,
    )
    elapsed = time.perf_counter() - started
    return {
        "ref": loaded.record.ref,
        "text": result.text if result.text is not None else "",
        "tokens": len(result.token_ids),
        "prompt_tokens": result.num_prompt_tokens,
        "tokens_per_s": len(result.token_ids) / elapsed if elapsed > 0 else 0.0,
        "finish_reason": result.finish_reason,
    }
