"""Language-model training: Kiln's Ray Train loop against a plain torch loop (issue 30).

In one run, on one machine, with one corpus (Python's standard library: its top-level modules
by default, `text:<stdlib>/*.py`), one byte-level BPE tokenizer trained on it, and one Llama
model (`--size tiny`, block size the size's), micro-batch, AdamW and warmup-then-cosine schedule,
measures:
  - tokens/s of a plain single-process torch loop, at 1 thread and at 2 (the faster is the
    baseline), drawing its windows with Kiln's sampler from the same token arrays copied into
    numpy, in a process of its own at the niceness Ray gives its workers (`--plain-niceness`);
    against Kiln with 1 Ray Train worker (`cpus_per_worker=2`, its share of the node) and
    2 workers (1 CPU each, gradients averaged in shared memory); and, as a diagnostic with no
    target, 1 worker at 1 CPU (`kiln_1w_1cpu_vs_torch_1t`: Ray's cost at equal threads, apart
    from what a second thread gains or, on a busy machine, loses; not with --smoke-test).
    Every arm's figure is the
    median over its evaluation windows but the first (which holds the warm-up) of the tokens/s
    of the steps alone: Kiln's as its workers report it (`tokens_per_s`), the plain loop's timed
    the same way. `*_wall_tokens_per_s` also counts evaluations and checkpoints (Kiln's from
    the times the driver received the reports). Targets: 1 worker >= 0.9x, 2 workers >= 1.0x.
    On a machine other work keeps busy, those compare the CPU shares the arms happened to get;
    `*_tokens_per_cpu_s` divides the same steady windows' tokens by the CPU time spent instead
    (the plain process's; Kiln's workers', in-run evaluations and checkpoints included; and
    `tokens_per_ray_cpu_s`, every process of the local Ray): `kiln_*_vs_torch_per_cpu_s`
    against the 1-thread plain loop says what Kiln costs per token, whatever the load,
  - quality: held-out loss after the same token budget (the 2-worker arm's steps x its tokens
    per step; the one-stream arms take twice the steps at the same micro-batch, so every arm's
    schedule is the same in tokens), every final model scored by the driver on the same
    windows (`eval_windows` of every validation stream): `val_loss_ratio`, Kiln 2 workers over
    the plain loop, within 2%. As a diagnostic, `val_loss_ratio_same_batch` divides by the
    plain loop run at the 2-worker arm's global batch and steps instead (what the larger
    batch costs at this budget, apart from anything Kiln does),
  - memory: the token arrays' object-store bytes (the object directory's sizes of the stores'
    refs; the stores' own `memory_bytes()` count beside them) against tokens x itemsize:
    <= 1.1x. A figure below 1.0 cannot be right and stops the run,
  - with `--long` (and nothing else): the whole stdlib (`text:<stdlib>/**/*.py`) at
    `--size small` for `--max-minutes 10` on 2 workers through `train_lm_and_register`, its
    validation perplexity curve drawn with the unigram model's perplexity of the same tokens
    (`benchmarks/results/lm_train_small.png`).
Prints the CPU's flags, the torch threads of every arm and the load average at start and end
(the figures are only as quiet as the machine), and one JSON line last, with every ratio, its
target and whether it was met.

    python benchmarks/lm_train.py                # stdlib top-level modules, tiny, 40 x 2 steps
    python benchmarks/lm_train.py --smoke-test   # a few files, block 64, under 2 minutes
    python benchmarks/lm_train.py --size small --steps 20
    python benchmarks/lm_train.py --long         # ~15 min; on a quiet machine
    python benchmarks/lm_train.py --long --smoke-test  # the --long path, 15 s of training
    python benchmarks/lm_train.py --plot benchmarks/results/lm_train.out \
        benchmarks/results/lm_train.png          # the runs' tokens/s as a bar chart
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.05")  # as Kiln sets it
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from kiln.actors.text import (  # noqa: E402
    TextDataset,
    TextSourceSpec,
    load_text_dataset,
    sample_for_tokenizer,
    token_dtype,
    tokenize_dataset,
)
from kiln.lm_pipeline import (  # noqa: E402
    TOKENIZER_SAMPLE_BYTES,
    final_model,
    fit_lm,
    model_spec,
)
from kiln.settings import Settings  # noqa: E402
from kiln.training.lm import build_lm  # noqa: E402
from kiln.training.lm_config import LMTrainConfig, lr_at  # noqa: E402
from kiln.training.lm_data import eval_windows, sample_windows  # noqa: E402
from kiln.training.lm_loop import autocast, make_optimizer, use_bf16, validation_sums  # noqa: E402
from kiln.training.tokenizer import tokenizer_to_bytes, train_bpe  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS = f"text:{STDLIB}/*.py"
"""The default corpus: the standard library's 168 top-level modules (4.7 MB on 3.11)."""
SMOKE_CORPUS = f"text:{STDLIB}/[a-c]*.py"
LONG_CORPUS = f"text:{STDLIB}/**/*.py"
RESULTS = Path(__file__).resolve().parent / "results"
CPU = torch.device("cpu")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
IN_RUN_EVAL_WINDOWS = 16
"""Held-out windows each of Kiln's in-run evaluations reads: few, as the arms are compared on
the driver's windows and an evaluation's time is no part of `tokens_per_s`."""
TARGETS = {
    "kiln_1w_vs_torch": (">=", 0.9),
    "kiln_2w_vs_torch": (">=", 1.0),
    "val_loss_ratio": ("within", 0.02),
    "token_memory_vs_tokens": ("<=", 1.1),
}
"""Issue 30's targets: ratio -> (comparison, bound)."""


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What every arm shares: the model, its batch and the token budget."""

    spec: dict[str, Any]
    size: str
    micro_batch: int
    steps_2w: int
    """Optimizer steps of the 2-worker arm; the one-stream arms take twice as many."""
    windows: int
    """Evaluation windows per arm (the first is left out of tokens/s)."""
    seed: int = 0

    @property
    def block(self) -> int:
        return int(self.spec["max_position_embeddings"])

    def config(self, workers: int, cpus_per_worker: int | None = None) -> LMTrainConfig:
        steps = self.steps(workers)
        return LMTrainConfig(
            size=self.size,
            block_size=self.block,
            vocab_size=int(self.spec["vocab_size"]),
            workers=workers,
            batch_size=self.micro_batch,
            eval_every=steps // self.windows,
            eval_tokens=IN_RUN_EVAL_WINDOWS * self.block,
            cpus_per_worker=cpus_per_worker,
            seed=self.seed,
        )

    def steps(self, workers: int) -> int:
        """The same tokens for every arm: 2 workers' steps x 2 / workers."""
        return self.steps_2w * 2 // workers


# ----------------------------------------------------------------------------- machine


def cpu_flags() -> dict[str, bool]:
    """The instruction-set flags that decide CPU matmul speed (and Kiln's bf16 default)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    flags = next(
        (set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set()
    )
    found = {flag: flag in flags for flag in CPU_FLAGS}
    found["amx"] = any(found[f] for f in CPU_FLAGS if f.startswith("amx"))
    return found


# ----------------------------------------------------------------------------- data


@dataclass
class Corpus:
    dataset: TextDataset
    vocab_size: int
    special_ids: dict[str, int]
    counts: dict[str, int]
    train: list[np.ndarray]
    """The training token streams, store by store, copied into this process's numpy."""
    val: list[np.ndarray]


def load_corpus(uri: str, val_fraction: float, vocab_size: int, out: dict[str, Any]) -> Corpus:
    """The corpus in 2 TextShardStores (one per worker), a BPE tokenizer trained on a sample of
    it as `kiln train` trains one, and the token streams tokenised in the stores."""
    started = time.perf_counter()
    dataset = load_text_dataset(TextSourceSpec(uri=uri, val_fraction=val_fraction), 2)
    out["load_s"] = time.perf_counter() - started
    started = time.perf_counter()
    tokenizer = train_bpe(sample_for_tokenizer(dataset, TOKENIZER_SAMPLE_BYTES), vocab_size)
    out["tokenizer_s"] = time.perf_counter() - started
    started = time.perf_counter()
    counts = tokenize_dataset(dataset, tokenizer_to_bytes(tokenizer))
    out["tokenize_s"] = time.perf_counter() - started
    ids = {
        "bos_token_id": tokenizer.token_to_id("<|bos|>"),
        "eos_token_id": tokenizer.token_to_id("<|eos|>"),
        "pad_token_id": tokenizer.token_to_id("<|pad|>"),
    }
    summary = dataset.summary()
    out.update(
        corpus=uri,
        files=summary["files"],
        documents={s: summary[s]["documents"] for s in ("train", "val")},
        text_bytes={s: summary[s]["bytes"] for s in ("train", "val")},
        train_tokens=counts["train"],
        val_tokens=counts["val"],
    )
    return Corpus(
        dataset,
        tokenizer.get_vocab_size(),
        ids,
        counts,
        token_streams(dataset, "train"),
        token_streams(dataset, "val"),
    )


def token_streams(dataset: TextDataset, split: str) -> list[np.ndarray]:
    """The split's token streams as this process's own numpy arrays (what a plain loop holds)."""
    arrays = ray.get(dataset.token_refs(split))
    streams = [np.array(a.to_numpy(zero_copy_only=False), copy=True) for a in arrays]
    return [s for s in streams if len(s)]


def scoring_windows(streams: list[np.ndarray], block: int, max_windows: int) -> list[np.ndarray]:
    """The held-out windows every arm's final model is scored on, in batches of 16: evenly
    spaced `eval_windows` of every validation stream, `max_windows` in all."""
    per_stream = max(1, max_windows // max(1, len(streams)))
    found = [w for s in streams if len(w := eval_windows(s, block, per_stream))]
    if not found:
        raise SystemExit(
            f"no validation stream holds a {block + 1}-token window: give more text, a larger "
            "--val-fraction or a smaller block"
        )
    every = np.concatenate(found)
    return [every[i : i + 16] for i in range(0, len(every), 16)]


def held_out_loss(model: nn.Module, batches: list[np.ndarray], bf16: bool) -> float:
    torch.set_num_threads(1)
    sums = validation_sums(model, batches, bf16, CPU)
    return float(sums[0] / sums[1])


# ----------------------------------------------------------------------------- memory


def object_sizes(refs: list[Any]) -> tuple[int, int]:
    """(bytes in the object store, bytes inlined in their owner) of `refs`, as the object
    directory reports their sizes: a sum of sizes, whatever else runs on the node."""
    from ray.experimental import get_object_locations

    found = get_object_locations(refs, timeout_ms=60_000)
    sizes = [(loc["object_size"], bool(loc["node_ids"])) for loc in found.values()]
    if len(found) != len(refs) or any(size is None for size, _ in sizes):
        raise SystemExit(f"object sizes unknown for some of the {len(refs)} token arrays")
    return sum(s for s, stored in sizes if stored), sum(s for s, stored in sizes if not stored)


def token_memory(corpus: Corpus) -> dict[str, Any]:
    """The token arrays' resident bytes against tokens x itemsize; stops on a figure that
    cannot be right (a resident array smaller than the tokens it holds)."""
    dataset = corpus.dataset
    refs = dataset.token_refs("train") + dataset.token_refs("val")
    in_store, inline = object_sizes(refs)
    itemsize = token_dtype(corpus.vocab_size).itemsize
    token_bytes = (corpus.counts["train"] + corpus.counts["val"]) * itemsize
    reported = sum(m["tokens"] for m in ray.get([h.memory_bytes.remote() for h in dataset.handles]))
    found = {
        "token_itemsize": itemsize,
        "token_bytes": token_bytes,
        "token_object_store_bytes": in_store,
        "token_inline_bytes": inline,
        "token_bytes_reported": reported,
        "token_memory_vs_tokens": (in_store + inline) / token_bytes,
    }
    problems = []
    if found["token_memory_vs_tokens"] < 1.0:
        problems.append(
            f"the token arrays' objects ({in_store + inline} B) are smaller than their "
            f"tokens ({token_bytes} B)"
        )
    if reported != token_bytes:
        problems.append(f"the stores count {reported} B of tokens, not {token_bytes} B")
    if problems:
        raise SystemExit("memory measurement cannot be right: " + "; ".join(problems))
    return found


# ----------------------------------------------------------------------------- arms


def steady(rates: list[float]) -> float:
    """Median tokens/s over the windows, the first (warm-up) one left out when there are more."""
    return float(statistics.median(rates[1:] if len(rates) > 1 else rates))


def ray_worker_niceness(corpus: Corpus) -> int:
    """The niceness Ray starts its worker processes with (Kiln's Train workers among them):
    read from a running store rather than assumed (`RAY_worker_niceness`, 15 by default)."""
    store = corpus.dataset.handles[0]
    return int(ray.get(store.__ray_call__.remote(lambda _: os.nice(0))))


def plain_process(niceness: int) -> ProcessPoolExecutor:
    """One fresh process, at `niceness`, for the plain loop. Ray runs its workers niced (15):
    on a machine other work keeps busy, a plain loop at the driver's niceness 0 would take a
    far larger share of the cores than Kiln's workers, and the arms would compare the
    scheduler's weights, not the loops. Alone on a machine, the niceness changes nothing."""
    context = multiprocessing.get_context("spawn")
    raise_by = max(0, niceness - os.nice(0))
    return ProcessPoolExecutor(1, mp_context=context, initializer=os.nice, initargs=(raise_by,))


def plain_torch(
    train: list[np.ndarray],
    plan: Plan,
    threads: int,
    scoring: list[np.ndarray],
    streams: int = 1,
) -> dict[str, Any]:
    """The loop a user writes without Ray: one process, `threads` torch threads, the same model,
    optimizer, schedule and windows (rank 0's sampling seed, as Kiln's one worker), for the
    2-worker arm's tokens. `streams` micro-batches are drawn as one batch per step: 1, the
    steps of one Kiln worker; 2, the 2-worker arm's global batch and steps."""
    torch.set_num_threads(threads)
    cfg = plan.config(workers=streams)
    steps = plan.steps(streams)
    eval_every, warmup = cfg.planned_eval_every(steps), cfg.planned_warmup(steps)
    batch = cfg.micro_batch * streams
    bf16 = use_bf16(cfg.precision, CPU)
    torch.manual_seed(cfg.seed)
    model = build_lm(plan.spec).train()
    optimizer = make_optimizer(model, cfg)
    rng = np.random.default_rng([cfg.seed, 0, 7])
    rates, losses, cpu_marks = [], [], []
    started = window_start = time.perf_counter()
    window_tokens = 0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, warmup, cfg.peak_lr)
        x, y = sample_windows(train, plan.block, batch, rng)  # (B, T) each
        optimizer.zero_grad(set_to_none=True)
        with autocast(bf16, CPU):
            logits = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        window_tokens += x.numel()
        if (step + 1) % eval_every == 0:
            rates.append(window_tokens / (time.perf_counter() - window_start))
            cpu_marks.append(time.process_time())
            window_start, window_tokens = time.perf_counter(), 0
    loop_s = time.perf_counter() - started
    steady_tokens = (len(cpu_marks) - 1) * eval_every * batch * plan.block
    return {
        "tokens_per_s": steady(rates),
        "wall_tokens_per_s": steps * batch * plan.block / loop_s,
        "tokens_per_cpu_s": per_second(steady_tokens, cpu_marks[-1] - cpu_marks[0]),
        "window_tokens_per_s": rates,
        "train_loss": float(np.mean(losses[-eval_every:])),
        "val_loss": held_out_loss(model, scoring, bf16),
        "threads": threads,
        "steps": steps,
        "niceness": os.nice(0),
    }


def kiln(
    corpus: Corpus,
    plan: Plan,
    workers: int,
    cpus_per_worker: int,
    settings: Settings,
    scoring: list[np.ndarray],
) -> dict[str, Any]:
    """`kiln train --model lm`'s fit (cluster/lm_pipeline.py) on the resident token shards."""
    cfg = plan.config(workers, cpus_per_worker)
    arrivals: list[Arrival] = []

    def on_eval(metrics: dict[str, Any]) -> None:
        pids = [w["pid"] for w in metrics["workers"]]
        arrivals.append(Arrival(time.perf_counter(), cpu_seconds(pids), cpu_seconds(ray_pids())))

    started = time.perf_counter()
    result, history = fit_lm(
        cfg,
        plan.spec,
        corpus.dataset,
        plan.steps(workers),
        settings,
        f"bench-lm-{workers}w-{time.monotonic_ns()}",
        on_eval=on_eval,
    )
    fit_s = time.perf_counter() - started
    last = history[-1]
    if last["step"] != plan.steps(workers):
        raise SystemExit(f"the {workers}-worker run stopped at step {last['step']}")
    tokens = last["tokens_seen"] - history[0]["tokens_seen"]
    first, end = arrivals[0], arrivals[-1]
    return {
        "tokens_per_s": steady([h["tokens_per_s"] for h in history]),
        "wall_tokens_per_s": per_second(tokens, end.at_s - first.at_s),
        "tokens_per_cpu_s": per_second(tokens, end.workers_cpu_s - first.workers_cpu_s),
        "tokens_per_ray_cpu_s": per_second(tokens, end.ray_cpu_s - first.ray_cpu_s),
        "window_tokens_per_s": [h["tokens_per_s"] for h in history],
        "train_loss": last["train_loss"],
        "val_loss": held_out_loss(final_model(result.checkpoint, plan.spec), scoring, last["bf16"]),
        "threads": [w["torch_threads"] for w in last["workers"]],
        "pids": [w["pid"] for w in last["workers"]],
        "grad_sync": last["grad_sync"],
        "steps": last["step"],
        "fit_s": fit_s,
    }


@dataclass(frozen=True)
class Arrival:
    """When the driver received an evaluation, and the CPU time used by then."""

    at_s: float
    workers_cpu_s: float
    """The Train workers' processes (every thread: torch's, Ray's)."""
    ray_cpu_s: float
    """The driver and every process it started: Ray's own, the controller, actors, workers."""


def per_second(tokens: int, seconds: float) -> float | None:
    """Tokens per second, or None over less than a second: the driver reads the reports every
    0.2 s, so two may arrive (and be timed) together."""
    return tokens / seconds if seconds >= 1.0 else None


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes (those gone meanwhile count nothing)."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def ray_pids() -> list[int]:
    """This process and its descendants: the local Ray it started (GCS, raylet, workers)."""
    me = psutil.Process()
    return [me.pid, *(p.pid for p in me.children(recursive=True))]


def add_arm(out: dict[str, Any], name: str, found: dict[str, Any]) -> None:
    for key, value in found.items():
        out[f"{name}_{key}"] = value


def target_checks(out: dict[str, Any]) -> dict[str, Any]:
    """Every ratio the run measured, its target, and whether it was met."""
    out["kiln_1w_vs_torch"] = out["kiln_1w_tokens_per_s"] / out["torch_tokens_per_s"]
    out["kiln_2w_vs_torch"] = out["kiln_2w_tokens_per_s"] / out["torch_tokens_per_s"]
    out["kiln_2w_vs_kiln_1w"] = out["kiln_2w_tokens_per_s"] / out["kiln_1w_tokens_per_s"]
    if "kiln_1w_1cpu_tokens_per_s" in out:
        out["kiln_1w_1cpu_vs_torch_1t"] = (
            out["kiln_1w_1cpu_tokens_per_s"] / out["torch_1t_tokens_per_s"]
        )
    for arm in ("kiln_1w", "kiln_2w"):  # diagnostics: CPU spent per token, whatever the load
        kiln_rate, torch_rate = out[f"{arm}_tokens_per_cpu_s"], out["torch_1t_tokens_per_cpu_s"]
        out[f"{arm}_vs_torch_per_cpu_s"] = (
            kiln_rate / torch_rate if kiln_rate and torch_rate else None
        )
    out["val_loss_ratio"] = out["kiln_2w_val_loss"] / out["torch_val_loss"]
    out["val_loss_ratio_same_batch"] = out["kiln_2w_val_loss"] / out["torch_2w_batch_val_loss"]
    out["kiln_1w_val_loss_ratio"] = out["kiln_1w_val_loss"] / out["torch_val_loss"]
    checks: dict[str, Any] = {"targets": {}}
    for name, (op, bound) in TARGETS.items():
        checks["targets"][name] = f"{op} {bound}"
        value = out[name]
        if op == ">=":
            checks[f"{name}_pass"] = value >= bound
        elif op == "<=":
            checks[f"{name}_pass"] = value <= bound
        else:
            checks[f"{name}_pass"] = abs(value - 1.0) <= bound
    return checks


def compare_arms(args: argparse.Namespace, settings: Settings, out: dict[str, Any]) -> None:
    """Load and tokenise the corpus, then every arm on it; the figures go into `out`."""
    corpus = load_corpus(args.corpus, args.val_fraction, args.vocab_size, out)
    try:
        cfg = LMTrainConfig(size=args.size, block_size=args.block_size, batch_size=args.batch_size)
        spec = model_spec(cfg, corpus.vocab_size, corpus.special_ids)
        plan = Plan(
            spec=spec,
            size=args.size,
            micro_batch=cfg.micro_batch,
            steps_2w=args.steps,
            windows=args.windows,
        )
        if corpus.counts["longest_train"] < plan.block + 1:
            raise SystemExit(
                f"no training stream holds a {plan.block + 1}-token window: give more text"
            )
        scoring = scoring_windows(corpus.val, plan.block, args.eval_windows)
        out.update(
            size=args.size,
            parameters=sum(p.numel() for p in build_lm(spec).parameters()),
            vocab_size=corpus.vocab_size,
            block_size=plan.block,
            micro_batch=plan.micro_batch,
            steps_2w=plan.steps(2),
            steps_1stream=plan.steps(1),
            token_budget=plan.steps(2) * plan.config(2).tokens_per_step(plan.block),
            windows=plan.windows,
            peak_lr=cfg.peak_lr,
            warmup_tokens=plan.config(2).planned_warmup(plan.steps(2))
            * plan.config(2).tokens_per_step(plan.block),
            scoring_windows=sum(len(b) for b in scoring),
            bf16=use_bf16(cfg.precision, CPU),
        )
        # Memory first: read before any arm maps the arrays.
        out.update(token_memory(corpus))
        cores = os.cpu_count() or 1
        niceness = out["ray_worker_niceness"] = ray_worker_niceness(corpus)
        if args.plain_niceness is not None:
            niceness = args.plain_niceness
        with plain_process(niceness) as plain:
            for threads in sorted({1, cores}):
                found = plain.submit(plain_torch, corpus.train, plan, threads, scoring).result()
                add_arm(out, f"torch_{threads}t", found)
            best = max(sorted({1, cores}), key=lambda t: out[f"torch_{t}t_tokens_per_s"])
            out["torch_best_threads"] = best
            for key in ("tokens_per_s", "val_loss"):
                out[f"torch_{key}"] = out[f"torch_{best}t_{key}"]
            # A diagnostic: the 2-worker arm's optimization (its global batch, its steps) in
            # one process, which separates what the larger batch costs from what Kiln does.
            found = plain.submit(plain_torch, corpus.train, plan, best, scoring, 2).result()
            add_arm(out, "torch_2w_batch", found)
        add_arm(out, "kiln_1w", kiln(corpus, plan, 1, min(2, cores), settings, scoring))
        if cores > 1 and not args.smoke_test:  # a diagnostic: one worker at 1 thread
            add_arm(out, "kiln_1w_1cpu", kiln(corpus, plan, 1, 1, settings, scoring))
        add_arm(out, "kiln_2w", kiln(corpus, plan, 2, 1, settings, scoring))
    finally:
        corpus.dataset.release()
    out.update(target_checks(out))


# ----------------------------------------------------------------------------- --long


def long_run(args: argparse.Namespace, settings: Settings, out: dict[str, Any]) -> None:
    """The whole stdlib at --size small for --max-minutes on 2 workers, through the path of
    `kiln train --model lm` (train_lm_and_register), its perplexity curve drawn to `--png`."""
    from kiln.cli.language import plot_perplexity
    from kiln.lm_pipeline import LMTrainRequest, train_lm_and_register
    from kiln.runtime import registry_for

    train = LMTrainConfig(
        size=args.size,
        block_size=args.block_size,
        batch_size=args.batch_size,
        vocab_size=args.vocab_size,
        workers=2,
        cpus_per_worker=1,
        max_minutes=args.max_minutes,
    )
    request = LMTrainRequest(
        data=args.corpus, train=train, name="stdlib-lm", val_fraction=args.val_fraction
    )
    outcome = train_lm_and_register(settings, request, registry_for(settings))
    metrics = outcome.metrics
    plot_perplexity(outcome.history, metrics.get("unigram_perplexity"), str(args.png))
    out.update({f"long_{k}": v for k, v in metrics.items()})
    out.update(
        long_corpus=args.corpus,
        long_size=args.size,
        long_max_minutes=args.max_minutes,
        long_version=outcome.record.ref,
        long_elapsed_s=outcome.elapsed_s,
        long_grad_sync=outcome.grad_sync,
        long_png=str(args.png),
        long_beats_unigram=(metrics["perplexity"] or float("inf"))
        < (metrics["unigram_perplexity"] or 0.0),
        long_val_perplexity_curve=[
            (h["tokens_seen"], h["val_perplexity"])
            for h in outcome.history
            if "val_perplexity" in h
        ],
    )


# ----------------------------------------------------------------------------- plot

ARMS = [
    ("plain torch, 1 thread", "torch_1t_tokens_per_s"),
    ("plain torch, 2 threads", "torch_2t_tokens_per_s"),
    ("Kiln 1 worker, 2 CPUs", "kiln_1w_tokens_per_s"),
    ("Kiln 1 worker, 1 CPU", "kiln_1w_1cpu_tokens_per_s"),
    ("Kiln 2 workers, shared memory", "kiln_2w_tokens_per_s"),
]


def plot_runs(lines_path: Path, png: Path) -> None:
    """A bar per arm: the median tokens/s over the runs' JSON lines, whiskers their min-max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(line) for line in lines_path.read_text().splitlines() if line[:1] == "{"]
    fig, ax = plt.subplots(figsize=(7, 3), dpi=100)
    for i, (_, key) in enumerate(ARMS):
        values = [run[key] for run in runs if key in run]
        if not values:
            continue
        mid = statistics.median(values)
        ax.barh(i, mid, color="tab:orange" if key.startswith("torch") else "tab:blue", alpha=0.7)
        ax.errorbar(mid, i, xerr=[[mid - min(values)], [max(values) - mid]], color="k", capsize=4)
        ax.plot(values, [i] * len(values), "k.", markersize=4)
    ax.set_yticks(range(len(ARMS)), [label for label, _ in ARMS])
    ax.invert_yaxis()
    ax.set_xlabel(f"tokens/s (median of {len(runs)} runs, min-max)")
    first = runs[0] if runs else {}
    ax.set_title(
        f"Llama {first.get('size')}, block {first.get('block_size')}, "
        f"micro-batch {first.get('micro_batch')}, {first.get('cores')} cores"
    )
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", help=f"a text: URI (default {CORPUS}; --long: {LONG_CORPUS})")
    parser.add_argument(
        "--size", choices=("tiny", "small", "base"), help="default tiny (--long: small)"
    )
    parser.add_argument("--block-size", type=int, help="default: the size's")
    parser.add_argument(
        "--batch-size", type=int, help="micro-batch per worker; default: the size's"
    )
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=40, help="the 2-worker arm's steps")
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows per arm")
    parser.add_argument("--eval-windows", type=int, default=128, help="held-out windows scored")
    parser.add_argument(
        "--plain-niceness",
        type=int,
        help="niceness of the plain loop's process (default: Ray's workers'; 0: the driver's)",
    )
    parser.add_argument(
        "--smoke-test", action="store_true", help="a few files, block 64 (with --long: 15 s)"
    )
    parser.add_argument("--long", action="store_true", help="only the long stdlib run")
    parser.add_argument("--max-minutes", type=float, default=10.0, help="--long's training time")
    parser.add_argument(
        "--png", type=Path, help=f"--long's curve (default {RESULTS}/lm_train_<size>.png)"
    )
    parser.add_argument(
        "--plot",
        nargs=2,
        metavar=("LINES", "PNG"),
        help="Draw the runs in LINES (this script's JSON lines) as a bar chart; runs nothing.",
    )
    args = parser.parse_args()
    if args.smoke_test:
        args.corpus, args.size = args.corpus or SMOKE_CORPUS, args.size or "tiny"
        args.vocab_size, args.block_size = 512, args.block_size or 64
        args.batch_size, args.steps, args.windows = args.batch_size or 4, 4, 2
        args.eval_windows, args.val_fraction = 16, 0.2
        args.max_minutes = min(args.max_minutes, 0.25)
        args.png = args.png or Path(tempfile.gettempdir()) / "lm_train_smoke.png"
    args.corpus = args.corpus or (LONG_CORPUS if args.long else CORPUS)
    args.size = args.size or ("small" if args.long else "tiny")
    args.png = args.png or RESULTS / f"lm_train_{args.size}.png"
    if args.steps < 1 or args.windows < 1 or args.steps % args.windows:
        raise SystemExit(
            f"--steps ({args.steps}) must be a positive multiple of --windows ({args.windows})"
        )
    return args


def main() -> None:
    args = parse_args()
    if args.plot:
        plot_runs(Path(args.plot[0]), Path(args.plot[1]))
        return
    cores = os.cpu_count() or 1
    out: dict[str, Any] = {
        "cores": cores,
        "cpu_flags": cpu_flags(),
        "torch_version": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
    }
    ray.init(
        address="local", num_cpus=max(4, cores + 2), include_dashboard=False, log_to_driver=False
    )
    home = Path(tempfile.mkdtemp(prefix="kiln-bench-lm-"))
    try:
        if args.long:
            long_run(args, Settings(kiln_home=home), out)
        else:
            compare_arms(args, Settings(kiln_home=home), out)
    finally:
        ray.shutdown()
        shutil.rmtree(home, ignore_errors=True)
    out["loadavg_end"] = os.getloadavg()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
