"""Offline decoding: prompts in, tokens out, through the model's KV cache.

`generate` and `generate_batch` are the reference decode loop (`kiln generate`, tests, the
checks a serving engine is held to); `sample_next` is the pure sampling step both this loop and
a continuous-batching engine call on a batch of last-token logits. Greedy decoding is argmax,
which `transformers`' `generate(do_sample=False)` also is, so the two agree token for token.
Stop strings are found in the decoded text, since a stop such as "\\n\\n" may fall inside one
token or across several; the returned text ends before the stop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from kiln.training import lm
from kiln.training.errors import KilnError, check_options

FinishReason = Literal["stop", "length"]

logger = logging.getLogger(__name__)


class TextDecoder(Protocol):
    """Anything that turns ids into text: a `tokenizers.Tokenizer`, a transformers tokenizer."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How the next token is chosen from the logits."""

    temperature: float = 0.0
    """0 picks the likeliest token (greedy); above 0 samples from the softened distribution."""
    top_p: float = 1.0
    """Sample only from the likeliest tokens whose probabilities sum to top_p (nucleus)."""
    top_k: int = 0
    """Sample only from the k likeliest tokens; 0 keeps them all."""

    def __post_init__(self) -> None:
        check_options(
            [
                (self.temperature >= 0, "--temperature", self.temperature, "at least 0"),
                (0 < self.top_p <= 1, "--top-p", self.top_p, "above 0 and at most 1"),
                (self.top_k >= 0, "--top-k", self.top_k, "at least 0"),
            ]
        )


@dataclass
class GenerationResult:
    """One prompt's continuation."""

    token_ids: list[int]
    """The new tokens, without the stop token, and without the tokens of a stop string."""
    finish_reason: FinishReason
    """"stop": a stop token or string ended it; "length": it ran out of tokens or context."""
    num_prompt_tokens: int
    text: str | None = None
    """The decoded new tokens, when a tokenizer was given; ends before any stop string."""
    stopped_by: int | str | None = None
    """The stop token id or stop string that ended it."""


GREEDY_BELOW = 1e-6
"""A temperature under this decodes greedily, as 0 does. At such a temperature a draw differs
from the argmax only where the best two logits lie within a few millionths, and dividing the
logits by a smaller one overflows: 5e-324 (a valid JSON number) is 0.0 in float32, which made
every score inf or NaN and the draw an index past the vocabulary (found by the fuzz)."""


def samples(temperature: float) -> bool:
    """Whether a temperature draws at random (False: greedy)."""
    return temperature >= GREEDY_BELOW


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token of each row, (B, V) -> (B,): argmax when temperature is 0, otherwise a
    draw after temperature, top-k and top-p."""
    if not samples(params.temperature):
        return logits.argmax(dim=-1)
    scores = logits.float() / params.temperature  # (B, V)
    if params.top_k:
        scores = keep_top_k(scores, params.top_k)
    if params.top_p < 1:
        scores = keep_top_p(scores, params.top_p)
    probs = torch.softmax(scores, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Scores (B, V) with all but the k highest of each row set to -inf (ties kept)."""
    kth = scores.topk(min(k, scores.shape[-1]), dim=-1).values[..., -1:]  # (B, 1)
    return scores.masked_fill(scores < kth, float("-inf"))


def keep_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Scores (B, V) keeping the fewest likeliest tokens whose probabilities reach top_p."""
    sorted_scores, order = scores.sort(dim=-1, descending=True)  # (B, V)
    sorted_probs = torch.softmax(sorted_scores, dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V)
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False  # the likeliest token stays, even for a top_p of 0.0 in float32
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (B, V)
    return scores.masked_fill(drop, float("-inf"))


def generate(
    model: lm.CausalLM,
    spec: dict[str, Any],
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_ids: Sequence[int] | None = None,
    stop: Sequence[str] = (),
    tokenizer: TextDecoder | None = None,
) -> GenerationResult:
    """Continue one prompt. `stop_ids` defaults to the spec's eos token(s); `stop` strings
    need the `tokenizer`."""
    return generate_batch(
        model,
        spec,
        [prompt_ids],
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop_ids=stop_ids,
        stop=stop,
        tokenizer=tokenizer,
    )[0]


@torch.no_grad()
def generate_batch(
    model: lm.CausalLM,
    spec: dict[str, Any],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_ids: Sequence[int] | None = None,
    stop: Sequence[str] = (),
    tokenizer: TextDecoder | None = None,
) -> list[GenerationResult]:
    """Continue several prompts of any lengths together, one row of the cache each.
    Greedy rows get the tokens they would get alone; sampled rows share one generator."""
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    rows = start_rows(spec, prompts, max_new_tokens, stop_ids, stop, tokenizer)
    if all(row.done for row in rows):
        return [row.result() for row in rows]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = model.new_cache(len(rows), max_len=max(row.max_len for row in rows))
    logits = prefill(model, cache, prompts)  # (B, V)
    while True:
        next_ids = sample_next(logits, params, generator).tolist()  # (B,)
        for row, token in zip(rows, next_ids, strict=True):
            row.accept(token)
        if all(row.done for row in rows):
            return [row.result() for row in rows]
        logits = decode_step(model, cache, next_ids, [not row.done for row in rows])


def prefill(
    model: lm.CausalLM, cache: lm.KVCache, prompts: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Run the prompts, right-padded, into the empty cache; the logits after each one's last
    token, (B, V)."""
    device = cache.lengths.device
    lengths = torch.tensor([len(prompt) for prompt in prompts], device=device)  # (B,)
    input_ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        input_ids[row, : len(prompt)] = torch.tensor(list(prompt), device=device)
    logits = model(input_ids, cache=cache, num_new=lengths)  # (B, T, V)
    return logits[torch.arange(len(prompts), device=device), lengths - 1]  # (B, V)


def decode_step(
    model: lm.CausalLM, cache: lm.KVCache, token_ids: list[int], active: list[bool]
) -> torch.Tensor:
    """Feed each active row its last token; the logits of the next one, (B, V)."""
    device = cache.lengths.device
    input_ids = torch.tensor(token_ids, device=device)[:, None]  # (B, 1)
    num_new = torch.tensor(active, device=device).long()  # (B,) finished rows add nothing
    return model(input_ids, cache=cache, num_new=num_new)[:, -1]  # (B, V)


@dataclass
class RowState:
    """One prompt's progress through the decode loop, and the rules that end it."""

    num_prompt_tokens: int
    budget: int
    stop_ids: frozenset[int]
    stop: tuple[str, ...]
    tokenizer: TextDecoder | None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stopped_by: int | str | None = None
    text: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def max_len(self) -> int:
        """Cache slots the row can need: the last new token is never fed back."""
        return self.num_prompt_tokens + max(self.budget - 1, 0)

    def accept(self, token: int) -> None:
        if self.done:
            return
        if token in self.stop_ids:
            self.finish("stop", token)
            return
        self.token_ids.append(token)
        if self.stop and self.cut_at_stop_string():
            return
        if len(self.token_ids) >= self.budget:
            self.finish("length", None)

    def cut_at_stop_string(self) -> bool:
        """End the row if its text now holds a stop string, keeping what comes before it and
        the tokens that decode within that."""
        assert self.tokenizer is not None
        text = self.tokenizer.decode(self.token_ids)
        found = [(text.find(s), s) for s in self.stop if s in text]
        if not found:
            return False
        start, string = min(found)
        self.text = text[:start]
        while self.token_ids and not self.text.startswith(self.tokenizer.decode(self.token_ids)):
            self.token_ids.pop()
        self.finish("stop", string)
        return True

    def finish(self, reason: FinishReason, stopped_by: int | str | None) -> None:
        self.finish_reason, self.stopped_by = reason, stopped_by

    def result(self) -> GenerationResult:
        text = self.text
        if text is None and self.tokenizer is not None:
            text = self.tokenizer.decode(self.token_ids)
        assert self.finish_reason is not None
        return GenerationResult(
            token_ids=self.token_ids,
            finish_reason=self.finish_reason,
            num_prompt_tokens=self.num_prompt_tokens,
            text=text,
            stopped_by=self.stopped_by,
        )


def start_rows(
    spec: dict[str, Any],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int] | None,
    stop: Sequence[str],
    tokenizer: TextDecoder | None,
) -> list[RowState]:
    """A checked RowState per prompt; a row with no room to generate starts finished."""
    context = lm.context_length(spec)
    check_options([(max_new_tokens >= 0, "--max-tokens", max_new_tokens, "at least 0")])
    if stop and tokenizer is None:
        raise KilnError("Stop strings need the model's tokenizer: pass tokenizer=.")
    stops = frozenset(default_stop_ids(spec) if stop_ids is None else stop_ids)
    rows = []
    for prompt in prompts:
        check_prompt(prompt, context)
        budget = min(max_new_tokens, context - len(prompt))
        row = RowState(len(prompt), budget, stops, tuple(s for s in stop if s), tokenizer)
        if budget == 0:
            row.finish("length", None)
        rows.append(row)
    return rows


def check_prompt(prompt: Sequence[int], context: int) -> None:
    if not prompt:
        raise KilnError("The prompt is empty: give at least one token.")
    if len(prompt) >= context:
        raise KilnError(
            f"The prompt has {len(prompt)} tokens; the model's context is {context}: "
            f"shorten the prompt to fewer than {context} tokens."
        )


def default_stop_ids(spec: dict[str, Any]) -> list[int]:
    """The spec's eos_token_id, which Hugging Face configs give as an id or a list of ids."""
    eos = spec.get("eos_token_id")
    if eos is None:
        return []
    return [int(token) for token in eos] if isinstance(eos, list) else [int(eos)]
