"""`kiln train` with no tuning flag on every built-in dataset, against scikit-learn on the split.

For each dataset and model, runs `kiln train --data sklearn:NAME --model M --json` exactly as a
user would (a subprocess, its own embedded Ray, every default), then fits scikit-learn on the
same rows (Kiln's split: test 20%, stratified for classifiers, seed 0; scikit-learn gets the
train + validation rows, standardised) and scores both on the same test rows:
`MLPClassifier()`/`MLPRegressor()` for mlp and cnn, `LogisticRegression()`/`Ridge()` for the
convex models. Prints a Markdown table, then one JSON line.

    python benchmarks/defaults_quality.py [--smoke-test] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kiln.actors.sources import SourceSpec, read_shard  # noqa: E402
from kiln.training.data import batches_to_arrays  # noqa: E402

CASES = [
    ("digits", "mlp"),
    ("digits", "cnn"),
    ("digits", "logistic"),
    ("breast_cancer", "mlp"),
    ("breast_cancer", "logistic"),
    ("iris", "mlp"),
    ("iris", "logistic"),
    ("wine", "mlp"),
    ("wine", "logistic"),
    ("diabetes", "mlp"),
    ("diabetes", "ridge"),
]


def kiln_train(dataset: str, model: str, seed: int, home: Path) -> dict:
    env = {**os.environ, "KILN_HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    args = ["train", "--data", f"sklearn:{dataset}", "--model", model, "--json"]
    if seed:
        args += ["--seed", str(seed)]
    done = subprocess.run(
        [sys.executable, "-m", "kiln.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"kiln train failed: {done.stderr[-2000:]}")
    warnings = [line for line in done.stderr.splitlines() if "warning:" in line]
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "warnings": warnings}


def split_arrays(dataset: str, seed: int) -> tuple[np.ndarray, ...]:
    """Kiln's own split of the built-in set (the CLI's defaults): train + val, and test."""
    source = SourceSpec(uri=f"sklearn:{dataset}", test_fraction=0.2, val_fraction=0.1, seed=seed)
    fit = [b for split in ("train", "val") for b in read_shard(source, split, 0, 1)]
    _, x_fit, y_fit = batches_to_arrays(fit)
    _, x_test, y_test = batches_to_arrays(read_shard(source, "test", 0, 1))
    return x_fit, y_fit, x_test, y_test


def sklearn_score(dataset: str, model: str, seed: int) -> float:
    x_fit, y_fit, x_test, y_test = split_arrays(dataset, seed)
    scaler = StandardScaler().fit(x_fit)
    regression = dataset == "diabetes"
    if model in ("mlp", "cnn"):
        estimator = (
            MLPRegressor(random_state=seed) if regression else MLPClassifier(random_state=seed)
        )
    else:
        estimator = Ridge() if regression else LogisticRegression(max_iter=10_000)
    estimator.fit(scaler.transform(x_fit), y_fit)
    return float(estimator.score(scaler.transform(x_test), y_test))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--smoke-test", action="store_true", help="two cases, one seed")
    args = parser.parse_args()
    cases = CASES[:1] + CASES[-1:] if args.smoke_test else CASES
    seeds = args.seeds[:1] if args.smoke_test else args.seeds
    rows = []
    with tempfile.TemporaryDirectory() as home:
        for dataset, model in cases:
            for seed in seeds:
                started = time.perf_counter()
                found = kiln_train(dataset, model, seed, Path(home))
                metric = "r2" if dataset == "diabetes" else "accuracy"
                row = {
                    "dataset": dataset,
                    "model": model,
                    "seed": seed,
                    "metric": metric,
                    "kiln": round(found["metrics"][metric], 4),
                    "sklearn": round(sklearn_score(dataset, model, seed), 4),
                    "solver": found["solver"],
                    "converged": found["converged"],
                    "epochs_run": found["epochs_run"],
                    "wall_s": round(time.perf_counter() - started, 1),
                    "warnings": found["warnings"],
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(
        "| dataset | model | seed | metric | Kiln (defaults) | scikit-learn | solver | converged |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dataset']} | {r['model']} | {r['seed']} | {r['metric']} | {r['kiln']} | "
            f"{r['sklearn']} | {r['solver']} | {r['converged']} |"
        )
    gaps = [r["kiln"] - r["sklearn"] for r in rows]
    print(json.dumps({"cases": rows, "worst_gap": min(gaps), "mean_gap": float(np.mean(gaps))}))


if __name__ == "__main__":
    main()
