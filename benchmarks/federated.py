"""Federated learning: `kiln federate` against central `kiln train`, FedProx against FedAvg,
and Kiln against Flower on the same problem.

Everything trains the digits MLP 64→128→64→10 (`kiln train`'s default model) with Kiln's
standardisation, and is scored on the same held-out test split (20%, seed 0: 360 rows).
  - central: `kiln train --data sklearn:digits` at its defaults, seeds 0 and 1.
  - fedavg_dirichlet: 10 clients, Dirichlet(0.5) label skew (`--partition dirichlet:0.5`), all
    clients every round, 5 local epochs of Adam (lr 1e-3, batch 32: `kiln federate`'s
    defaults), 30 rounds, seeds 0 and 1.
    `fedavg_gap_vs_central` is central's accuracy minus FedAvg's after 30 rounds (mean of
    the seeds).
  - flower: the same partition (Kiln's partitioner, seed 0), the same model, initial weights
    and local training (`kiln.federated.local.local_update`, called from a Flower NumPyClient), 20
    rounds of Flower's FedAvg in its Ray simulation engine (`flwr[simulation]`, in its own venv
    .venv-bench-flwr because it pins ray 2.55: see benchmarks/federated_flower.py), against
    Kiln's first 20 rounds of the seed-0 run (the same as a 20-round run: rounds are seeded).
    Seconds per round: the mean over rounds of one round's wall time as each framework sees it
    (Kiln: dispatch to aggregated weights, plus the evaluation; Flower: from its own log of
    round times when it reports them, else the run's wall time over rounds).
  - shards: `shards:2` (two classes per client, McMahan et al.), 10 clients, 5 local epochs,
    30 rounds, FedAvg against FedProx (mu 0.01); `fedprox_minus_fedavg` compares the final
    accuracies.
  - bytes_per_round: payload bytes per round of the seed-0 FedAvg run (the global vector as
    fetched by each sampled client, plus each update returned), against model size × sampled
    clients × 2.

Writes benchmarks/results/federated.png (accuracy per round) and prints one JSON line last.

    python benchmarks/federated.py                # about 10 minutes on 2 cores
    python benchmarks/federated.py --smoke-test   # 3 clients, 2 rounds, no Flower
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# This file's name is the `federated` package's: the repository goes first on the path, and
# the cwd is the repository, which Ray puts ahead of the script's folder on its workers' paths.
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")

FLOWER_PYTHON = ROOT / ".venv-bench-flwr" / "bin" / "python"
FLOWER_SCRIPT = ROOT / "benchmarks" / "federated_flower.py"
FLOWER_REQUIREMENT = "flwr[simulation]==1.42.0"
DATA = "sklearn:digits"
ROUNDS = 30
FLOWER_ROUNDS = 20
CLIENTS = 10
SEEDS = (0, 1)
LOCAL_EPOCHS = 5
"""`kiln federate`'s default (McMahan et al.'s E=5); E=1 ended 4 points below central here."""


def federate(settings: Any, registry: Any, **options: Any) -> dict[str, Any]:
    from kiln.actors.sources import SourceSpec
    from kiln.federation import FederateRequest, federate_and_register

    seed = options.pop("seed", 0)
    request = FederateRequest(
        data=DATA,
        source=SourceSpec(uri=DATA, seed=seed),
        seed=seed,
        batch_size=32,
        lr=1e-3,
        optimizer="adam",
        name="bench-federated",
        **options,
    )
    done = federate_and_register(settings, request, registry)
    return {
        "accuracy": [h["test_accuracy"] for h in done.history],
        "round_s": [h["round_s"] for h in done.history],
        "bytes": [h["bytes_down"] + h["bytes_up"] for h in done.history],
        "sampled": [len(h["sampled"]) for h in done.history],
        "parameters": done.parameters,
        "final": done.test_metrics["accuracy"],
        "spec": done.record.spec,
        "elapsed_s": done.elapsed_s,
    }


def central(settings: Any, registry: Any, seed: int) -> float:
    """`kiln train --data sklearn:digits --seed SEED` at the CLI's defaults."""
    import typer

    from kiln.cli import app
    from kiln.pipeline import train_and_register
    from kiln.requests import TrainRequest, option_names

    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    defaults = {p.name: p.default for p in command.params}
    wanted = option_names(TrainRequest.from_options)
    options = {k: defaults[k] for k in wanted} | {
        "data": DATA,
        "seed": seed,
        "register": "bench-central",
    }
    request = TrainRequest.from_options(**options)
    return float(train_and_register(settings, request, registry).test_metrics["accuracy"])


def ensure_flower_venv() -> str | None:
    """Make .venv-bench-flwr with Flower's simulation extra, once; None, or why it failed.

    Flower 1.42 pins ray 2.55 (Kiln runs 2.60), so it gets its own venv; torch, numpy and
    Kiln's other dependencies come from Kiln's venv through a .pth file placed after the
    venv's own site-packages (its ray, fastapi and typer win)."""
    venv = FLOWER_PYTHON.parent.parent
    site = (
        venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    )
    try:
        if not FLOWER_PYTHON.exists():
            base = Path(sys.base_prefix) / "bin" / "python3"
            subprocess.run([str(base), "-m", "venv", str(venv)], check=True, timeout=300)
            subprocess.run(
                [str(FLOWER_PYTHON), "-m", "pip", "install", FLOWER_REQUIREMENT],
                check=True,
                timeout=1800,
                capture_output=True,
            )
        kiln_site = next(p for p in sys.path if p.endswith("site-packages"))
        (site / "zz_kiln_main_venv.pth").write_text(kiln_site + "\n")
    except (subprocess.SubprocessError, OSError, StopIteration) as exc:
        return f"could not set up {venv}: {exc}"
    return None


def run_flower(rounds: int, spec: dict[str, Any], smoke: bool) -> dict[str, Any]:
    """Flower's run in its own venv; its JSON line, or why it could not run."""
    failed = ensure_flower_venv()
    if failed is not None:
        return {"error": failed}
    spec_file = Path(tempfile.mkdtemp()) / "spec.json"
    spec_file.write_text(json.dumps(spec))
    args = [
        str(FLOWER_PYTHON),
        str(FLOWER_SCRIPT),
        "--rounds",
        str(rounds),
        "--spec",
        str(spec_file),
    ]
    if smoke:
        args.append("--smoke-test")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        return {"error": f"exit {done.returncode}: {tail[-500:]}"}
    return json.loads(lines[-1])


def plot(curves: dict[str, list[float]], central_acc: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, values in curves.items():
        # Flower's curve lies on Kiln's seed-0 one (the same maths): drawn dashed over it.
        style = {"linestyle": "--", "marker": "x"} if label.startswith("Flower") else {}
        ax.plot(range(1, len(values) + 1), values, label=label, **{"marker": ".", **style})
    ax.axhline(central_acc, color="black", linestyle="--", label="central kiln train")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (digits, 360 rows)")
    ax.set_title("kiln federate: digits MLP, 10 clients")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    smoke = args.smoke_test
    rounds, flower_rounds = (2, 2) if smoke else (ROUNDS, FLOWER_ROUNDS)
    clients = 3 if smoke else CLIENTS
    seeds = SEEDS[:1] if smoke else SEEDS
    started = time.perf_counter()

    import ray

    from kiln.runtime import registry_for
    from kiln.settings import Settings

    home = Path(tempfile.mkdtemp(prefix="kiln-bench-fed-"))
    settings = Settings(kiln_home=home)
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, namespace="kiln")
    registry = registry_for(settings)

    dirichlet = {
        seed: federate(
            settings,
            registry,
            clients=clients,
            partition="dirichlet:0.5",
            rounds=rounds,
            local_epochs=LOCAL_EPOCHS,
            seed=seed,
        )
        for seed in seeds
    }
    central_acc = {seed: central(settings, registry, seed) for seed in seeds}
    shards = {
        strategy: federate(
            settings,
            registry,
            clients=clients,
            partition="shards:2",
            rounds=rounds,
            local_epochs=LOCAL_EPOCHS,
            strategy=strategy,
        )
        for strategy in ("fedavg", "fedprox:0.01")
    }
    ray.shutdown()
    flower = run_flower(flower_rounds, dirichlet[seeds[0]]["spec"], smoke)

    kiln = dirichlet[seeds[0]]
    model_bytes = 4 * kiln["parameters"]
    result: dict[str, Any] = {
        "benchmark": "federated",
        "smoke": smoke,
        "clients": clients,
        "rounds": rounds,
        "parameters": kiln["parameters"],
        "central_acc": {str(s): a for s, a in central_acc.items()},
        "fedavg_dirichlet_final_acc": {str(s): r["final"] for s, r in dirichlet.items()},
        "fedavg_gap_vs_central": mean([central_acc[s] - dirichlet[s]["final"] for s in seeds]),
        "kiln_final_acc": kiln["accuracy"][flower_rounds - 1],
        "kiln_round_s": mean(kiln["round_s"][:flower_rounds]),
        "flower_final_acc": flower.get("final_acc"),
        "flower_round_s": flower.get("round_s"),
        "kiln_round_s_median": statistics.median(kiln["round_s"][:flower_rounds]),
        "kiln_run_s": kiln["elapsed_s"],
        "flower_run_s": flower.get("elapsed_s"),
        "flower_round_s_median": flower.get("round_s_median"),
        "flower_version": flower.get("flwr_version"),
        "flower_reason": flower.get("error"),
        "fedavg_shards_final_acc": shards["fedavg"]["final"],
        "fedprox_shards_final_acc": shards["fedprox:0.01"]["final"],
        "fedprox_minus_fedavg": shards["fedprox:0.01"]["final"] - shards["fedavg"]["final"],
        "bytes_per_round": mean(kiln["bytes"]),
        "bytes_per_round_expected": model_bytes * mean(kiln["sampled"]) * 2,
        "elapsed_s": time.perf_counter() - started,
    }
    if flower.get("accuracy"):
        result["flower_minus_kiln_acc"] = result["flower_final_acc"] - result["kiln_final_acc"]
    curves = {f"FedAvg dirichlet:0.5 (seed {s})": r["accuracy"] for s, r in dirichlet.items()} | {
        "FedAvg shards:2": shards["fedavg"]["accuracy"],
        "FedProx(0.01) shards:2": shards["fedprox:0.01"]["accuracy"],
    }
    if flower.get("accuracy"):
        curves["Flower FedAvg dirichlet:0.5 (seed 0)"] = flower["accuracy"]
    out = Path(tempfile.mkdtemp()) if smoke else ROOT / "benchmarks" / "results"
    plot(curves, mean(list(central_acc.values())), out / "federated.png")
    result["png"] = str(out / "federated.png")
    result["curves"] = curves
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
