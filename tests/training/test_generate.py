"""Offline decoding: greedy decoding through the KV cache equals transformers' generate token
for token, batching does not change a row's tokens, and stops (ids, strings, the context)
end a row where they should."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import PreTrainedModel  # noqa: E402

from kiln.training.errors import KilnError  # noqa: E402
from kiln.training.generate import (  # noqa: E402
    SamplingParams,
    generate,
    generate_batch,
    keep_top_p,
    sample_next,
)
from kiln.training.hf_io import read_hf_folder  # noqa: E402
from kiln.training.lm import CausalLM, load_lm  # noqa: E402
from kiln.training.tokenizer import EOS_ID, train_bpe  # noqa: E402
from tests.training.test_hf_io import VOCAB_SIZE, corpus, hf_model, train_tiny_lm  # noqa: E402

NEW_TOKENS = 20
PROMPTS = [[5, 17, 42], [7] * 11, list(range(30, 55))]
"""Three lengths: the greedy tests run each alone and all together."""


def imported(case: str, tmp_path: Path) -> tuple[PreTrainedModel, CausalLM, dict]:
    """A transformers model of a wide init (its top logits are far apart: no near-ties for the
    two implementations to break differently) and Kiln's import of it."""
    reference = hf_model(case, init_std=0.3)
    reference.save_pretrained(tmp_path)
    spec, state_dict, _, _ = read_hf_folder(tmp_path)
    return reference, load_lm(spec, state_dict), spec


def hf_greedy(reference: PreTrainedModel, prompt: list[int]) -> tuple[list[int], float]:
    """transformers' greedy tokens, and the smallest gap between a step's top two logits."""
    output = reference.generate(  # type: ignore[operator]
        torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    top2 = torch.stack([scores[0].topk(2).values for scores in output.scores])  # (N, 2)
    return output.sequences[0, len(prompt) :].tolist(), float((top2[:, 0] - top2[:, 1]).min())


@pytest.mark.parametrize("case", ["llama", "qwen2", "gpt2"])
def test_greedy_equals_transformers_generate(case: str, tmp_path: Path) -> None:
    reference, model, spec = imported(case, tmp_path)
    for prompt in PROMPTS:
        expected, margin = hf_greedy(reference, prompt)
        assert margin > 1e-3  # the setup has no near-ties; equality below is meaningful
        result = generate(model, spec, prompt, NEW_TOKENS, stop_ids=())
        assert result.token_ids == expected
        assert (result.finish_reason, result.num_prompt_tokens) == ("length", len(prompt))


def test_batched_rows_get_the_tokens_each_gets_alone(tmp_path: Path) -> None:
    _, model, spec = imported("llama", tmp_path)
    alone = [generate(model, spec, prompt, NEW_TOKENS, stop_ids=()).token_ids for prompt in PROMPTS]
    together = generate_batch(model, spec, PROMPTS, NEW_TOKENS, stop_ids=())
    assert [result.token_ids for result in together] == alone


def test_a_stop_id_ends_its_row_only(tmp_path: Path) -> None:
    _, model, spec = imported("llama", tmp_path)
    free = generate_batch(model, spec, PROMPTS[:2], NEW_TOKENS, stop_ids=())
    stop_token = next(t for t in free[0].token_ids[2:] if t not in free[1].token_ids)
    first = free[0].token_ids.index(stop_token)
    results = generate_batch(model, spec, PROMPTS[:2], NEW_TOKENS, stop_ids=[stop_token])
    assert results[0].token_ids == free[0].token_ids[:first]  # the stop token left out
    assert (results[0].finish_reason, results[0].stopped_by) == ("stop", stop_token)
    assert (results[1].token_ids, results[1].finish_reason) == (free[1].token_ids, "length")


def test_the_eos_of_the_spec_stops_by_default(tmp_path: Path) -> None:
    _, model, spec = imported("llama", tmp_path)
    first_token = generate(model, spec, PROMPTS[0], 1).token_ids[0]
    result = generate(model, {**spec, "eos_token_id": [99999, first_token]}, PROMPTS[0], 5)
    assert (result.token_ids, result.finish_reason) == ([], "stop")


@pytest.fixture(scope="module")
def trained() -> tuple[CausalLM, dict, Tokenizer]:
    """A tiny Kiln model trained a few dozen steps on repetitive text, and its tokenizer."""
    tokenizer = train_bpe(corpus(), vocab_size=VOCAB_SIZE)
    model, spec = train_tiny_lm(tokenizer)
    return model, spec, tokenizer


def test_stop_strings_never_reach_the_text(trained: tuple[CausalLM, dict, Tokenizer]) -> None:
    model, spec, tokenizer = trained
    prompt = tokenizer.encode("kiln fires").ids
    free = generate(model, spec, prompt, 30, stop_ids=(), tokenizer=tokenizer)
    assert free.text is not None and len(free.text) > 12
    stop = free.text[8:11]
    result = generate(model, spec, prompt, 30, stop_ids=(), stop=["zzz", stop], tokenizer=tokenizer)
    assert result.text == free.text[: free.text.index(stop)]
    assert (result.finish_reason, result.stopped_by) == ("stop", stop)
    assert result.text.startswith(tokenizer.decode(result.token_ids))
    assert result.token_ids == free.token_ids[: len(result.token_ids)]


def test_generation_stops_at_the_context(trained: tuple[CausalLM, dict, Tokenizer]) -> None:
    model, spec, _ = trained
    result = generate(model, spec, list(range(3, 60)), 50, stop_ids=())
    assert (len(result.token_ids), result.finish_reason) == (64 - 57, "length")


def test_prompts_longer_than_the_context_are_refused(
    trained: tuple[CausalLM, dict, Tokenizer],
) -> None:
    model, spec, _ = trained
    with pytest.raises(KilnError, match="The prompt has 80 tokens; the model's context is 64"):
        generate(model, spec, [5] * 80, 4)
    with pytest.raises(KilnError, match="The prompt is empty"):
        generate(model, spec, [], 4)
    with pytest.raises(KilnError, match="Stop strings need the model's tokenizer"):
        generate(model, spec, [5], 4, stop=["x"])
    assert generate(model, spec, [5], 0).token_ids == []


def test_seeded_sampling_repeats(trained: tuple[CausalLM, dict, Tokenizer]) -> None:
    model, spec, _ = trained
    kwargs: dict[str, Any] = {"temperature": 1.5, "top_k": 50, "top_p": 0.95, "stop_ids": ()}
    first = generate(model, spec, [EOS_ID, 5], 15, seed=3, **kwargs).token_ids
    assert generate(model, spec, [EOS_ID, 5], 15, seed=3, **kwargs).token_ids == first
    others = [generate(model, spec, [EOS_ID, 5], 15, seed=s, **kwargs).token_ids for s in (4, 5)]
    assert any(other != first for other in others)


def test_sample_next_respects_top_k_and_top_p() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -5.0]]).repeat(400, 1)  # (B, V)
    generator = torch.Generator().manual_seed(0)
    assert sample_next(logits, SamplingParams(), generator).unique().tolist() == [1]
    top2 = sample_next(logits, SamplingParams(temperature=1.0, top_k=2), generator)
    assert set(top2.tolist()) == {1, 3}
    narrow = sample_next(logits, SamplingParams(temperature=1.0, top_p=0.01), generator)
    assert narrow.unique().tolist() == [1]
    hot = sample_next(logits, SamplingParams(temperature=100.0), generator)
    assert set(hot.tolist()) == {0, 1, 2, 3, 4}


def test_keep_top_p_keeps_the_fewest_tokens_that_reach_p() -> None:
    scores = torch.tensor([[0.5, 0.3, 0.2]]).log()
    kept = keep_top_p(scores, 0.75).isfinite().tolist()
    assert kept == [[True, True, False]]
    assert keep_top_p(scores, 1.0).isfinite().all()


@pytest.mark.parametrize(
    ("params", "flag"),
    [
        ({"temperature": -1.0}, "--temperature"),
        ({"top_p": 0.0}, "--top-p"),
        ({"top_k": -2}, "--top-k"),
    ],
)
def test_sampling_params_name_the_bad_option(params: dict, flag: str) -> None:
    with pytest.raises(KilnError, match=f"for {flag}"):
        SamplingParams(**params)
