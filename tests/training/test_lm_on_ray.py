"""The language-model Train loop on real Ray Train: FSDP over gloo on CPU, and a worker killed
mid-run resuming from its last checkpoint."""

from __future__ import annotations

import os
import signal
import sysconfig
import uuid
from pathlib import Path

import pytest

from kiln.actors.text import (
    TextSourceSpec,
    load_text_dataset,
    sample_for_tokenizer,
    tokenize_dataset,
)
from kiln.lm_pipeline import final_model, fit_lm, model_spec
from kiln.training.lm_config import LMTrainConfig
from kiln.training.tokenizer import tokenizer_to_bytes, train_bpe

CORPUS = f"text:{Path(sysconfig.get_paths()['stdlib'])}/json/*.py"


@pytest.fixture(scope="module")
def corpus(ray_local):
    dataset = load_text_dataset(TextSourceSpec(uri=CORPUS), 2)
    tokenizer = train_bpe(sample_for_tokenizer(dataset, 1 << 20), 384)
    tokenize_dataset(dataset, tokenizer_to_bytes(tokenizer))
    ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    yield dataset, tokenizer.get_vocab_size(), ids
    dataset.release()


def run(corpus, settings, cfg: LMTrainConfig, steps: int, on_eval=None):
    dataset, vocab, ids = corpus
    spec = model_spec(cfg, vocab, ids)
    name = f"lm-{uuid.uuid4().hex[:8]}"
    result, history = fit_lm(cfg, spec, dataset, steps, settings, name, on_eval)
    return spec, result, history


@pytest.mark.slow  # about 50 s
def test_fsdp_shards_the_model_over_two_cpu_workers(corpus, settings_session):
    cfg = LMTrainConfig(workers=2, strategy="fsdp", block_size=32, batch_size=8, eval_every=10)
    spec, result, history = run(corpus, settings_session, cfg, 30)
    assert [h["step"] for h in history] == [10, 20, 30]
    assert {h["grad_sync"] for h in history} == {"fsdp"}
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    model = final_model(result.checkpoint, spec)  # the gathered full weights load whole
    assert sum(p.numel() for p in model.parameters()) > 100_000


@pytest.mark.slow
@pytest.mark.chaos
def test_a_killed_worker_resumes_from_the_last_checkpoint(corpus, settings_session):
    cfg = LMTrainConfig(workers=2, block_size=32, batch_size=8, eval_every=5)
    killed: dict[str, int] = {}

    def kill_rank_1_at_step_10(metrics):
        if metrics["step"] == 10 and not killed:
            killed["pid"] = metrics["workers"][1]["pid"]
            os.kill(killed["pid"], signal.SIGKILL)

    _, result, history = run(corpus, settings_session, cfg, 30, kill_rank_1_at_step_10)
    steps = [h["step"] for h in history]
    assert killed, "the victim was never killed"
    assert steps[-1] == 30 and set(steps) == set(range(5, 31, 5))
    assert len(steps) - len(set(steps)) <= 2  # at most two evaluations redone
    assert killed["pid"] not in {w["pid"] for w in history[-1]["workers"]}  # a new group
    # Resumed, not restarted: the tokens seen continue from the checkpoint's count.
    assert history[-1]["tokens_seen"] == 30 * cfg.tokens_per_step(32)
    assert result.metrics["step"] == 30
