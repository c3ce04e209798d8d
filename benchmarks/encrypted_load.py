"""Load time of a registered version, encrypted at rest against clear: the 135M-parameter LM
(a random-init Llama of SmolLM-135M's shape, as benchmarks/engine_step.py builds it) and the
digits MLP (kiln train's default shape for sklearn:digits).

"Load" is what a replica does at start: read every artifact of the version from storage,
check it against the catalog (sha256 of the bytes on storage, then of the plaintext), open it
(AES-256-GCM with its data key, unwrapped by the local master key) and build the model
(`model_from_files`). Both stores are local folders on one disk; clear and encrypted loads
are interleaved, `--reps` of each, so the machine's load hits both alike; the medians and
their ratio are reported, with the load average and the CPU's AES flag. Prints one JSON line.

    python benchmarks/encrypted_load.py [--reps 7] [--smoke-test]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.engine_step import smollm_spec  # noqa: E402
from kiln.actors.registry import RegistryService, read_verified_files  # noqa: E402
from kiln.training import encryption as enc  # noqa: E402
from kiln.training.artifacts import model_from_files, model_to_files  # noqa: E402
from kiln.training.lm import build_lm, lm_spec  # noqa: E402
from kiln.training.models import build_model  # noqa: E402

DIGITS_SPEC = {
    "kind": "mlp",
    "task": "classification",
    "num_features": 64,
    "classes": list(range(10)),
    "hidden": [128, 64],
}


def model_files(which: str, smoke: bool) -> tuple[dict[str, bytes], dict[str, Any]]:
    torch.manual_seed(0)
    if which == "digits_mlp":
        return model_to_files(build_model(DIGITS_SPEC), DIGITS_SPEC), DIGITS_SPEC
    spec = lm_spec("small") if smoke else smollm_spec()
    return model_to_files(build_lm(spec), spec), spec


def load_once(storage: str, record: Any) -> tuple[float, float]:
    """(seconds to read, check and open the files; seconds to build the model from them)."""
    started = time.perf_counter()
    files = read_verified_files(storage, record)
    read_s = time.perf_counter() - started
    model, _ = model_from_files(files)
    build_s = time.perf_counter() - started - read_s
    del model, files
    return read_s, build_s


def measure(which: str, reps: int, smoke: bool, folder: Path) -> dict[str, Any]:
    files, spec = model_files(which, smoke)
    records = {}
    for mode in ("clear", "encrypted"):
        os.environ[enc.ENCRYPT_ENV] = "1" if mode == "encrypted" else "0"
        service = RegistryService(
            str(folder / f"{which}-{mode}.db"), str(folder / f"{which}-{mode}")
        )
        records[mode] = service.register(which.replace("_", "-"), files, spec, {}, {})
        service.close()
    os.environ[enc.ENCRYPT_ENV] = "0"
    times: dict[str, list[float]] = {"clear": [], "encrypted": []}
    reads: dict[str, list[float]] = {"clear": [], "encrypted": []}
    for _ in range(reps):  # interleaved: A, B, A, B, ...
        for mode in ("clear", "encrypted"):
            read_s, build_s = load_once(str(folder / f"{which}-{mode}"), records[mode])
            reads[mode].append(read_s)
            times[mode].append(read_s + build_s)
    clear, sealed = statistics.median(times["clear"]), statistics.median(times["encrypted"])
    return {
        "bytes": sum(len(d) for d in files.values()),
        "parameters": sum(t.numel() for t in model_from_files(files)[0].state_dict().values()),
        "clear_load_s": round(clear, 4),
        "encrypted_load_s": round(sealed, 4),
        "ratio": round(sealed / clear, 3),
        # Reading, checking and opening the files alone: where encryption adds its work.
        "clear_read_s": round(statistics.median(reads["clear"]), 4),
        "encrypted_read_s": round(statistics.median(reads["encrypted"]), 4),
        "clear_all_s": [round(t, 4) for t in times["clear"]],
        "encrypted_all_s": [round(t, 4) for t in times["encrypted"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ[enc.MASTER_KEY_ENV] = os.urandom(32).hex()
    results: dict[str, Any] = {"load_avg_before": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="kiln-enc-bench-") as tmp:
        for which in ("digits_mlp", "lm_135m"):
            results[which] = measure(
                which, 3 if args.smoke_test else args.reps, args.smoke_test, Path(tmp)
            )
            print(which, json.dumps(results[which]), file=sys.stderr, flush=True)
    results["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    results["cpu_aes"] = " aes " in flags
    results["smoke_test"] = args.smoke_test
    print(json.dumps(results))


if __name__ == "__main__":
    main()
