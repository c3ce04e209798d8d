"""The exact solver's cost: a ridge fit from the command line, and 5M x 32 rows in 4 shards.

1. `kiln train --data sklearn:diabetes --model ridge --json` as a user runs it (a fresh process,
   its own embedded Ray): wall time from the process start, and the CLI's own step timings.
2. `synthetic:regression?rows=5000000&features=32` loaded into 4 ShardStore actors: the time of
   the reduce of statistics plus the F x F solve, and R² on those rows against numpy's closed
   form (least squares with an intercept, float64) on the same rows.

Prints one JSON line last.

    python benchmarks/exact_solve.py [--rows 5000000] [--shards 4] [--smoke-test]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import ray  # noqa: E402

from kiln.actors.shards import load_dataset  # noqa: E402
from kiln.actors.sources import SourceSpec  # noqa: E402
from kiln.convex import fit_exact, path_moments, scaling_of  # noqa: E402
from kiln.pipeline import make_spec  # noqa: E402
from kiln.training.config import TrainConfig  # noqa: E402
from kiln.training.linear import r2_score, raw_weights  # noqa: E402


def cli_fit(home: str) -> dict:
    env = {**os.environ, "KILN_HOME": home}
    env.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "train", "--data", "sklearn:diabetes"]
        + ["--model", "ridge", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    wall_s = time.perf_counter() - started
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "wall_s": round(wall_s, 2),
        "r2": found["metrics"]["r2"],
        "imports_and_exit_s": round(wall_s - found["elapsed_s"], 2),
        "timings_s": found["timings_s"],
    }


def big_solve(rows: int, shards: int) -> dict:
    uri = f"synthetic:regression?rows={rows}&features=32&seed=0"
    source = SourceSpec(uri=uri, test_fraction=0.0)
    started = time.perf_counter()
    data = load_dataset(source, shards)
    load_s = time.perf_counter() - started
    try:
        cfg = TrainConfig(model="linear")
        spec = make_spec(cfg, data.train)
        started = time.perf_counter()
        fit = fit_exact(cfg, spec, [data.train])
        solve_s = time.perf_counter() - started
        moments = path_moments([data.train], spec)  # cached in the actors: a second reduce is free
        body = fit.model.body
        w = body.weight.detach().double().numpy()[0]
        a, c = raw_weights(w, float(body.bias.detach()[0]), scaling_of(spec))
        kiln_r2 = r2_score(moments, a, float(c))
        _, x, y = data.train.read_arrays()
    finally:
        data.release()
    started = time.perf_counter()
    design = np.hstack([x.astype(np.float64), np.ones((len(x), 1))])
    coef = np.linalg.lstsq(design, y.astype(np.float64), rcond=None)[0]
    numpy_s = time.perf_counter() - started
    residual = design @ coef - y
    numpy_r2 = 1.0 - float(residual @ residual) / float(((y - y.mean()) ** 2).sum())
    return {
        "rows": rows,
        "shards": shards,
        "load_s": round(load_s, 2),
        "solve_s": round(solve_s, 3),
        "numpy_closed_form_s": round(numpy_s, 2),
        "kiln_r2": kiln_r2,
        "numpy_r2": numpy_r2,
        "r2_abs_diff": abs(kiln_r2 - numpy_r2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="CLI fits to time")
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    if args.smoke_test:
        args.rows, args.repeats = 50_000, 1
    with tempfile.TemporaryDirectory() as home:
        fits = [cli_fit(home) for _ in range(args.repeats)]
    fits.sort(key=lambda f: f["wall_s"])
    walls = [f["wall_s"] for f in fits]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        big = big_solve(args.rows, args.shards)
    finally:
        ray.shutdown()
    print(
        json.dumps(
            {
                "cli_ridge_diabetes_wall_s": walls,
                "cli_ridge_diabetes_median_s": walls[len(walls) // 2],
                "cli_under_10_s": walls[len(walls) // 2] < 10.0,
                "cli_every_run_under_10_s": walls[-1] < 10.0,
                "cli_breakdown": fits[len(fits) // 2],  # the run of median wall time
                "big": big,
            }
        )
    )


if __name__ == "__main__":
    main()
