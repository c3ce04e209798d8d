"""Training throughput: Kiln's ShardStore feed against plain PyTorch and Ray Data.

In one run, on the same synthetic data, model and cores, measures steady-state samples/s of:
  - Kiln with 1 and 2 Ray Train workers reading resident ShardStore actors (ObjectRefs), each
    worker with its share of the cores (`cpus_per_worker`) and as many torch threads (one
    worker also at 1 CPU; two workers at 1 and 8 micro-batches per gradient sync,
    `grad_accum`: the faster counts, as for plain torch). Two workers on one node average
    gradients in shared memory (`--grad-sync auto`); they also run once with DDP over gloo
    (`--grad-sync ddp`, grad_accum 1): `grad_sync_gain` is what the shared memory buys,
  - a plain single-process PyTorch loop at 1 thread and at every core; the faster of the two
    is the baseline (on small matmuls more threads can be slower),
  - the same Train loop (2 workers) fed by Ray Data's `iter_torch_batches` (whose ranks may
    take unequal steps, so DDP; `shards_vs_raydata` compares it with the DDP shard arm),
and the shard actors' resident memory against the raw Arrow bytes: object-store bytes their
refs pin plus private memory above a ShardStore that loaded 1,000 rows, printed beside the
machine's used memory before/after the load; a figure that cannot be right stops the run.
Prints one JSON line last, with every ratio, its target (issue 12) and whether it was met, and
each arm's last-epoch training loss (`final_train_loss`: what a larger step bought or cost).

    python benchmarks/train_throughput.py               # 2M rows x 32 features
    python benchmarks/train_throughput.py --smoke-test  # 20k rows, for CI
    python benchmarks/train_throughput.py --rows 5000000 --shards 4 --epochs 1 --only-kiln
    python benchmarks/train_throughput.py --plot benchmarks/results/train_throughput.out \
        benchmarks/results/train_throughput.png   # the runs' lines as a bar chart
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.05")  # as Kiln sets it
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from kiln.actors.shards import ShardStore, load_dataset  # noqa: E402
from kiln.actors.sources import SourceSpec  # noqa: E402
from kiln.pipeline import fit, make_spec  # noqa: E402
from kiln.settings import Settings  # noqa: E402
from kiln.training.config import TrainConfig  # noqa: E402
from kiln.training.data import encode_labels  # noqa: E402
from kiln.training.loop import make_optimizer, run_epoch, shard_batches  # noqa: E402
from kiln.training.models import build_model, set_standardization  # noqa: E402


class PeakMemory:
    """Samples the machine's used memory in a thread; `peak_bytes` is the rise above the start."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s, self.start = interval_s, psutil.virtual_memory().used
        self.peak, self._stop = self.start, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, psutil.virtual_memory().used)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_bytes(self) -> int:
        return self.peak - self.start


def machine_used_bytes() -> int:
    """Memory the machine cannot hand out: total - available. Unlike psutil's `used`, this
    counts /dev/shm, where Ray's object store keeps its pages."""
    vm = psutil.virtual_memory()
    return int(vm.total - vm.available)


def plasma_object_bytes(handles: list[Any]) -> tuple[int, int]:
    """Object-store bytes pinned by the shards' refs: the sizes of the objects the ShardStores
    own, as the object directory reports them. Objects small enough to live inline in the
    owner's heap (no node holds them in plasma) come back apart, as the second figure: the
    actor's private memory already counts them. A sum of sizes cannot go negative, whatever
    else runs on the node."""
    from ray.experimental import get_object_locations

    refs = [ref for refs in ray.get([h.batch_refs.remote() for h in handles]) for ref in refs]
    found = get_object_locations(refs, timeout_ms=60_000)
    sizes = [(loc["object_size"], bool(loc["node_ids"])) for loc in found.values()]
    if len(found) != len(refs) or any(size is None for size, _ in sizes):
        raise SystemExit(f"object sizes unknown for some of the {len(refs)} shard objects")
    in_plasma = sum(size for size, stored in sizes if stored)
    return in_plasma, sum(size for size, stored in sizes if not stored)


def steady_rows_per_s(history: list[dict[str, Any]]) -> float:
    """Median of the per-epoch throughput, the first (warm-up) epoch left out when possible."""
    rates = [m["rows_per_s"] for m in history]
    return float(statistics.median(rates[1:] if len(rates) > 1 else rates))


FINAL_LOSS: dict[str, float] = {}
"""Training loss of each arm's last epoch, by arm: what its throughput bought."""


def kiln_run(cfg: TrainConfig, data, settings: Settings, extra=None, datasets=None) -> float:
    spec = make_spec(cfg, data.train)
    name = f"bench-{cfg.workers}w-{time.monotonic_ns()}"
    _, history = fit(cfg, spec, data, settings, name, extra_loop_config=extra, datasets=datasets)
    arm = f"kiln_{cfg.workers}w_{cfg.grad_accum}accum_{(extra or {}).get('feed', 'shards')}"
    arm += "_ddp" if cfg.grad_sync == "ddp" else ""
    FINAL_LOSS[arm] = history[-1]["train_loss"]
    return steady_rows_per_s(history)


def plain_torch_rows_per_s(data, cfg: TrainConfig, threads: int) -> float:
    """The loop a user writes without Ray: one process, all cores to torch, same steps."""
    torch.set_num_threads(threads)
    _, x, y = data.train.read_arrays()
    spec = make_spec(cfg, data.train)
    y = encode_labels(y, spec["classes"])
    model = build_model(spec)
    set_standardization(model, spec)
    optimizer = make_optimizer(model, cfg)
    from kiln.training.loop import LoopConfig

    loop_cfg = LoopConfig(train=cfg, spec=spec, shards=[], num_train_rows=len(x))
    rates = []
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        batches = shard_batches(x, y, cfg.batch_size, (0, epoch, 0), torch.device("cpu"))
        totals = run_epoch(model, optimizer, batches, loop_cfg, torch.device("cpu"))
        rates.append(float(totals[2]) / (time.perf_counter() - started))
    FINAL_LOSS[f"torch_{threads}t"] = float(totals[0] / totals[2])
    torch.set_num_threads(1)
    return float(statistics.median(rates[1:] if len(rates) > 1 else rates))


def fastest(name: str, unit: str, options: set[int], rows_per_s: Any) -> dict[str, Any]:
    """`rows_per_s(option)` for every option; `<name>_rows_per_s` is the fastest's."""
    found: dict[str, Any] = {}
    for option in sorted(options, reverse=True):
        found[f"{name}_{option}{unit}_rows_per_s"] = rows_per_s(option)
    best = max(options, key=lambda o: found[f"{name}_{o}{unit}_rows_per_s"])
    found[f"{name}_best_{unit}"] = best
    found[f"{name}_rows_per_s"] = found[f"{name}_{best}{unit}_rows_per_s"]
    return found


def best_kiln_1w(data, settings: Settings, cfg: dict[str, Any], cores: int) -> dict[str, Any]:
    """One Kiln worker with every core (the default on an idle node) and with 1 CPU."""

    def run(cpus: int) -> float:
        return kiln_run(TrainConfig(workers=1, cpus_per_worker=cpus, **cfg), data, settings)

    return fastest("kiln_1w", "cpu", {1, cores}, run)


GRAD_ACCUM = {1, 8}
"""Micro-batches per optimizer step of the 2-worker arm: the default (one DDP all-reduce per
256-row batch) and 8 (one per 8 batches, `--grad-accum 8`); the faster counts."""


def best_kiln_2w(
    data, settings: Settings, cfg: dict[str, Any], cores: int, measured: dict[int, float]
) -> dict[str, Any]:
    """Two Kiln workers, each with its share of the cores, at every GRAD_ACCUM (`measured`:
    rows/s already measured, by grad_accum)."""

    def run(accum: int) -> float:
        if accum in measured:
            return measured[accum]
        two = TrainConfig(workers=2, cpus_per_worker=max(1, cores // 2), grad_accum=accum, **cfg)
        return kiln_run(two, data, settings)

    return fastest("kiln_2w", "accum", GRAD_ACCUM, run)


def best_plain_torch(data, cfg: TrainConfig, cores: int) -> dict[str, Any]:
    """Plain torch at 1 thread and at every core: the faster is the baseline a user gets."""
    return fastest("torch", "t", {1, cores}, lambda t: plain_torch_rows_per_s(data, cfg, t))


TARGETS = {
    "kiln_1w_vs_torch": (">=", 0.9),
    "kiln_2w_vs_torch": (">=", 1.0),
    "shards_vs_raydata": (">=", 1.0),
    "memory_vs_raw": ("<=", 1.3),
}
"""Issue 12's targets: ratio -> (comparison, bound). Each side is its faster configuration."""


def target_checks(out: dict[str, Any]) -> dict[str, Any]:
    """Every ratio the run measured, its target, and whether it met it."""
    if "torch_rows_per_s" in out:
        out["kiln_1w_vs_torch"] = out["kiln_1w_rows_per_s"] / out["torch_rows_per_s"]
        out["kiln_2w_vs_torch"] = out["kiln_2w_rows_per_s"] / out["torch_rows_per_s"]
        out["kiln_2w_1accum_vs_torch"] = out["kiln_2w_1accum_rows_per_s"] / out["torch_rows_per_s"]
        # The same loop, steps and sync (DDP, one all-reduce per batch) on both feeds.
        out["shards_vs_raydata"] = (
            out["kiln_2w_1accum_ddp_rows_per_s"] / out["raydata_2w_rows_per_s"]
        )
    if "kiln_2w_1accum_ddp_rows_per_s" in out:
        out["grad_sync_gain"] = (
            out["kiln_2w_1accum_rows_per_s"] / out["kiln_2w_1accum_ddp_rows_per_s"]
        )
    checks: dict[str, Any] = {"targets": {}}
    for name, (op, bound) in TARGETS.items():
        if name not in out:
            continue
        checks["targets"][name] = f"{op} {bound}"
        checks[f"{name}_pass"] = out[name] >= bound if op == ">=" else out[name] <= bound
    return checks


def raydata_dataset(data):
    """The same training rows as a Ray Data dataset with a tensor column."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    _, x, y = data.train.read_arrays()
    table = pa.table({"features": ArrowTensorArray.from_numpy(np.ascontiguousarray(x)), "label": y})
    return ray.data.from_arrow(table)


def shard_memory(source: SourceSpec, num_shards: int) -> dict[str, Any]:
    """Resident bytes of the shards: the object-store bytes their refs pin, plus what each
    actor holds privately beyond an empty ShardStore; cross-checked against the machine's
    used memory (total - available) before and after the load, which also counts the other
    splits, the actors' processes themselves, and anything else running on the machine."""
    # "Empty": the same load (imports, batch building, puts, statistics) of 1,000 rows, so
    # the baseline holds what any loaded shard's process holds, not an idle actor's less.
    tiny = SourceSpec(uri=re.sub(r"rows=\d+", "rows=1000", source.uri))
    empty = ShardStore.options(num_cpus=0).remote(tiny, "train", 0, 1)  # type: ignore[attr-defined]
    ray.get(empty.ready.remote())
    baseline = ray.get(empty.memory_bytes.remote())["private"]
    pid = ray.get(empty.__ray_call__.remote(lambda _: os.getpid()))
    ray.kill(empty)
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(timeout=30)  # its memory is back before the "before" reading
    machine_before = machine_used_bytes()
    data = load_dataset(source, num_shards)
    machine_delta = machine_used_bytes() - machine_before
    handles = data.train.handles
    raw = sum(ray.get([h.num_bytes.remote() for h in handles]))
    store, inline = plasma_object_bytes(handles)
    private = [ray.get(h.memory_bytes.remote())["private"] for h in handles]
    above_empty = sum(max(p - baseline, 0) for p in private)
    data.release()
    found = {
        "raw_bytes": raw,
        "object_store_bytes": store,
        "private_above_empty_bytes": above_empty,
        "resident_bytes": store + above_empty,
        "memory_vs_raw": (store + above_empty) / raw,
        "machine_used_delta_bytes": machine_delta,
        "machine_delta_vs_raw": machine_delta / raw,
    }
    check_memory(found, inline)
    return found


def check_memory(found: dict[str, Any], inline_bytes: int) -> None:
    """Fail loudly on a memory figure that cannot be right, instead of printing it."""
    total = psutil.virtual_memory().total
    problems = []
    if not 0 <= found["resident_bytes"] <= total:
        problems.append(f"resident {found['resident_bytes']} B is outside [0, {total}] B")
    if found["object_store_bytes"] + inline_bytes < 0.99 * found["raw_bytes"]:
        problems.append(
            f"the shards' objects ({found['object_store_bytes'] + inline_bytes} B) are smaller "
            f"than the Arrow batches they hold ({found['raw_bytes']} B)"
        )
    if found["machine_used_delta_bytes"] < 0:
        problems.append(
            f"the machine's used memory fell by {-found['machine_used_delta_bytes']} B while "
            "the shards loaded: other processes freed memory, so the cross-check cannot be "
            "made; rerun on a quiet machine"
        )
    if problems:
        raise SystemExit("memory measurement cannot be right: " + "; ".join(problems))


ARMS = [
    ("plain torch, best threads", "torch_rows_per_s"),
    ("Kiln 1 worker, best CPUs", "kiln_1w_rows_per_s"),
    ("Kiln 2 workers, shared memory, grad_accum 1", "kiln_2w_1accum_rows_per_s"),
    ("Kiln 2 workers, shared memory, grad_accum 8", "kiln_2w_8accum_rows_per_s"),
    ("Kiln 2 workers, DDP (gloo), grad_accum 1", "kiln_2w_1accum_ddp_rows_per_s"),
    ("Ray Data feed, 2 workers", "raydata_2w_rows_per_s"),
]


def plot_runs(lines_path: Path, png: Path) -> None:
    """A bar per arm: the median rows/s over the runs' JSON lines, the bar's whisker their
    min-max, each run a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(line) for line in lines_path.read_text().splitlines() if line[:1] == "{"]
    found = [[run[key] / 1e3 for run in runs if key in run] for _, key in ARMS]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    for i, values in enumerate(found):
        if not values:  # runs from before this arm existed
            continue
        mid = statistics.median(values)
        ax.barh(i, mid, color="tab:orange" if i == 0 else "tab:blue", alpha=0.7)
        ax.errorbar(mid, i, xerr=[[mid - min(values)], [max(values) - mid]], color="k", capsize=4)
        ax.plot(values, [i] * len(values), "k.", markersize=4)
    ax.set_yticks(range(len(ARMS)), [label for label, _ in ARMS])
    ax.invert_yaxis()
    ax.set_xlabel(f"thousand rows/s (median of {len(runs)} runs, min-max)")
    ax.set_title("2M x 32 rows, MLP 32-128-64-10, batch 256, 2 cores")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--only-kiln", action="store_true", help="Kiln 2 workers and memory only")
    parser.add_argument("--smoke-test", action="store_true", help="20k rows, 2 epochs")
    parser.add_argument(
        "--plot",
        nargs=2,
        metavar=("LINES", "PNG"),
        help="Draw the runs in LINES (this script's JSON lines) as a bar chart; runs nothing.",
    )
    args = parser.parse_args()
    if args.plot:
        plot_runs(Path(args.plot[0]), Path(args.plot[1]))
        return
    if args.smoke_test:
        args.rows, args.epochs = 20_000, 2

    uri = f"synthetic:classification?rows={args.rows}&features={args.features}&classes=10&seed=0"
    source = SourceSpec(uri=uri, test_fraction=0.001)
    cores = os.cpu_count() or 1
    ray.init(
        address="local", num_cpus=max(4, cores + 2), include_dashboard=False, log_to_driver=False
    )
    settings = Settings(kiln_home=Path(tempfile.mkdtemp(prefix="kiln-bench-")))
    cfg = dict(
        model="mlp", hidden=[128, 64], epochs=args.epochs, batch_size=args.batch_size, lr=1e-3
    )
    out: dict[str, Any] = {
        "rows": args.rows,
        "features": args.features,
        "cores": cores,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
    }

    # Memory first, while nothing else has run: the arms' worker processes free memory for a
    # while after they end, which would make the machine's used memory fall during the load.
    out.update(shard_memory(source, args.shards))
    # Each worker asks for its share of the cores and uses as many torch threads; the Ray
    # Data arm runs with the same workers and leaves Ray Data the two extra logical CPUs.
    two = TrainConfig(workers=2, cpus_per_worker=max(1, cores // 2), **cfg)
    with PeakMemory() as peak:
        started = time.perf_counter()
        data = load_dataset(source, args.shards)
        out["load_s"] = time.perf_counter() - started
        started = time.perf_counter()
        out["kiln_2w_1accum_rows_per_s"] = kiln_run(two, data, settings)
        out["kiln_2w_fit_s"] = time.perf_counter() - started
    out["peak_memory_bytes"] = peak.peak_bytes
    ddp = TrainConfig(workers=2, cpus_per_worker=max(1, cores // 2), grad_sync="ddp", **cfg)
    out["kiln_2w_1accum_ddp_rows_per_s"] = kiln_run(ddp, data, settings)
    if not args.only_kiln:
        out.update(best_kiln_2w(data, settings, cfg, cores, {1: out["kiln_2w_1accum_rows_per_s"]}))
        out.update(best_kiln_1w(data, settings, cfg, cores))
        out.update(best_plain_torch(data, TrainConfig(**cfg), cores))
        out["raydata_2w_rows_per_s"] = kiln_run(
            two,
            data,
            settings,
            extra={"feed": "raydata"},
            datasets={"train": raydata_dataset(data)},
        )
    data.release()
    ray.shutdown()
    out["final_train_loss"] = FINAL_LOSS
    out.update(target_checks(out))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
