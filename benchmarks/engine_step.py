"""Generation throughput: Kiln's continuous-batching engine against transformers, on CPU.

Two random-init Llamas: `lm_spec("small")` (8 layers, dim 288, vocab 8192) and SmolLM-135M's
shape (30 layers, dim 576, 9 heads, 3 KV heads, MLP 1536, vocab 49152, tied embeddings). The
work: 32 prompts of 32-256 random tokens, each asking for 64-128 greedy tokens (no stop, so
every request generates all of them). Output tokens per second of:
  - the engine (`kiln.serving.engine.Engine`, no HTTP) at concurrency 1, 8 and 32: a closed loop
    keeps that many requests in flight, submitting the next as one finishes;
  - transformers' `generate()` one request at a time on the same weights
    (`LlamaForCausalLM`, attn_implementation="sdpa"), the baseline a plain server would be;
  - transformers' own continuous batching (`generate_batch`, all 32 prompts in one call, each
    asking for the work's mean output length), the alternative engine DESIGN.md names.
Concurrency 1 and `generate()` run the first `--serial-prompts` prompts only (8 by default):
one at a time they take minutes, and tokens/s is a rate. Every arm uses `--threads` torch
threads (2 by default, the machine's cores) and runs `--rounds` times (2), in turn; its best
round is reported, since other work on a shared machine only slows a round down. The
engine's p50 time to first token and inter-token latency come from its metrics hooks. Prints
one JSON line last, with the CPU's flags.

    python benchmarks/engine_step.py                # about 10 minutes on 2 cores
    python benchmarks/engine_step.py --smoke-test   # about 10 s: the small model, 4 prompts
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from kiln.serving.engine import (  # noqa: E402
    Engine,
    EngineConfig,
    GenerationRequest,
    RequestHandle,
    RequestMetrics,
)
from kiln.training.hf_io import hf_config  # noqa: E402
from kiln.training.lm import CausalLM, build_lm, lm_spec  # noqa: E402

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
Work = list[tuple[list[int], int]]


def smollm_spec() -> dict[str, Any]:
    spec = lm_spec("small", vocab_size=49152, block_size=2048, layers=30, dim=576, heads=9)
    return {**spec, "num_key_value_heads": 3, "intermediate_size": 1536}


def cpu_flags() -> dict[str, bool]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    flags = set(line.split(":", 1)[-1].split())
    return {flag: flag in flags for flag in CPU_FLAGS}


def make_work(vocab_size: int, num_prompts: int, smoke: bool, seed: int = 0) -> Work:
    """Prompts of 32-256 random tokens (no special ids) and 64-128 output tokens each."""
    generator = torch.Generator().manual_seed(seed)
    prompt_range, output_range = ((16, 48), (8, 16)) if smoke else ((32, 257), (64, 129))
    lengths = torch.randint(*prompt_range, (num_prompts,), generator=generator).tolist()
    outputs = torch.randint(*output_range, (num_prompts,), generator=generator).tolist()
    return [
        (torch.randint(3, vocab_size, (n,), generator=generator).tolist(), m)
        for n, m in zip(lengths, outputs, strict=True)
    ]


def run_engine(engine: Engine, work: Work, concurrency: int) -> dict[str, float]:
    """Output tokens/s with `concurrency` requests in flight, and p50 latencies."""
    finished: list[RequestMetrics] = []
    engine.on_finish = lambda _, metrics: finished.append(metrics)
    pending, in_flight = deque(work), dict[str, RequestHandle]()
    num_tokens, start = 0, time.perf_counter()
    while pending or in_flight:
        while pending and len(in_flight) < concurrency:
            prompt, max_tokens = pending.popleft()
            request = GenerationRequest(
                prompt_ids=tuple(prompt), max_tokens=max_tokens, temperature=0, stop_token_ids=()
            )
            handle = engine.submit(request)
            in_flight[handle.request_id] = handle
        engine.step()
        for request_id, handle in list(in_flight.items()):
            for delta in handle.drain():
                if delta.usage is not None:
                    num_tokens += delta.usage.completion_tokens
                    del in_flight[request_id]
    wall_s = time.perf_counter() - start
    gaps = [gap for metrics in finished for gap in metrics.inter_token_s]
    ttfts = [m.time_to_first_token_s for m in finished if m.time_to_first_token_s is not None]
    return {
        "tokens_per_s": round(num_tokens / wall_s, 2),
        "p50_ttft_s": round(statistics.median(ttfts), 4),
        "p50_itl_ms": round(1000 * statistics.median(gaps), 2) if gaps else 0.0,
        "wall_s": round(wall_s, 2),
    }


def hf_model(spec: dict[str, Any], model: CausalLM) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {**hf_config(spec), "eos_token_id": None, "pad_token_id": 0}
    config.pop("kind", None)
    reference = LlamaForCausalLM(LlamaConfig(**config))
    reference.set_attn_implementation("sdpa")
    reference.load_state_dict(model.state_dict(), strict=False)
    return reference.eval()


@torch.inference_mode()
def run_hf_generate(reference: Any, work: Work) -> dict[str, float]:
    num_tokens, start = 0, time.perf_counter()
    for prompt, max_tokens in work:
        output = reference.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        num_tokens += output.shape[1] - len(prompt)
    wall_s = time.perf_counter() - start
    return {"tokens_per_s": round(num_tokens / wall_s, 2), "wall_s": round(wall_s, 2)}


@torch.inference_mode()
def run_hf_generate_batch(reference: Any, work: Work) -> dict[str, float]:
    from transformers import GenerationConfig

    mean_tokens = round(statistics.mean(m for _, m in work))
    config = GenerationConfig(
        max_new_tokens=mean_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    start = time.perf_counter()
    outputs = reference.generate_batch(inputs=[p for p, _ in work], generation_config=config)
    wall_s = time.perf_counter() - start
    num_tokens = sum(len(output.generated_tokens) for output in outputs.values())
    return {"tokens_per_s": round(num_tokens / wall_s, 2), "wall_s": round(wall_s, 2)}


def same_greedy_tokens(engine: Engine, reference: Any, prompt: list[int]) -> bool:
    """A check that both arms run the same weights (random weights may tie; reported only)."""
    request = GenerationRequest(prompt_ids=tuple(prompt), max_tokens=8, temperature=0)
    handle = engine.submit(request)
    engine.run_until_idle()
    ours = [t for delta in handle.drain() for t in delta.token_ids]
    with torch.inference_mode():
        theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    return ours == theirs[0, len(prompt) :].tolist()


def bench_model(name: str, spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Every arm, `--rounds` times in turn; each arm's best round counts (other work on a
    shared machine only ever slows a round down)."""
    torch.manual_seed(0)
    model = build_lm(spec).eval()
    work = make_work(spec["vocab_size"], args.num_prompts, args.smoke_test)
    config = EngineConfig(
        max_batch=max(args.concurrency),
        max_model_len=512,
        prefill_chunk_tokens=args.prefill_chunk_tokens,
    )
    engine = Engine(model, spec, config=config)
    reference = hf_model(spec, model)
    serial = work[: args.serial_prompts]
    arms: dict[str, Callable[[], dict[str, float]]] = {
        f"engine_c{c}": partial(run_engine, engine, serial if c == 1 else work, c)
        for c in args.concurrency
    }
    arms["hf_generate_c1"] = partial(run_hf_generate, reference, serial)
    if not args.no_hf_batch:
        arms["hf_generate_batch"] = partial(run_hf_generate_batch, reference, work)
    row: dict[str, Any] = {"same_greedy_tokens": same_greedy_tokens(engine, reference, work[0][0])}
    for round_ in range(args.rounds):
        for arm, run in arms.items():
            figures = run()
            print(name, f"round {round_}", arm, figures, flush=True)
            if arm not in row or figures["tokens_per_s"] > row[arm]["tokens_per_s"]:
                row[arm] = figures
    top = f"engine_c{max(args.concurrency)}"
    row["engine_c1_vs_hf_generate"] = round(
        row["engine_c1"]["tokens_per_s"] / row["hf_generate_c1"]["tokens_per_s"], 2
    )
    row[f"{top}_vs_hf_generate"] = round(
        row[top]["tokens_per_s"] / row["hf_generate_c1"]["tokens_per_s"], 2
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--serial-prompts", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--models", nargs="+", default=["small", "smollm-135m"])
    parser.add_argument("--no-hf-batch", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prefill-chunk-tokens", type=int, default=256)
    args = parser.parse_args()
    if args.smoke_test:
        args.num_prompts, args.serial_prompts, args.concurrency = 4, 2, [1, 4]
        args.models, args.no_hf_batch, args.rounds = ["small"], True, 1
    torch.set_num_threads(args.threads)
    specs = {"small": lm_spec("small"), "smollm-135m": smollm_spec()}
    results = {name: bench_model(name, specs[name], args) for name in args.models}
    summary = {
        "benchmark": "engine_step",
        "threads": args.threads,
        "rounds": args.rounds,
        "prefill_chunk_tokens": args.prefill_chunk_tokens,
        "torch": torch.__version__,
        "cpu_flags": cpu_flags(),
        "smoke_test": args.smoke_test,
        **results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
