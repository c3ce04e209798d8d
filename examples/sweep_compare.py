"""A sweep, then compare the versions it left.

Shows: a quick baseline (`kiln train`, logistic regression by L-BFGS), a Ray Tune sweep of an
MLP over learning rate and λ with ASHA stopping the weak trials early (`kiln tune`), then
`Kiln().compare()` from Python: every version's test accuracy, parameters, bytes on disk and
measured latency side by side. About 2.5 minutes on a busy 2-core machine (load avg ~40).

    python examples/sweep_compare.py        # KILN_HOME as for `kiln`

It registers versions of `digits-example` in your KILN_HOME. The last line it prints is a JSON
summary.
"""

import json
import subprocess

from kiln import Kiln

NAME = "digits-example"


def kiln_json(command: str) -> dict:
    """Run `kiln COMMAND --json` as a shell would; the one JSON line it prints last."""
    args = ["kiln", *command.split(), "--json"]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"kiln {command} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


# 1. A baseline: logistic regression on scikit-learn's digits (8x8 images, 10 classes).
baseline = kiln_json(f"train --data sklearn:digits --model logistic --register {NAME}")
print(f"baseline {NAME}@{baseline['version']}: accuracy {baseline['metrics']['accuracy']:.4f}")

# 2. A sweep: 6 MLP trials over lr and λ, ASHA stops the weak ones; the best is registered.
sweep = kiln_json(
    f"tune --data sklearn:digits --model mlp --trials 6 --epochs 12 --register {NAME}"
)
print(f"sweep: {sweep['num_trials']} trials, best {NAME}@{sweep['version']} {sweep['best_config']}")

# 3. Compare every version from Python (the registry on this machine: no Ray, no server).
with Kiln() as kiln:
    rows = kiln.compare(NAME)
print(f"{'version':<20}{'accuracy':>10}{'parameters':>12}{'bytes':>10}{'p50 ms':>8}  pareto")
for row in rows:
    p50 = f"{row['b1_p50_ms']:.3f}" if row["b1_p50_ms"] is not None else "-"
    print(
        f"{row['ref']:<20}{row['score']:>10.4f}{row['parameters']:>12,}"
        f"{row['artifact_bytes']:>10,}{p50:>8}  {row['pareto']}"
    )
best = max(rows, key=lambda r: r["score"])
result = {
    "model": NAME,
    "versions": [r["version"] for r in rows],
    "accuracy": {r["version"]: r["score"] for r in rows},
    "best": best["ref"],
    "num_trials": sweep["num_trials"],
}
print(json.dumps(result))
