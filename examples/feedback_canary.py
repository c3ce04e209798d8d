"""Feedback -> retrain -> canary, from Python.

Shows: a model served on a (local) Ray cluster, traffic that has drifted from its training
data (digits shifted one pixel), the true labels sent back with `Kiln.feedback()`, `kiln
retrain` training the served version further on them and deploying the result as a 50%
canary, then `Kiln.metrics()` comparing the two versions on live traffic. About 13 minutes
on a busy 2-core machine (load avg 30-60).

    python examples/feedback_canary.py      # RAY_ADDRESS: your cluster; unset: a private one

`kiln retrain` deploys its canary into the running application, so the application must live
on a Ray cluster the commands can reach: with RAY_ADDRESS unset, the script starts a private
Ray head on this machine (`ray start --head`, loopback only) and stops it at the end. It
registers versions of `digits-live` in your KILN_HOME. The last line printed is a JSON summary.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager

import numpy as np
from sklearn.datasets import load_digits

from kiln import Kiln

NAME = "digits-live"
PORT = os.environ.get("KILN_HTTP_PORT", "8000")
URL = f"http://127.0.0.1:{PORT}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_cluster():
    """The environment for `kiln` commands on a cluster: RAY_ADDRESS's if set; else that of a
    private Ray head, with a token of its own, in its own process group, stopped at the end by
    signalling that group (`ray stop` would stop every Ray of this user on the machine)."""
    if os.environ.get("RAY_ADDRESS"):
        yield dict(os.environ)
        return
    temp_dir = tempfile.mkdtemp(prefix="kx", dir="/tmp")  # short: Ray's socket paths must fit
    token_path = os.path.join(temp_dir, "token")
    with open(token_path, "w") as f:
        f.write(secrets.token_hex(16))
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path}
    command = (
        f"ray start --head --block --port={port} --temp-dir={temp_dir} --num-cpus=4 "
        "--node-ip-address=127.0.0.1 --include-dashboard=false "
        # no default port that another Ray on this machine may hold
        f"--ray-client-server-port={free_port()} --metrics-export-port={free_port()} "
        f"--dashboard-agent-listen-port={free_port()} --dashboard-agent-grpc-port={free_port()}"
    )
    head = subprocess.Popen(
        command.split(), env=env, stdout=subprocess.DEVNULL, start_new_session=True
    )
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while subprocess.run(["ray", "status"], env=env, capture_output=True).returncode != 0:
            if head.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("ray start --head did not come up")
            time.sleep(2)
        yield env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def run_kiln(env: dict, command: str) -> str:
    """Run `kiln COMMAND` on the cluster as a shell would; its standard output."""
    done = subprocess.run(["kiln", *command.split()], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"kiln {command} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def kiln_json(env: dict, command: str) -> dict:
    """`kiln COMMAND --json` on the cluster: the one JSON line it prints last."""
    return json.loads(run_kiln(env, f"{command} --json").splitlines()[-1])


def shifted(images: np.ndarray) -> np.ndarray:
    """Digits moved one pixel to the right: the drift production brought."""
    moved = np.roll(images.reshape(-1, 8, 8), 1, axis=2)
    moved[:, :, 0] = 0
    return moved.reshape(-1, 64)


def live_traffic(kiln: Kiln, rows: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Predict every row (one request per 10, as users would), send the true labels back;
    accuracy per version that answered."""
    right: dict[int, list[bool]] = {}
    for start in range(0, len(rows), 10):
        answer = kiln.predict(NAME, rows[start : start + 10].tolist())
        kiln.feedback(NAME, answer, labels[start : start + 10].tolist())
        right.setdefault(answer.model_version, []).extend(
            p == y for p, y in zip(answer.predictions, labels[start : start + 10], strict=True)
        )
    return {v: round(float(np.mean(r)), 4) for v, r in sorted(right.items())}


digits = load_digits()
rows, labels = shifted(digits.data), digits.target
with ray_cluster() as cluster:
    # 1. Train and serve (on a cluster `kiln serve` returns once the application answers).
    trained = kiln_json(cluster, f"train --data sklearn:digits --model mlp --register {NAME}")
    print(f"{NAME}@{trained['version']}: test accuracy {trained['metrics']['accuracy']:.4f}")
    run_kiln(cluster, f"serve {NAME} --port {PORT}")
    with Kiln() as registry:  # the catalog under KILN_HOME: a key for this script
        secret = registry.create_key([f"predict:{NAME}", f"feedback:{NAME}"])["secret"]

    with Kiln(url=URL, key=secret) as kiln:
        # 2. Production traffic has drifted; each answer's true label comes back as feedback.
        before = live_traffic(kiln, rows[:600], labels[:600])
        print(f"live accuracy on shifted digits: {before}")

        # 3. Retrain the served version on that feedback; the result becomes a 50% canary.
        retrained = kiln_json(cluster, f"retrain {NAME} --since 1h --canary-weight 50")
        before_after = [retrained[k]["accuracy"] for k in ("heldout_before", "heldout_after")]
        print(f"retrained {NAME}@{retrained['version']}: held-out feedback accuracy {before_after}")

        # 4. Live traffic is now split; the metrics compare both versions on what they served.
        after = live_traffic(kiln, rows[600:1200], labels[600:1200])
        print(f"live accuracy per version with the canary: {after}")
        report = kiln.metrics(NAME, window="1h")
        for entry in report.versions:
            print(f"  version {entry.get('version')}: {json.dumps(entry)[:160]}")

result = {
    "model": NAME,
    "served": trained["version"],
    "canary": retrained["version"],
    "canary_weight": retrained["canary"]["weight"] if retrained["canary"] else None,
    "live_before": before,
    "live_after": after,
    "heldout_before": before_after[0],
    "heldout_after": before_after[1],
}
print(json.dumps(result))
