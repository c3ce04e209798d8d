"""The continuous-batching engine: a request's greedy tokens equal `kiln.training.generate`'s alone
and in a busy batch, chunked prefill changes nothing and stalls nobody, stops (ids, strings,
the context) end a choice where they should and a stop string never reaches a client, seeded
sampling ignores its batch companions, the KV budget and the waiting queue hold, an abort frees
memory within one step, and the OpenAI parameters (n, logprobs, penalties) mean what they say.

Two models: a tiny Llama trained a few dozen steps with a trained byte-level BPE tokenizer
(logits far from ties, so token equality is meaningful), and a "bigram" Llama whose attention
and MLP are zeroed, so each next token is a scripted function of the last one (exact stop
strings and UTF-8 characters split across byte tokens)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kiln.serving.engine import (  # noqa: E402
    KV_BLOCK_TOKENS,
    BlockManager,
    Delta,
    Engine,
    EngineConfig,
    EngineFailed,
    GenerationRequest,
    IncrementalDetokenizer,
    QueueFull,
    RequestMetrics,
    Scheduler,
    Usage,
    keep_top_k_top_p,
    new_request_state,
    pick_device,
)
from kiln.training.errors import KilnError  # noqa: E402
from kiln.training.generate import generate, keep_top_k, keep_top_p  # noqa: E402
from kiln.training.lm import CausalLM, build_lm, lm_spec  # noqa: E402
from kiln.training.tokenizer import train_bpe  # noqa: E402
from tests.conftest import wait_for  # noqa: E402
from tests.training.test_hf_io import VOCAB_SIZE, corpus, train_tiny_lm  # noqa: E402

CONTEXT = 64
Model = tuple[CausalLM, dict[str, Any], Tokenizer]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_bpe(corpus(), vocab_size=VOCAB_SIZE)


@pytest.fixture(scope="module")
def trained(tokenizer: Tokenizer) -> Model:
    """A tiny Llama trained 40 steps on repetitive text (as tests/training/test_generate.py)."""
    model, spec = train_tiny_lm(tokenizer, CONTEXT)
    return model, spec, tokenizer


def bigram(tokenizer: Tokenizer, successor: dict[int, int]) -> tuple[CausalLM, dict[str, Any]]:
    """A one-layer Llama with attention and MLP zeroed: the residual stream is the last token's
    embedding, and the head row of `successor[a]` points along the embedding of `a`."""
    spec = lm_spec("tiny", vocab_size=VOCAB_SIZE, block_size=CONTEXT, layers=1, dim=64)
    spec["tie_word_embeddings"] = False
    torch.manual_seed(0)
    model = build_lm(spec).eval()
    state = model.state_dict()  # views of the parameters: writing them writes the model
    with torch.no_grad():
        for key, tensor in state.items():
            if key.endswith(("o_proj.weight", "down_proj.weight")):
                tensor.zero_()
        embeddings = state["model.embed_tokens.weight"]  # (V, C)
        head = torch.zeros_like(state["lm_head.weight"])  # (V, C)
        for token, following in successor.items():
            head[following] += 10 * embeddings[token] / embeddings[token].norm()
        state["lm_head.weight"].copy_(head)
    return model, spec


def chain(ids: list[int]) -> dict[int, int]:
    """Each id followed by the next, the last by the first."""
    return {token: ids[(i + 1) % len(ids)] for i, token in enumerate(ids)}


def greedy(prompt: list[int], max_tokens: int | None, **options: Any) -> GenerationRequest:
    return GenerationRequest(
        prompt_ids=tuple(prompt), max_tokens=max_tokens, temperature=0.0, **options
    )


def tokens_of(deltas: list[Delta], index: int = 0) -> list[int]:
    return [token for delta in deltas if delta.index == index for token in delta.token_ids]


def text_of(deltas: list[Delta], index: int = 0) -> str:
    return "".join(delta.text for delta in deltas if delta.index == index)


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text).ids


# --- batching ----------------------------------------------------------------------------------


def test_greedy_equals_generate_alone_and_in_a_busy_batch(trained: Model) -> None:
    model, spec, tokenizer = trained
    texts = ["kiln fires", "clay at night and day slowly", "glaze", "pots and clay.", "at", "day"]
    prompts = [encode(tokenizer, text) for text in texts]
    budgets = [12, 20, 6, 16, 9, 14]
    expected = [
        generate(model, spec, prompt, budget).token_ids
        for prompt, budget in zip(prompts, budgets, strict=True)
    ]
    alone = Engine(model, spec, tokenizer, EngineConfig(max_batch=4))
    for prompt, budget, tokens in zip(prompts, budgets, expected, strict=True):
        handle = alone.submit(greedy(prompt, budget))
        alone.run_until_idle()
        assert tokens_of(handle.drain()) == tokens

    busy = Engine(model, spec, tokenizer, EngineConfig(max_batch=4, prefill_chunk_tokens=4))
    handles = [busy.submit(greedy(prompts[i], budgets[i])) for i in range(3)]
    for i in range(3, 6):  # the rest join while the first ones decode, and wait for slots
        for _ in range(3):
            busy.step()
        handles.append(busy.submit(greedy(prompts[i], budgets[i])))
    busy.run_until_idle()
    assert [tokens_of(handle.drain()) for handle in handles] == expected
    assert busy.stats().kv_blocks_used == 0


def test_chunked_prefill_gives_the_same_tokens_and_streams_keep_going(trained: Model) -> None:
    model, spec, tokenizer = trained
    long_prompt = encode(tokenizer, " ".join(corpus()[:8]))[:40]
    assert len(long_prompt) == 40
    whole = Engine(model, spec, tokenizer, EngineConfig(max_batch=2))
    handle = whole.submit(greedy(long_prompt, 10))
    whole.run_until_idle()
    expected = tokens_of(handle.drain())

    chunked = Engine(model, spec, tokenizer, EngineConfig(max_batch=2, prefill_chunk_tokens=8))
    running = chunked.submit(greedy(encode(tokenizer, "kiln"), 20, stop_token_ids=()))
    chunked.step()
    assert len(tokens_of(running.drain())) == 1  # prefilled, decoding from the next step
    late = chunked.submit(greedy(long_prompt, 10))
    late_state = chunked.requests[late.request_id]
    for done in (8, 16, 24, 32, 40):  # five chunks; the running stream gets a token each step
        chunked.step()
        assert late_state.num_computed == done
        assert len(running.drain()[0].token_ids) == 1
    chunked.run_until_idle()
    assert tokens_of(late.drain()) == expected


# --- stops -------------------------------------------------------------------------------------


def test_a_stop_string_split_across_tokens_never_reaches_a_delta(tokenizer: Tokenizer) -> None:
    letters = encode(tokenizer, "abcdef")  # one token per letter
    model, spec = bigram(tokenizer, chain(letters))
    engine = Engine(model, spec, tokenizer, EngineConfig(max_batch=2))
    stopped = engine.submit(greedy(letters[:1], 30, stop=("cde",), stop_token_ids=()))
    near_miss = engine.submit(greedy(letters[:1], 12, stop=("cdX",), stop_token_ids=()))
    streamed: dict[str, list[Delta]] = {stopped.request_id: [], near_miss.request_id: []}
    while engine.step():
        for handle in (stopped, near_miss):
            streamed[handle.request_id] += handle.drain()
    deltas = streamed[stopped.request_id]
    assert all("c" not in delta.text for delta in deltas)  # not even the stop's first letter
    assert (text_of(deltas), tokens_of(deltas), deltas[-1].finish_reason) == (
        "b",
        letters[1:2],
        "stop",
    )
    # "c" and "cd" wait until the next letter shows they begin no stop, then go out.
    near = streamed[near_miss.request_id]
    assert text_of(near) == ("bcdefa" * 3)[:12] and near[-1].finish_reason == "length"
    sent = [text_of(near[: i + 1]) for i in range(len(near) - 1)]
    assert not any(text.endswith(("c", "cd")) for text in sent)
    assert stopped.done and near_miss.done


def test_stop_strings_with_the_trained_model(trained: Model) -> None:
    model, spec, tokenizer = trained
    prompt = encode(tokenizer, "glaze pots and")
    engine = Engine(model, spec, tokenizer, EngineConfig(max_batch=2))
    free = engine.submit(greedy(prompt, 30, stop_token_ids=()))
    engine.run_until_idle()
    free_deltas = free.drain()
    free_text = text_of(free_deltas)
    boundary = len(tokenizer.decode(tokens_of(free_deltas)[:1]))
    stop = free_text[boundary - 2 : boundary + 2]  # across the first and second tokens
    assert len(stop) == 4 and free_text.index(stop) == boundary - 2
    handle = engine.submit(greedy(prompt, 30, stop=("zzz", stop), stop_token_ids=()))
    engine.run_until_idle()
    deltas = handle.drain()
    assert all(stop not in delta.text for delta in deltas)
    assert text_of(deltas) == free_text[: free_text.index(stop)]
    assert deltas[-1].finish_reason == "stop"
    assert tokens_of(deltas) == []  # no token lies wholly before it


def test_utf8_split_across_byte_tokens_streams_whole_characters(tokenizer: Tokenizer) -> None:
    pieces = encode(tokenizer, "🔥é")  # six byte tokens: 4 + 2
    assert len(pieces) == 6
    model, spec = bigram(tokenizer, chain(pieces))
    engine = Engine(model, spec, tokenizer, EngineConfig(max_batch=1))
    handle = engine.submit(greedy(pieces[-1:], 15, stop_token_ids=()))
    engine.run_until_idle()
    deltas = handle.drain()
    assert text_of(deltas) == "🔥é🔥é\ufffd"  # 15 bytes: the last emoji is cut
    assert all("\ufffd" not in delta.text for delta in deltas[:-1])
    for delta in deltas[:-1]:  # each delta's tokens decode to exactly its text
        assert tokenizer.decode(list(delta.token_ids)) == delta.text
    assert tokens_of(deltas) == (pieces * 3)[:15]


def test_the_detokenizer_holds_back_half_characters(tokenizer: Tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, stop=())
    released = []
    for token in encode(tokenizer, "clay 🔥 é!"):
        detokenizer.add(token)
        released.append(detokenizer.release(final=False)[0])
    assert "".join(released) == "clay 🔥 é!" and "\ufffd" not in "".join(released)


def test_stop_ids_and_the_context_end_choices(trained: Model) -> None:
    model, spec, tokenizer = trained
    prompt = encode(tokenizer, "clay")
    engine = Engine(model, spec, tokenizer, EngineConfig(max_batch=2))
    free = engine.submit(greedy(prompt, 8, stop_token_ids=()))
    full = engine.submit(greedy(list(range(3, 60)), None, stop_token_ids=()))
    engine.run_until_idle()
    free_tokens = tokens_of(free.drain())
    last = full.drain()[-1]
    assert (last.finish_reason, last.usage) == ("length", Usage(57, CONTEXT - 57))
    stop_token = free_tokens[3]
    first = free_tokens.index(stop_token)
    stopped = engine.submit(greedy(prompt, 8, stop_token_ids=(stop_token,)))
    engine.run_until_idle()
    deltas = stopped.drain()
    assert tokens_of(deltas) == free_tokens[:first]
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == first + 1


# --- memory, queue, abort ----------------------------------------------------------------------


def test_requests_wait_for_kv_blocks_and_go_when_freed(trained: Model) -> None:
    model, spec, tokenizer = trained
    config = EngineConfig(max_batch=4, kv_cache_tokens=3 * KV_BLOCK_TOKENS)
    engine = Engine(model, spec, tokenizer, config)
    first = engine.submit(greedy([5, 6, 7], 20, stop_token_ids=()))  # 23 positions: 2 blocks
    second = engine.submit(greedy([8, 9], 20, stop_token_ids=()))  # 2 more: only 1 is left
    engine.step()
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_blocks_used) == (1, 1, 2)
    first_deltas = first.drain()
    while first_deltas[-1].finish_reason is None:
        assert engine.stats().num_waiting == 1
        engine.step()
        first_deltas += first.drain()
    engine.step()  # the first one's blocks went back as it finished: the second starts
    assert engine.stats().num_running == 1 and engine.stats().kv_blocks_used == 2
    engine.run_until_idle()
    assert len(tokens_of(second.drain())) == 20
    with pytest.raises(KilnError, match="needs 4 KV blocks of 16 tokens.*holds 3"):
        engine.submit(greedy([5] * 30, 30))


def test_the_waiting_queue_is_bounded(trained: Model) -> None:
    model, spec, tokenizer = trained
    config = EngineConfig(max_batch=1, max_waiting=2, retry_after_s=3)
    engine = Engine(model, spec, tokenizer, config)
    engine.submit(greedy([5], 4))
    engine.submit(greedy([6], 4))
    with pytest.raises(QueueFull, match="retry in 3 s") as raised:
        engine.submit(greedy([7], 4))
    assert raised.value.retry_after_s == 3 and isinstance(raised.value, KilnError)
    engine.step()  # the first is admitted: one place frees
    engine.submit(greedy([7], 4))


def test_abort_frees_the_slot_and_blocks_within_one_step(trained: Model) -> None:
    model, spec, tokenizer = trained
    engine = Engine(model, spec, tokenizer, EngineConfig(max_batch=2))
    handle = engine.submit(greedy([5, 6], 40, stop_token_ids=()))
    other = engine.submit(greedy([7], 5, stop_token_ids=()))
    for _ in range(3):
        engine.step()
    assert engine.stats().kv_blocks_used == 4
    handle.drain()
    steps_before = engine.num_steps
    assert engine.abort(handle.request_id)
    engine.step()
    assert engine.num_steps - steps_before == 1
    stats = engine.stats()
    assert (stats.num_running, stats.kv_blocks_used) == (1, 1)
    assert engine.blocks.free_slots[0] == 0  # its slot is free for the next request
    assert [delta.finish_reason for delta in handle.drain()] == ["abort"]
    assert not engine.abort(handle.request_id)
    engine.run_until_idle()
    assert len(tokens_of(other.drain())) == 5
    waiting = Engine(model, spec, tokenizer, EngineConfig(max_batch=1))
    waiting.submit(greedy([5], 4))
    queued = waiting.submit(greedy([6], 4))
    waiting.step()
    assert waiting.abort(queued.request_id) and waiting.stats().num_waiting == 0
    assert queued.drain()[-1].finish_reason == "abort"


# --- sampling parameters -----------------------------------------------------------------------


def sampled(prompt: list[int], seed: int | None, **options: Any) -> GenerationRequest:
    defaults: dict[str, Any] = {"temperature": 1.2, "top_k": 40, "top_p": 0.95, "max_tokens": 15}
    return GenerationRequest(
        prompt_ids=tuple(prompt), seed=seed, stop_token_ids=(), **{**defaults, **options}
    )


def test_seeded_sampling_repeats_whatever_shares_the_batch(trained: Model) -> None:
    model, spec, tokenizer = trained
    prompt = encode(tokenizer, "kiln fires")
    engine = Engine(model, spec, tokenizer, EngineConfig(max_batch=6, prefill_chunk_tokens=4))
    alone = engine.submit(sampled(prompt, seed=7))
    engine.run_until_idle()
    expected = tokens_of(alone.drain())
    companions = [
        engine.submit(sampled(encode(tokenizer, text), seed=None, temperature=t))
        for text, t in (("clay at night", 0.7), ("glaze pots slowly", 2.0), ("day", 0.0))
    ]
    engine.step()
    engine.step()
    again = engine.submit(sampled(prompt, seed=7))
    other_seeds = [engine.submit(sampled(prompt, seed=seed)) for seed in (8, 9)]
    engine.run_until_idle()
    assert tokens_of(again.drain()) == expected
    assert any(tokens_of(handle.drain()) != expected for handle in other_seeds)
    assert all(len(tokens_of(handle.drain())) == 15 for handle in companions)


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 5e-324, "top_p": 1.0},
        {"temperature": 1e-40, "top_p": 1.0},
        {"temperature": 1e-7, "top_p": 1.0},
        {"top_p": 5e-324},
    ],
)
def test_a_temperature_or_top_p_too_small_for_float32_decodes_greedily(
    trained: Model, options: dict[str, Any]
) -> None:
    """5e-324 is 0.0 in float32: the scores were inf or NaN (or every token dropped) and the
    draw an index past the vocabulary, which failed the engine step and every request in it
    (the fuzz found both)."""
    model, spec, tokenizer = trained
    prompt = encode(tokenizer, "clay at night")
    engine = Engine(model, spec, tokenizer, EngineConfig(max_batch=4))
    tiny = engine.submit(sampled(prompt, seed=None, top_k=0, **options))
    companion = engine.submit(sampled(encode(tokenizer, "kiln fires"), seed=3))
    engine.run_until_idle()
    expected = generate(model, spec, prompt, 15, stop_ids=()).token_ids
    assert tokens_of(tiny.drain()) == expected
    assert len(tokens_of(companion.drain())) == 15


def test_n_choices_share_one_prefill(trained: Model) -> None:
    model, spec, tokenizer = trained
    prompt = encode(tokenizer, "glaze pots and")
    engine = Engine(model, spec, tokenizer, EngineConfig(max_batch=4))
    both = engine.submit(sampled(prompt, seed=3, n=2))
    engine.run_until_idle()
    deltas = both.drain()
    choices = [tokens_of(deltas, 0), tokens_of(deltas, 1)]
    assert choices[0] != choices[1] and all(len(c) == 15 for c in choices)
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 30
    second = engine.submit(sampled(prompt, seed=4))  # choice 1 draws from seed + 1
    engine.run_until_idle()
    assert tokens_of(second.drain()) == choices[1]  # the forked cache equals a prefill
    greedy_pair = engine.submit(greedy(prompt, 10, n=2))
    engine.run_until_idle()
    pair = greedy_pair.drain()
    assert tokens_of(pair, 0) == tokens_of(pair, 1) == generate(model, spec, prompt, 10).token_ids


def test_logprobs_are_the_log_softmax_of_a_direct_forward(trained: Model) -> None:
    model, spec, tokenizer = trained
    prompt = encode(tokenizer, "clay at")
    engine = Engine(model, spec, tokenizer, EngineConfig(max_batch=2))
    request = greedy(prompt, 6, logprobs=True, top_logprobs=3, stop_token_ids=())
    handle = engine.submit(request)
    engine.submit(greedy([5, 6, 7], 6))  # a companion without logprobs
    engine.run_until_idle()
    deltas = handle.drain()
    tokens, logprobs = tokens_of(deltas), [lp for d in deltas for lp in d.logprobs or ()]
    assert len(logprobs) == len(tokens) == 6
    with torch.no_grad():
        for t, entry in enumerate(logprobs):
            expected = torch.log_softmax(model(torch.tensor([prompt + tokens[:t]]))[0, -1], -1)
            values, ids = expected.topk(3)
            assert entry.token_id == tokens[t] == ids[0]
            assert entry.logprob == pytest.approx(float(expected[tokens[t]]), abs=1e-4)
            assert [i for i, _ in entry.top] == ids.tolist()
            assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)


@pytest.mark.parametrize(
    ("presence", "frequency"), [(0.0, 1.5), (1.5, 0.0), (-0.5, 0.3)], ids=["freq", "pres", "mix"]
)
def test_penalties_follow_openai_formula(trained: Model, presence: float, frequency: float) -> None:
    model, spec, tokenizer = trained
    prompt = encode(tokenizer, "kiln")
    options = {"presence_penalty": presence, "frequency_penalty": frequency}
    engine = Engine(model, spec, tokenizer, EngineConfig(max_batch=2))
    handle = engine.submit(greedy(prompt, 20, stop_token_ids=(), **options))
    plain = engine.submit(greedy(prompt, 20, stop_token_ids=()))
    engine.run_until_idle()
    tokens = tokens_of(handle.drain())
    expected: list[int] = []
    counts = torch.zeros(VOCAB_SIZE)
    with torch.no_grad():
        for _ in range(20):
            logits = model(torch.tensor([prompt + expected]))[0, -1]
            penalised = logits - frequency * counts - presence * (counts > 0).float()
            expected.append(int(penalised.argmax()))
            counts[expected[-1]] += 1
    assert tokens == expected
    assert tokens != tokens_of(plain.drain())  # the penalty changed what was picked


def test_keep_top_k_top_p_equals_the_offline_rules_row_by_row() -> None:
    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    top_k, top_p = torch.tensor([0, 5, 0, 3]), torch.tensor([1.0, 1.0, 0.6, 0.9])
    kept = keep_top_k_top_p(scores, top_k, top_p)
    for row in range(4):
        expected = scores[row : row + 1]
        if top_k[row]:
            expected = keep_top_k(expected, int(top_k[row]))
        if top_p[row] < 1:
            expected = keep_top_p(expected, float(top_p[row]))
        assert torch.equal(kept[row].isfinite(), expected[0].isfinite())


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"max_tokens": 60},
            "This model's context is 64 tokens; the prompt has 10 and max_tokens "
            "asks for 60: shorten the prompt or ask for at most 54 tokens",
        ),
        (
            {"prompt_ids": (5,) * 64, "max_tokens": None},
            "prompt has 64: shorten the prompt to fewer",
        ),
        ({"prompt_ids": (5,) * 64}, "prompt has 64 and max_tokens asks for 4: shorten the prompt"),
        ({"temperature": 2.5}, 'Got "2.5" for temperature. temperature must be between 0 and 2'),
        ({"n": 17}, 'Got "17" for n. n must be between 1 and 16'),
        ({"n": 0}, "for n"),
        ({"top_p": 0.0}, "for top_p"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs must be between 0 and 20"),
        ({"top_logprobs": 2}, "top_logprobs needs logprobs"),
        ({"presence_penalty": 3.0}, "presence_penalty must be between -2 and 2"),
        ({"stop": ("a", "b", "c", "d", "e")}, "stop must be at most 4 strings"),
        ({"prompt_ids": (5, 400)}, "token id 400, outside the model's vocabulary of 300"),
        ({"prompt_ids": ()}, "The prompt is empty"),
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
    ],
)
def test_bad_parameters_are_named(trained: Model, options: dict[str, Any], message: str) -> None:
    model, spec, tokenizer = trained
    engine = Engine(model, spec, tokenizer, EngineConfig(max_batch=1))
    request = GenerationRequest(**{"prompt_ids": (5,) * 10, "max_tokens": 4, **options})
    with pytest.raises(KilnError, match=message.replace("(", r"\(")):
        engine.submit(request)


def test_engine_config_is_checked() -> None:
    with pytest.raises(KilnError, match="max_step_tokens must be more than max_batch"):
        EngineConfig(max_batch=8, max_step_tokens=8)
    with pytest.raises(KilnError, match="for device"):
        EngineConfig(device="tpu")


# --- the pure pieces ---------------------------------------------------------------------------


def state_of(prompt_len: int, max_tokens: int, n: int = 1) -> Any:
    request = GenerationRequest(prompt_ids=(5,) * prompt_len, max_tokens=max_tokens, n=n)
    return new_request_state(request, max_tokens, (), None, torch.device("cpu"), 0.0)


def test_scheduler_decodes_first_then_chunks_prompts_within_the_budget() -> None:
    config = EngineConfig(max_batch=4, prefill_chunk_tokens=8, max_step_tokens=12)
    scheduler = Scheduler(config, BlockManager(num_slots=4, num_blocks=40))
    short, long_, late = state_of(5, 4), state_of(30, 4), state_of(6, 4, n=2)
    for state in (short, long_, late):
        scheduler.add(state)
    first = scheduler.schedule()  # 12 tokens: short whole (5), then 7 of long
    assert [(c.request, c.start, c.stop) for c in first.prefills] == [(short, 0, 5), (long_, 0, 7)]
    assert first.admitted == [short, long_] and not first.decodes
    short.sequences[0].generated.append(9)  # the runner sampled its first token
    second = scheduler.schedule()  # one decode, then 8 of long (its chunk cap), then 3 of late
    assert second.decodes == short.sequences
    assert [(c.request, c.start, c.stop) for c in second.prefills] == [
        (long_, 7, 15),
        (late, 0, 3),
    ]
    assert [s.slot for s in late.sequences] == [2, 3] and scheduler.blocks.num_used_blocks == 6
    assert scheduler.finish(short.sequences[0], "stop") == [0]
    assert scheduler.running == [long_, late] and scheduler.blocks.free_slots == [0]


def test_scheduler_admits_in_order_only_what_fits() -> None:
    scheduler = Scheduler(EngineConfig(max_batch=2), BlockManager(num_slots=2, num_blocks=3))
    big, small = state_of(20, 12), state_of(3, 3)  # 2 blocks, then 1
    bigger = state_of(40, 8)  # 3 blocks: waits, and holds back what comes after it
    for state in (big, bigger, small):
        scheduler.add(state)
    assert scheduler.schedule().admitted == [big]
    assert list(scheduler.waiting) == [bigger, small]
    scheduler.finish(big.sequences[0], "length")
    assert scheduler.schedule().admitted == [bigger]
    assert not scheduler.fits_at_all(state_of(50, 10))


def test_block_manager_counts_blocks_and_packs_slots() -> None:
    blocks = BlockManager(num_slots=3, num_blocks=10)
    assert blocks.blocks_for(16) == 1 and blocks.blocks_for(17) == 2
    slot_a, blocks_a = blocks.allocate(33)
    slot_b, _ = blocks.allocate(1)
    assert (slot_a, len(blocks_a), slot_b, blocks.num_used_blocks) == (0, 3, 1, 4)
    blocks.free(slot_a, blocks_a)
    assert blocks.allocate(16)[0] == 0 and blocks.highest_busy_slot == 1
    assert blocks.can_allocate(1, 16 * 8) and not blocks.can_allocate(1, 16 * 9)


# --- the async API and metrics -----------------------------------------------------------------


def test_stream_complete_and_a_disconnect_on_the_engine_thread(trained: Model) -> None:
    model, spec, tokenizer = trained
    finished: dict[str, RequestMetrics] = {}
    engine = Engine(
        model,
        spec,
        tokenizer,
        EngineConfig(max_batch=4),
        on_finish=lambda request_id, metrics: finished.__setitem__(request_id, metrics),
    )
    prompt = encode(tokenizer, "kiln fires")
    expected = generate(model, spec, prompt, 12, tokenizer=tokenizer)

    async def scenario() -> tuple[list[Delta], Any, str]:
        deltas = [d async for d in engine.stream(greedy(prompt, 12, request_id="first"))]
        result = await engine.complete(greedy(prompt, 12, n=2))
        leaving = engine.submit(greedy(prompt, 50, stop_token_ids=(), request_id="gone"))
        async for _ in leaving:
            break  # the client disconnects after one delta
        return deltas, result, leaving.request_id

    try:
        deltas, result, gone = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
        assert wait_for(lambda: engine.stats().num_running == 0, timeout_s=10, interval_s=0.01)
    finally:
        engine.close()
    assert text_of(deltas) == expected.text and tokens_of(deltas) == expected.token_ids
    assert [c.text for c in result.choices] == [expected.text] * 2
    assert result.usage.prompt_tokens == len(prompt)
    assert engine.stats().kv_blocks_used == 0 and gone not in engine.requests
    metrics = finished["first"]
    assert metrics.queue_wait_s is not None and metrics.queue_wait_s >= 0
    assert metrics.time_to_first_token_s is not None and metrics.time_to_first_token_s > 0
    num_generated = len(expected.token_ids) + (expected.finish_reason == "stop")
    assert len(metrics.inter_token_s) == num_generated - 1
    assert set(finished) >= {"first", "gone"}


def test_a_failing_step_ends_what_is_in_flight_and_the_engine_goes_on(trained: Model) -> None:
    model, spec, tokenizer = trained
    engine = Engine(model, spec, tokenizer, EngineConfig(max_batch=2))
    healthy_decode = engine.runner.decode

    def broken_decode(slots: list[int], token_ids: list[int]) -> torch.Tensor:
        raise ZeroDivisionError("division by zero")

    engine.runner.decode = broken_decode  # type: ignore[method-assign]
    try:
        engine.start()
        handle = engine.submit(greedy([5, 6], 10))
        with pytest.raises(EngineFailed, match="division by zero"):
            handle.collect(timeout_s=10)
        assert engine.stats().kv_blocks_used == 0 and not engine.requests
        engine.runner.decode = healthy_decode  # type: ignore[method-assign]
        result = engine.submit(greedy([5, 6], 10)).collect(timeout_s=10)
    finally:
        engine.close()
    assert list(result.choices[0].token_ids) == generate(model, spec, [5, 6], 10).token_ids


def test_the_device_is_chosen_at_run_time() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device(None).type == expected
    if not torch.cuda.is_available():
        with pytest.raises(KilnError, match='torch sees no GPU: use device "cpu"'):
            pick_device("cuda")


def test_a_top_p_of_zero_in_float32_keeps_the_likeliest_token_offline_and_batched() -> None:
    scores = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    for kept in (
        keep_top_p(scores, 5e-324),
        keep_top_k_top_p(scores, torch.zeros(3, dtype=torch.long), torch.full((3,), 5e-324)),
    ):
        assert torch.equal(kept.isfinite().sum(dim=-1), torch.ones(3, dtype=torch.long))
        assert torch.equal(kept.argmax(dim=-1), scores.argmax(dim=-1))
