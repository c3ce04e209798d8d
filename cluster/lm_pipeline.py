"""Text -> tokenizer -> token shards -> Ray Train -> held-out perplexity -> registry: the path
of `kiln train --model lm`.

Reads as its steps: the corpus resident in TextShardStore actors (loaded, or a named dataset),
a byte-level BPE tokenizer trained on a sample drawn from every store in proportion to its
bytes (or a registered version's tokenizer), the documents tokenised inside the actors, the
model's spec, the fit (training/lm_loop.py on every worker), and the final weights registered
as Hugging Face files with the tokenizer, metrics and lineage.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.util.queue import Queue

from kiln.actors.catalog import VersionRecord
from kiln.actors.lineage import code_version
from kiln.actors.registry import read_verified_files
from kiln.language import generation_speed
from kiln.pipeline import fit_with_progress, run_config, scaling
from kiln.settings import Settings
from kiln.training.checkpoints import load_tensors
from kiln.training.errors import KilnError
from kiln.training.lm_config import LMTrainConfig
from kiln.training.tokenizer import PROMPT_PREFIX_KEY

logger = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]
StepFn = Callable[[str], None]
TOKENIZER_SAMPLE_BYTES = 8 * 2**20
"""Text the tokenizer learns its merges from, drawn from every store by its share of bytes."""
MAX_BLOCK_SIZE = 8192
"""The longest context `kiln train --model lm` trains (attention memory grows with its square)."""


@dataclass(kw_only=True)
class LMTrainRequest:
    """One `kiln train --model lm`: where the text is, the run's config and names."""

    data: str
    """A `text:` URI or the name of a dataset loaded with `kiln data load`."""
    train: LMTrainConfig
    name: str
    text_field: str | None = None
    val_fraction: float = 0.05
    run_name: str = field(default_factory=lambda: f"kiln-lm-{uuid.uuid4().hex[:8]}")


@dataclass
class LMOutcome:
    record: VersionRecord
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    elapsed_s: float
    run_name: str
    grad_sync: str
    num_workers: int


# ----------------------------------------------------------------------------- data


def load_corpus(request: LMTrainRequest) -> Any:
    """The corpus in TextShardStore actors: a named dataset, or the URI loaded now (one store
    per worker, so each worker reads its own)."""
    from kiln.actors.shards import looks_like_dataset_name
    from kiln.actors.text import TextSourceSpec, attach_text_dataset, load_text_dataset

    if looks_like_dataset_name(request.data):
        found = attach_text_dataset(request.data)
        if found is None:
            raise KilnError(
                f'Got "{request.data}" for --data: no dataset of that name is loaded. Load one '
                f"with kiln data load text:... --name {request.data}, or give a text: URI."
            )
        return found
    if not request.data.startswith("text:"):
        raise KilnError(
            f'Got "{request.data}" for --data with --model lm. A language model reads text: '
            "give a text: URI (text:~/corpus/**/*.py) or a dataset loaded with kiln data load."
        )
    source = TextSourceSpec(
        uri=request.data,
        val_fraction=request.val_fraction,
        seed=request.train.seed,
        **({"text_field": request.text_field} if request.text_field else {}),
    )
    return load_text_dataset(source, max(1, request.train.workers))


def corpus_tokenizer(
    settings: Settings, request: LMTrainRequest, dataset: Any, registry: Any
) -> tuple[bytes, dict[str, Any], str]:
    """(tokenizer.json, the special-token ids, where it came from): trained on a sample of
    the corpus, or the tokenizer of `--tokenizer REF`."""
    from kiln.training.tokenizer import tokenizer_to_bytes, train_bpe

    ref = request.train.tokenizer
    if ref:
        record: VersionRecord = ray.get(registry.resolve.remote(ref))
        files = read_verified_files(settings.storage_uri, record)
        if "tokenizer.json" not in files:
            raise KilnError(f"{record.ref} has no tokenizer.json; pick a language-model version")
        ids = {k: record.spec.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        return files["tokenizer.json"], ids, record.ref
    from kiln.actors.text import sample_for_tokenizer

    sample = sample_for_tokenizer(dataset, TOKENIZER_SAMPLE_BYTES)
    tokenizer = train_bpe(sample, request.train.vocab_size)
    ids = {
        "bos_token_id": tokenizer.token_to_id("<|bos|>"),
        "eos_token_id": tokenizer.token_to_id("<|eos|>"),
        "pad_token_id": tokenizer.token_to_id("<|pad|>"),
    }
    return tokenizer_to_bytes(tokenizer), ids, f"trained on {request.data}"


def vocabulary_size(tokenizer_json: bytes) -> int:
    from kiln.training.tokenizer import tokenizer_from_bytes

    return int(tokenizer_from_bytes(tokenizer_json).get_vocab_size(with_added_tokens=True))


def model_spec(cfg: LMTrainConfig, vocab_size: int, special_ids: dict[str, Any]) -> dict[str, Any]:
    from kiln.training.lm import lm_spec

    if cfg.block_size is not None and cfg.block_size > MAX_BLOCK_SIZE:
        raise KilnError(
            f'Got "{cfg.block_size}" for --block-size. Kiln trains contexts of at most '
            f"{MAX_BLOCK_SIZE} tokens."
        )
    spec = lm_spec(
        cfg.size,
        vocab_size=vocab_size,
        block_size=cfg.block_size,
        layers=cfg.layers,
        dim=cfg.dim,
        heads=cfg.heads,
        kv_heads=cfg.kv_heads,
    )
    spec.update({k: v for k, v in special_ids.items() if v is not None})
    eos = special_ids.get("eos_token_id")
    if isinstance(eos, int):
        spec[PROMPT_PREFIX_KEY] = [eos]  # every training document followed an eos
    return spec


def check_windows(counts: dict[str, Any], block_size: int) -> None:
    """One line when no training stream can hold a `block_size + 1`-token window."""
    longest = int(counts["longest_train"])
    if longest < block_size + 1:
        raise KilnError(
            f"Got --block-size {block_size}, but the longest training token stream has {longest} "
            f"tokens: use a --block-size below {max(longest - 1, 1)} or give more text."
        )


# ----------------------------------------------------------------------------- fit


def fit_lm(
    cfg: LMTrainConfig,
    spec: dict[str, Any],
    dataset: Any,
    total_steps: int,
    settings: Settings,
    run_name: str,
    on_eval: ProgressFn | None = None,
    init_weights: bytes | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """Ray Train's TorchTrainer over `lm_train_func`; returns its result and rank 0's
    evaluations (streamed to `on_eval` as they come)."""
    from kiln.resources import worker_cpus
    from kiln.training.config import TrainConfig
    from kiln.training.lm_loop import lm_train_func
    from kiln.training.loop import KilnTorchTrainer

    def make_trainer(progress: Queue) -> Any:
        cpus = worker_cpus(TrainConfig(workers=cfg.workers, cpus_per_worker=cfg.cpus_per_worker))
        return KilnTorchTrainer(
            lm_train_func,
            train_loop_config={
                "train": {**cfg.to_dict(), "cpus_per_worker": cpus},
                "spec": spec,
                "shards": dataset.handles,
                "total_steps": total_steps,
                "progress": progress,
                "init_weights": init_weights,
            },
            scaling_config=scaling(cfg.workers, cpus, cfg.gpu),
            run_config=run_config(settings, run_name),
        )

    return fit_with_progress(make_trainer, on_eval)


def final_model(checkpoint: Any, spec: dict[str, Any]) -> Any:
    """The weights of the run's last checkpoint, loaded into the spec's model."""
    from kiln.training.lm import load_lm
    from kiln.training.lm_loop import WEIGHTS_FILE

    if checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with checkpoint.as_directory() as directory:
        return load_lm(spec, load_tensors(Path(directory) / WEIGHTS_FILE))


def run_metrics(history: list[dict[str, Any]], unigram_perplexity: float | None) -> dict[str, Any]:
    """What the version records: the last evaluation, the mean training speed, the curve."""
    if not history:
        raise RuntimeError("training reported no evaluation")
    last = history[-1]
    speeds = [h["tokens_per_s"] for h in history if h.get("tokens_per_s")]
    keep = ("step", "tokens_seen", "train_loss", "val_loss", "val_perplexity", "lr")
    return {
        "val_loss": last.get("val_loss"),
        "perplexity": last.get("val_perplexity"),
        "train_loss": last["train_loss"],
        "tokens_per_s": float(np.median(speeds)) if speeds else None,
        "tokens_seen": last["tokens_seen"],
        "steps": last["step"],
        "unigram_perplexity": unigram_perplexity,
        "history": [{k: h[k] for k in keep if k in h} for h in history],
    }


# ----------------------------------------------------------------------------- the path


def train_lm_and_register(
    settings: Settings,
    request: LMTrainRequest,
    registry: Any,
    on_eval: ProgressFn | None = None,
    on_step: StepFn | None = None,
) -> LMOutcome:
    """The whole path from text to a registered language-model version."""
    from kiln.actors.text import tokenize_dataset, unigram_perplexity
    from kiln.training.artifacts import model_to_files
    from kiln.training.hf_io import default_generation_config, default_tokenizer_config

    started = time.perf_counter()
    step = on_step or (lambda _: None)
    cfg = request.train
    step("loading text")
    dataset = load_corpus(request)
    try:
        step("training the tokenizer" if not cfg.tokenizer else "reading the tokenizer")
        tokenizer_json, special_ids, tokenizer_source = corpus_tokenizer(
            settings, request, dataset, registry
        )
        spec = model_spec(cfg, vocabulary_size(tokenizer_json), special_ids)
        step("tokenising in the shards")
        counts = tokenize_dataset(dataset, tokenizer_json)
        block = int(spec["max_position_embeddings"])
        check_windows(counts, block)
        total_steps = cfg.plan_steps(int(counts["train"]), block)
        step(f"training ({total_steps} steps)")
        result, history = fit_lm(
            cfg, spec, dataset, total_steps, settings, request.run_name, on_eval
        )
        model = final_model(result.checkpoint, spec)
        metrics = run_metrics(history, unigram_perplexity(dataset, spec["vocab_size"]))
        metrics["generate_tokens_per_s"] = generation_speed(model, spec)
        step("registering")
        files = model_to_files(model, spec)
        files["tokenizer.json"] = tokenizer_json
        files["tokenizer_config.json"] = json.dumps(
            default_tokenizer_config(spec, tokenizer_json), indent=2
        ).encode()
        files["generation_config.json"] = json.dumps(default_generation_config(spec)).encode()
        lineage = {
            "dataset_uri": request.data if request.data.startswith("text:") else None,
            "dataset_name": None if request.data.startswith("text:") else request.data,
            "code_version": code_version(),
            "documents": {s: dataset.documents(s) for s in ("train", "val")},
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "tokens_seen": metrics["tokens_seen"],
            "tokenizer_source": tokenizer_source,
            "val_fraction": request.val_fraction,
            "text_field": request.text_field,
            "train_config": cfg.to_dict(),
            "run_name": request.run_name,
            "solver": "adamw",
        }
        record: VersionRecord = ray.get(
            registry.register.remote(
                request.name, files, spec, metrics, lineage, request_id=uuid.uuid4().hex
            )
        )
    finally:
        dataset.release()
    final = history[-1]
    return LMOutcome(
        record=record,
        metrics={k: v for k, v in metrics.items() if k != "history"},
        history=history,
        elapsed_s=time.perf_counter() - started,
        run_name=request.run_name,
        grad_sync=str(final.get("grad_sync", "none")),
        num_workers=int(final.get("num_workers", cfg.workers)),
    )
