"""Generation over HTTP: `kiln serve` against transformers, and against the machine's limit.

Issue 31's performance section, in one run on one machine. A random-init
`transformers.LlamaForCausalLM` of SmolLM-135M's shape (30 layers, dim 576, 9 heads, 3 KV heads,
MLP 1536, vocab 49152, tied embeddings; `benchmarks/engine_step.py` builds it) is saved as a
Hugging Face folder with a byte-level BPE `tokenizer.json` trained on the Python standard
library's sources (`kiln.training.tokenizer.train_bpe`, to the model's vocabulary size). The config
has no eos token, so no server stops early: every answer is `--max-tokens` tokens long (128).
The prompts are real text: 64 windows of 32-256 tokens of stdlib sources (files and offsets
from a fixed seed), each one decoding to a string that encodes back to the same ids; every arm
gets the same strings (the in-process arm their ids). Greedy (`temperature=0`), no stop.
Output tokens/s (from the servers' `usage.completion_tokens`) and time to first token p50/p99
(the first streamed chunk with text, seen by the client) at concurrency 1, 8 and 32, a closed
loop (httpx, asyncio) keeping that many streaming `/v1/completions` requests in flight, of:
  1. Kiln: the folder registered by `kiln models import hf:DIR`, served by `kiln serve --no-auth
     --num-cpus <threads> --lm-max-batch 32` (a subprocess, stopped with Ctrl-C);
  2. transformers' `generate()` one request at a time (what a plain FastAPI wrapper does), in
     this process on the same weights. Sequential, so its tokens/s is the same at every
     concurrency; its TTFT at concurrency c is the queueing wait plus its own prefill, computed
     from per-request times (`queued_ttfts`). It runs the first `--serial-prompts` prompts (8)
     only; the other prompts' times in that queue come from a linear fit of prefill time on
     prompt length plus the measured per-token decode time;
  3. `transformers serve FOLDER --continuous-batching --attn-implementation sdpa --device cpu`
     with HF_HUB_OFFLINE=1 (a subprocess on the same folder, stopped with Ctrl-C). On CPU it
     loads through `accelerate`, which the project's venv lacks: install it apart with
     `pip install --no-deps --target /tmp/transformers-serve-extra accelerate` (its own
     requirements are all in the venv); that folder goes on the server's PYTHONPATH. If the
     server cannot run, why goes into the JSON as `transformers_serve_error` and the run goes on;
  4. the machine's limit: memory bandwidth by a large `Tensor.copy_` (1 GiB, best of 5, bytes
     read plus written, before and after the arms) over the fp32 weights' bytes is the decode
     tokens/s ceiling at concurrency 1; `decode_vs_bandwidth_limit_c1` is Kiln's median decode
     rate after the first token at concurrency 1 over it.
Concurrency 1 runs the first `--serial-prompts` prompts (one at a time they take minutes; a
rate needs fewer). Kiln and generate() compute on `--threads` torch threads (default: every
core); transformers serve gets OMP_NUM_THREADS=<threads>, though its continuous-batching loop
was seen computing on one thread (on 2 shared cores, small model). One server runs at a time.
Every arm runs with OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep at barriers; Kiln's replicas
always do, serving/app.py). Ray starts its workers, Serve replicas included, at nice 15, the
other arms run at nice 0: `--kiln-niceness 0` sets RAY_worker_niceness=0 for kiln serve. On a
busy machine both matter several-fold (/work/notes/h2-lm-perf.md); on an idle one, little.
Each arm's wall time, server start and stop included, is in `arm_wall_s`. Targets (issue 31),
for the 135M model: >= 4x generate() at concurrency 32; >= 1.0x transformers serve at 8 and
32; TTFT p50 <= 1.0x transformers serve's at 1; decode at concurrency 1 >= 0.5x the bandwidth
limit. Prints progress lines, then one JSON line last: every arm's figures per concurrency,
the ratios, targets and whether each was met, the CPU's flags, the load average before and
after. int8 (`int8_speedup_c1`, `int8_ppl_change`): Kiln's engine in this process at
concurrency 1, fp32 and int8 (`kiln compress --quantize int8`'s layers) interleaved on the serial
prompts, and both models' perplexity on held-out stdlib windows; CPU flags beside them.

Two modes:

    python benchmarks/generate_throughput.py          # full: the 135M model, 64 prompts, 128
        # tokens, c1/c8/c32, every arm; est. 20-25 minutes on 2 idle cores
    python benchmarks/generate_throughput.py --quick  # lm_spec("small"), 4 prompts of 8
        # tokens (2 at concurrency 1): a few minutes, most of it starting the servers
    python benchmarks/generate_throughput.py --models small smollm-135m  # both models
    python benchmarks/generate_throughput.py --threads 1   # every arm on one torch thread
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every arm's OpenMP threads sleep at barriers instead of spinning, as Kiln's replicas do
# (serving/app.py REPLICA_ENV): on a shared machine, spinning threads steal the cores of the
# ones computing. Set before torch loads libgomp; transformers serve inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from benchmarks.engine_step import cpu_flags, hf_model, smollm_spec  # noqa: E402
from kiln.runtime import free_port  # noqa: E402
from kiln.serving.engine import Engine, EngineConfig, GenerationRequest  # noqa: E402
from kiln.training.lm import build_lm, lm_spec  # noqa: E402
from kiln.training.lm_compress import perplexity_of, quantize_lm  # noqa: E402
from kiln.training.tokenizer import tokenizer_to_bytes, train_bpe  # noqa: E402
from tests.e2e.kiln_process import KilnServe, kiln, kiln_env  # noqa: E402

TARGETS = {
    "vs_hf_generate_c32": (">=", 4.0),
    "vs_transformers_serve_c8": (">=", 1.0),
    "vs_transformers_serve_c32": (">=", 1.0),
    "ttft_p50_vs_transformers_serve_c1": ("<=", 1.0),
    "decode_vs_bandwidth_limit_c1": (">=", 0.5),
    "int8_speedup_c1": (">=", 1.5),
    "int8_ppl_change": ("<=", 0.02),
}
"""Issue 31's targets for the 135M model: (comparison, bound)."""
HEADLINE_MODEL = "smollm-135m"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRANSFORMERS_CLI = Path(sys.executable).with_name("transformers")
SERVE_EXTRA = Path(tempfile.gettempdir()) / "transformers-serve-extra"
"""Put on `transformers serve`'s PYTHONPATH when it exists: `pip install --no-deps --target
/tmp/transformers-serve-extra accelerate` (its CPU loading path needs accelerate, which the
project's venv does not hold; its other requirements are already in the venv)."""
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 600.0
"""One streamed request, read timeout included: a 32-deep queue on 2 cores is slow."""
STARTED = time.perf_counter()
LEVEL_TIMEOUT_S = 1800.0
"""All the requests of one concurrency level against one server."""


# ----------------------------------------------------------------------------- the work


def progress(*parts: object) -> None:
    """A progress line on stdout, stamped with the seconds since the run started."""
    print(f"[{time.perf_counter() - STARTED:6.1f} s]", *parts, flush=True)


def stdlib_texts(max_files: int | None = None) -> list[str]:
    """The standard library's Python sources (tests left out), in a fixed order."""
    files = sorted(
        p for p in STDLIB.rglob("*.py") if not {"test", "tests", "site-packages"} & set(p.parts)
    )
    return [p.read_text(errors="replace") for p in files[:max_files]]


def model_folder(name: str, spec: dict[str, Any], tokenizer: Tokenizer, out: Path) -> Any:
    """A random-init LlamaForCausalLM (seed 0) saved with the tokenizer; no eos token, so no
    arm stops before max_tokens. Returns the in-process model (the generate() arm's)."""
    torch.manual_seed(0)
    reference = hf_model(spec, build_lm(spec).eval())  # eos_token_id None, sdpa
    reference.generation_config.eos_token_id = None
    reference.save_pretrained(out)
    (out / "tokenizer.json").write_bytes(tokenizer_to_bytes(tokenizer))
    context = spec["max_position_embeddings"]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    progress(name, "saved to", out)
    return reference


def make_prompts(
    tokenizer: Tokenizer, texts: list[str], num_prompts: int, seed: int = 0
) -> list[str]:
    """Windows of 32-256 tokens of stdlib text (file, offset and length from `seed`) whose
    decoded string encodes back to exactly those ids, so every arm sees the same tokens."""
    rng, prompts = random.Random(seed), list[str]()
    while len(prompts) < num_prompts:
        ids = tokenizer.encode(rng.choice(texts), add_special_tokens=False).ids
        length = rng.randint(32, 256)
        if len(ids) <= length:
            continue
        start = rng.randrange(len(ids) - length)
        text = tokenizer.decode(ids[start : start + length])
        if tokenizer.encode(text, add_special_tokens=False).ids == ids[start : start + length]:
            prompts.append(text)
    return prompts


# ----------------------------------------------------------------------------- the client


@dataclass
class Timing:
    """One request as the client saw it (perf_counter seconds)."""

    start_s: float
    first_text_s: float | None
    end_s: float
    completion_tokens: int
    prompt_tokens: int
    text: str = ""

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_text_s is None else self.first_text_s - self.start_s

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first, per second after the first."""
        if self.first_text_s is None or self.completion_tokens < 2:
            return None
        return (self.completion_tokens - 1) / max(self.end_s - self.first_text_s, 1e-9)


async def stream_one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Timing:
    """One streamed completion; usage from the last chunk (stream_options.include_usage)."""
    start, first, usage, parts = time.perf_counter(), None, None, []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(f"error in the stream: {chunk['error']}")
            text = "".join(c.get("text") or "" for c in chunk.get("choices") or [])
            if text and first is None:
                first = time.perf_counter()
            parts.append(text)
            usage = chunk.get("usage") or usage
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk")
    end = time.perf_counter()
    tokens, prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
    return Timing(start, first, end, tokens, prompt_tokens, "".join(parts))


async def closed_loop(
    url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int
) -> tuple[list[Timing], float]:
    """`concurrency` clients, each sending its next prompt as its last answer ends."""
    pending, timings = list(prompts), []
    limits = httpx.Limits(max_connections=concurrency + 2)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=30)

    async def one_client(client: httpx.AsyncClient) -> None:
        while pending:
            prompt = pending.pop(0)
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            timings.append(await stream_one(client, url, body))

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start = time.perf_counter()
        clients = asyncio.gather(*(one_client(client) for _ in range(concurrency)))
        await asyncio.wait_for(clients, LEVEL_TIMEOUT_S)
    return timings, time.perf_counter() - start


def summarize(timings: list[Timing], wall_s: float) -> dict[str, Any]:
    ttfts = [t.ttft_s for t in timings if t.ttft_s is not None]
    decode = [r for t in timings if (r := t.decode_tokens_per_s) is not None]
    tokens = sum(t.completion_tokens for t in timings)
    return {
        "tokens_per_s": round(tokens / wall_s, 2),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "decode_tokens_per_s_p50": round(statistics.median(decode), 2) if decode else None,
        "requests": len(timings),
        "completion_tokens": tokens,
        "prompt_tokens": sum(t.prompt_tokens for t in timings),
        "wall_s": round(wall_s, 2),
    }


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def bench_server(url: str, model: str, prompts: list[str], args: argparse.Namespace) -> dict:
    """Every concurrency against one running server, after one warm-up request."""
    asyncio.run(closed_loop(url, model, prompts[:1], 1, min(8, args.max_tokens)))
    row: dict[str, Any] = {}
    for concurrency in args.concurrency:
        work = prompts[: args.serial_prompts] if concurrency == 1 else prompts
        timings, wall_s = asyncio.run(closed_loop(url, model, work, concurrency, args.max_tokens))
        row[f"c{concurrency}"] = summarize(timings, wall_s)
        # An answer cut short (an eos the model should not have) would flatter tokens/s.
        short = sum(t.completion_tokens < args.max_tokens for t in timings)
        row[f"c{concurrency}"]["short_answers"] = short
        if concurrency == 1:
            row["first_text"] = timings[0].text  # one at a time: the first prompt's answer
        progress(model, f"c{concurrency}", row[f"c{concurrency}"])
    return row


# ----------------------------------------------------------------------------- the servers


def bench_kiln(name: str, folder: Path, prompts: list[str], args: argparse.Namespace) -> dict:
    """Import the folder into a fresh KILN_HOME and measure `kiln serve` on it."""
    home = Path(tempfile.mkdtemp(prefix="kiln-generate-bench-"))
    # Ray runs its workers, Serve replicas too, at nice 15 (RayConfig worker_niceness), below
    # every other process: transformers serve and generate() run at nice 0. On an idle machine
    # that changes nothing; on a shared one `--kiln-niceness 0` puts Kiln on equal footing.
    env = kiln_env(home, free_port(), RAY_worker_niceness=str(args.kiln_niceness))
    done = kiln(env, "models", "import", f"hf:{folder}", "--name", name, timeout_s=START_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"kiln models import failed:\n{done.stdout}\n{done.stderr}")
    progress(f"kiln models import hf:{folder} done")
    options = [
        "--no-auth",
        "--num-cpus",
        str(args.threads),
        "--lm-max-batch",
        str(max(args.concurrency)),
    ]
    server = KilnServe(env, [name, *options], home / "serve.log")
    try:
        server.start(timeout_s=START_TIMEOUT_S)
        progress("kiln serve answering")
        return bench_server(server.url, name, prompts, args)
    finally:
        stop_kiln(server)
        shutil.rmtree(home, ignore_errors=True)


def stop_kiln(server: KilnServe) -> None:
    """Ctrl-C, then the process group and every recorded Ray process, whatever is left."""
    progress("stopping kiln serve")
    try:
        if server.process is not None and server.process.poll() is None:
            server.interrupt(timeout_s=STOP_TIMEOUT_S)
    except AssertionError as exc:
        progress("kiln serve:", exc)
    finally:
        server.kill()


@dataclass
class TransformersServe:
    """`transformers serve FOLDER` in its own process group, stopped like `kiln serve`."""

    folder: Path
    threads: int
    log_path: Path
    extra_path: Path | None = None
    """Packages `transformers serve` needs that the project's venv lacks (accelerate)."""
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    children: dict[int, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> TransformersServe:
        command = [
            str(TRANSFORMERS_CLI), "serve", str(self.folder), "--continuous-batching",
            "--attn-implementation", "sdpa", "--device", "cpu",
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(self.threads)}
        if self.extra_path is not None and self.extra_path.is_dir():
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(self.extra_path), env.get("PYTHONPATH")])
            )
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                progress(self.log_tail())
                raise RuntimeError(f"exited {self.process.returncode}: {self.last_log_line()}")
            if self.answers():
                return self
            time.sleep(0.5)
        progress(self.log_tail())
        raise RuntimeError(f"did not answer within {timeout_s:.0f} s: {self.last_log_line()}")

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, num_chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]

    def last_log_line(self) -> str:
        """The last line of its output: the exception, when it died of one."""
        lines = [line.strip() for line in self.log_tail().splitlines() if line.strip()]
        return lines[-1] if lines else "no output"

    def record_children(self) -> None:
        if self.process is None:
            return
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                self.children[child.pid] = child.create_time()
        except psutil.NoSuchProcess:
            pass

    def stop(self) -> None:
        """SIGINT, a bounded wait, then SIGKILL to the group and every child seen."""
        if self.process is None:
            return
        progress("stopping transformers serve")
        self.record_children()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                progress("transformers serve ignored Ctrl-C; killing it")
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        for pid, created in self.children.items():
            try:
                child = psutil.Process(pid)
                if child.create_time() == created:
                    child.kill()
            except psutil.NoSuchProcess:
                continue


def bench_transformers_serve(folder: Path, prompts: list[str], args: argparse.Namespace) -> dict:
    log_path = folder.parent / "transformers-serve.log"
    server = TransformersServe(folder, args.threads, log_path, args.transformers_serve_extra)
    try:
        server.start()
        server.record_children()
        progress("transformers serve answering")
        return bench_server(server.url, str(folder), prompts, args)
    finally:
        server.stop()


# ----------------------------------------------------------------------------- generate()


class TokenClock:
    """A `generate()` streamer that notes when each put arrives: the prompt, then each token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, _value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def time_generate(
    reference: Any, prompt_ids: list[int], max_tokens: int
) -> tuple[Timing, list[int]]:
    """One greedy generate() of exactly `max_tokens` tokens, timed; and the tokens."""
    clock, start = TokenClock(), time.perf_counter()
    output = reference.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=0,
        streamer=clock,
    )
    end, new_ids = time.perf_counter(), output[0, len(prompt_ids) :].tolist()
    first = clock.times[1] if len(clock.times) > 1 else None
    return Timing(start, first, end, len(new_ids), len(prompt_ids)), new_ids


def queued_ttfts(
    service_s: list[float], prefill_s: list[float], concurrency: int
) -> tuple[list[float], float]:
    """TTFTs of requests served one at a time, in order, to `concurrency` clients in a closed
    loop (request k is sent when request k - concurrency ends), and the last end time."""
    ends: list[float] = []
    ttfts: list[float] = []
    for k, (service, prefill) in enumerate(zip(service_s, prefill_s, strict=True)):
        sent = ends[k - concurrency] if k >= concurrency else 0.0
        begins = max(ends[-1] if ends else 0.0, sent)
        ttfts.append(begins - sent + prefill)
        ends.append(begins + service)
    return ttfts, ends[-1] if ends else 0.0


def estimated_times(
    measured: list[Timing], lengths: list[int], max_tokens: int
) -> tuple[list[float], list[float]]:
    """(service, prefill) seconds for every prompt: measured ones as measured, the others from
    a least-squares line of prefill on prompt length plus the median per-token decode time."""
    prefill = [t.ttft_s or 0.0 for t in measured]
    slope, intercept = (
        np.polyfit([t.prompt_tokens for t in measured], prefill, 1)
        if len(measured) > 1
        else (0.0, prefill[0])
    )
    per_token = statistics.median(
        (t.end_s - t.start_s - p) / max(t.completion_tokens - 1, 1)
        for t, p in zip(measured, prefill, strict=True)
    )
    services, prefills = [t.end_s - t.start_s for t in measured], list(prefill)
    for length in lengths[len(measured) :]:
        fitted = max(float(intercept + slope * length), 0.0)
        prefills.append(fitted)
        services.append(fitted + (max_tokens - 1) * per_token)
    return services, prefills


def bench_hf_generate(
    reference: Any, tokenizer: Tokenizer, prompts: list[str], args: argparse.Namespace
) -> dict:
    """Sequential generate() on the serial prompts; each concurrency's TTFT from the queue."""
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    time_generate(reference, prompt_ids[0], min(8, args.max_tokens))  # warm-up
    runs = [
        time_generate(reference, ids, args.max_tokens) for ids in prompt_ids[: args.serial_prompts]
    ]
    measured, first_text = [timing for timing, _ in runs], tokenizer.decode(runs[0][1])
    wall_s = measured[-1].end_s - measured[0].start_s
    figures = summarize(measured, wall_s)
    progress("hf_generate", figures)
    services, prefills = estimated_times(
        measured, [len(ids) for ids in prompt_ids], args.max_tokens
    )
    row: dict[str, Any] = {"sequential": figures, "first_text": first_text}
    for concurrency in args.concurrency:
        n = args.serial_prompts if concurrency == 1 else len(prompts)
        ttfts, end_s = queued_ttfts(services[:n], prefills[:n], concurrency)
        row[f"c{concurrency}"] = {
            "tokens_per_s": figures["tokens_per_s"],
            "ttft_p50_s": percentile(ttfts, 50),
            "ttft_p99_s": percentile(ttfts, 99),
            "decode_tokens_per_s_p50": figures["decode_tokens_per_s_p50"],
            "requests": n,
            "queue_wall_s": round(end_s, 2),
        }
    return row


# ----------------------------------------------------------------------------- int8


def engine_c1(engine: Engine, prompt_ids: list[int], max_tokens: int) -> tuple[float, float]:
    """One greedy request alone through an engine driven in this thread: (seconds to the first
    token, decode tokens/s after it)."""
    request = GenerationRequest(prompt_ids=tuple(prompt_ids), max_tokens=max_tokens, temperature=0)
    handle, start = engine.submit(request), time.perf_counter()
    while not handle.drain():  # the first delta comes with the first token
        engine.step()
    first = time.perf_counter()
    engine.run_until_idle()
    return first - start, (max_tokens - 1) / max(time.perf_counter() - first, 1e-9)


def bench_int8(
    spec: dict[str, Any], tokenizer: Tokenizer, prompts: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """int8 against fp32 at concurrency 1, the same weights (seed 0, as the served folder) in
    Kiln's engine in this process (`kiln compress --quantize int8`'s layers, no HTTP): each
    serial prompt runs fp32 then int8, interleaved; decode tokens/s medians. Perplexity of both
    on 16 held-out 129-token windows of stdlib text (random weights: near-uniform models)."""
    torch.manual_seed(0)
    fp32 = build_lm(spec).eval()
    int8, _ = quantize_lm(fp32, spec)
    config = EngineConfig(max_batch=1, device="cpu", max_model_len=512)
    engines = {"fp32": Engine(fp32, spec, None, config), "int8": Engine(int8, spec, None, config)}
    ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    rates: dict[str, list[float]] = {"fp32": [], "int8": []}
    for engine in engines.values():  # warm-up
        engine_c1(engine, ids[0][:16], 4)
    for prompt in ids[: args.serial_prompts]:
        for name, engine in engines.items():
            rates[name].append(engine_c1(engine, prompt, args.max_tokens)[1])
    held_out = [i for p in ids[args.serial_prompts :] for i in p]
    window_ids = held_out if len(held_out) >= 129 else [i for p in ids for i in p]
    length = min(129, len(window_ids))  # --quick's few prompts may hold fewer tokens
    count = min(16, len(window_ids) // length)
    windows = np.array(window_ids[: count * length], dtype=np.int64).reshape(count, length)
    with torch.inference_mode():
        before, after = perplexity_of(fp32, windows), perplexity_of(int8, windows)
    fp32_rate, int8_rate = statistics.median(rates["fp32"]), statistics.median(rates["int8"])
    row = {
        "fp32_decode_tokens_per_s_p50": round(fp32_rate, 2),
        "int8_decode_tokens_per_s_p50": round(int8_rate, 2),
        "int8_speedup_c1": round(int8_rate / fp32_rate, 3),
        "perplexity_fp32": round(before, 3),
        "perplexity_int8": round(after, 3),
        "int8_ppl_change": round(after / before - 1.0, 5),
        "eval_windows": count,
    }
    progress("int8", row)
    return row


# ----------------------------------------------------------------------------- the limit


def copy_bandwidth_bytes_per_s(num_bytes: int, rounds: int = 5) -> float:
    """Best of `rounds` copies of a `num_bytes` float32 tensor, bytes read plus written."""
    source = torch.ones(num_bytes // 4)
    target = torch.empty_like(source)
    target.copy_(source)  # touch every page first
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best


def weight_bytes(reference: Any) -> int:
    """Bytes of the unique parameters (a tied lm_head counted once): what one decode step reads."""
    return sum(p.numel() * p.element_size() for p in reference.parameters())


# ----------------------------------------------------------------------------- the run


def ratios(row: dict[str, Any], ceiling_tokens_per_s: float) -> dict[str, float | None]:
    """Issue 31's ratios from one model's arms (None where an arm is missing)."""
    kiln, generate, hf_serve = row["kiln"], row["hf_generate"], row.get("transformers_serve")

    def over(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    def tokens(arm: dict | None, level: str) -> float | None:
        return arm[level]["tokens_per_s"] if arm and level in arm else None

    return {
        "vs_hf_generate_c32": over(tokens(kiln, "c32"), tokens(generate, "c32")),
        "vs_transformers_serve_c8": over(tokens(kiln, "c8"), tokens(hf_serve, "c8")),
        "vs_transformers_serve_c32": over(tokens(kiln, "c32"), tokens(hf_serve, "c32")),
        "ttft_p50_vs_transformers_serve_c1": over(
            kiln.get("c1", {}).get("ttft_p50_s"), (hf_serve or {}).get("c1", {}).get("ttft_p50_s")
        ),
        "decode_vs_bandwidth_limit_c1": over(
            kiln.get("c1", {}).get("decode_tokens_per_s_p50"), ceiling_tokens_per_s
        ),
        "int8_speedup_c1": row.get("int8", {}).get("int8_speedup_c1"),
        "int8_ppl_change": row.get("int8", {}).get("int8_ppl_change"),
    }


def targets_met(found: dict[str, float | None]) -> dict[str, bool | None]:
    met: dict[str, bool | None] = {}
    for key, (comparison, bound) in TARGETS.items():
        value = found.get(key)
        met[key] = (
            None if value is None else (value >= bound if comparison == ">=" else value <= bound)
        )
    return met


def bench_model(
    name: str, spec: dict[str, Any], texts: list[str], work_dir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """1. tokenizer and folder, 2. prompts, 3. Kiln, 4. transformers serve, 5. generate()."""
    started = time.perf_counter()
    tokenizer = train_bpe(texts, spec["vocab_size"])
    folder = work_dir / name
    reference = model_folder(name, spec, tokenizer, folder)
    prompts = make_prompts(tokenizer, texts, args.num_prompts)
    progress(name, f"ready in {time.perf_counter() - started:.0f} s")
    row: dict[str, Any] = {"weight_bytes": weight_bytes(reference), "arm_wall_s": {}}
    arms = {
        "kiln": lambda: bench_kiln(name, folder, prompts, args),
        "transformers_serve": lambda: bench_transformers_serve(folder, prompts, args),
        "hf_generate": lambda: bench_hf_generate(reference, tokenizer, prompts, args),
        "int8": lambda: bench_int8(spec, tokenizer, prompts, args),
    }
    if args.no_transformers_serve:
        del arms["transformers_serve"]
    for arm, run in arms.items():
        arm_started = time.perf_counter()
        try:
            row[arm] = run()
        except Exception as exc:
            if arm != "transformers_serve":
                raise
            # Recorded, not fatal: the other arms still count.
            row["transformers_serve_error"] = f"{type(exc).__name__}: {exc}"
            progress("transformers serve failed:", row["transformers_serve_error"])
        row["arm_wall_s"][arm] = round(time.perf_counter() - arm_started, 1)
        progress(name, arm, f"took {row['arm_wall_s'][arm]} s")
    texts_by_arm = {
        arm: row[arm].pop("first_text", None)
        for arm in ("kiln", "transformers_serve", "hf_generate")
        if arm in row
    }
    row["same_greedy_text_as_generate"] = {
        arm: text == texts_by_arm["hf_generate"]
        for arm, text in texts_by_arm.items()
        if arm != "hf_generate"
    }  # random weights may tie: reported, not required
    return row


def check_args(args: argparse.Namespace) -> None:
    for option in ("threads", "num_prompts", "serial_prompts", "max_tokens", "copy_mib"):
        if getattr(args, option) < 1:
            flag = "--" + option.replace("_", "-")
            raise SystemExit(f'Got "{getattr(args, option)}" for {flag}. It must be at least 1.')
    if min(args.concurrency) < 1:
        raise SystemExit(f"Got {args.concurrency} for --concurrency. Each must be at least 1.")
    args.serial_prompts = min(args.serial_prompts, args.num_prompts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        "--smoke-test",
        dest="smoke_test",
        action="store_true",
        help="quick mode: lm_spec('small'), 4 prompts, 8 tokens, every arm (a few minutes); "
        "checks the run works, its figures mean little",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads of every arm, Kiln's --num-cpus (default: every core)",
    )
    parser.add_argument("--num-prompts", type=int, default=64, help="prompts at c8 and c32")
    parser.add_argument(
        "--serial-prompts",
        type=int,
        default=8,
        help="prompts at concurrency 1 and for generate() one at a time",
    )
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per answer")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--models",
        nargs="+",
        default=[HEADLINE_MODEL],
        choices=["small", HEADLINE_MODEL],
        help="the full mode's default is the 135M model the targets name; add small for both",
    )
    parser.add_argument(
        "--no-transformers-serve", action="store_true", help="skip transformers serve"
    )
    parser.add_argument(
        "--copy-mib", type=int, default=1024, help="tensor size of the bandwidth copy"
    )
    parser.add_argument(
        "--kiln-niceness",
        type=int,
        default=15,
        help="nice of kiln serve's Ray workers (RAY_worker_niceness; default: Ray's own, 15); "
        "the other arms run at the shell's (0)",
    )
    parser.add_argument(
        "--transformers-serve-extra",
        type=Path,
        default=SERVE_EXTRA,
        help="folder of packages transformers serve needs (accelerate), put on its PYTHONPATH",
    )
    args = parser.parse_args()
    max_files = None
    if args.smoke_test:
        args.models, args.num_prompts, args.serial_prompts, args.max_tokens = ["small"], 4, 2, 8
        args.copy_mib, max_files = 256, 120
    check_args(args)
    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    bandwidth = copy_bandwidth_bytes_per_s(args.copy_mib << 20)
    texts = stdlib_texts(max_files)
    specs = {"small": lm_spec("small"), HEADLINE_MODEL: smollm_spec()}
    work_dir = Path(tempfile.mkdtemp(prefix="generate-throughput-"))
    try:
        results = {
            name: bench_model(name, specs[name], texts, work_dir, args) for name in args.models
        }
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    bandwidth = max(bandwidth, copy_bandwidth_bytes_per_s(args.copy_mib << 20))
    for row in results.values():
        row["decode_ceiling_c1_tokens_per_s"] = round(bandwidth / row["weight_bytes"], 2)
        row.update(ratios(row, row["decode_ceiling_c1_tokens_per_s"]))
    headline = HEADLINE_MODEL if HEADLINE_MODEL in results else args.models[-1]
    found = {key: results[headline][key] for key in TARGETS}
    summary = {
        "benchmark": "generate_throughput",
        "smoke_test": args.smoke_test,
        "headline_model": headline,
        **found,
        "targets": {key: f"{comparison} {bound}" for key, (comparison, bound) in TARGETS.items()},
        "met": targets_met(found),
        "transformers_serve_error": results[headline].get("transformers_serve_error"),
        "int8_note": "Kiln's engine in-process at concurrency 1 (no HTTP), fp32 and int8 "
        "interleaved on the serial prompts; perplexity on held-out stdlib windows, random weights",
        "memory_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "prompts": f"{args.num_prompts} windows of 32-256 tokens of stdlib .py text (seed 0), "
        f"concurrency 1 and generate() on the first {args.serial_prompts}",
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "kiln_worker_niceness": args.kiln_niceness,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_flags": cpu_flags(),
        "wall_s": round(time.perf_counter() - started, 1),
        "models": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
