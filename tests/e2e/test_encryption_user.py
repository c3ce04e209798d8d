"""Encryption at rest and the robustness report as a user meets them: `kiln train`,
`kiln evaluate --attack` and `kiln serve` as subprocesses with KILN_ENCRYPT=1 and a master
key file; predictions right; no weight or logged input in clear anywhere under KILN_HOME (a
byte search); the console's version page and `kiln models compare` show the attack; without
its master key the store refuses to start in one line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors.torch import load as load_safetensors
from sklearn.datasets import load_digits

from kiln.actors.storage import ArtifactStore
from kiln.training import encryption as enc
from tests.conftest import free_port
from tests.e2e.kiln_process import KilnServe, kiln, kiln_env, kiln_json


def every_byte(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def parquet_files(storage: Path) -> list[Path]:
    return sorted((storage / "monitoring" / "dgm").rglob("*.parquet"))


@pytest.fixture(scope="module")
def encrypted_home(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("e2e-encrypted")
    key_file = home.parent / f"{home.name}-master.key"
    assert kiln(kiln_env(home, free_port()), "keys", "new-master", str(key_file)).returncode == 0
    env = kiln_env(
        home,
        free_port(),
        KILN_ENCRYPT="1",
        KILN_MASTER_KEY=str(key_file),
        # On a machine at load average 30-40, Ray's node start passed its 60 s default.
        RAY_raylet_start_wait_time_s="300",
    )
    # Generous limits: Ray's own start took 111 s of a 295 s train at load average 38.
    trained = kiln_json(
        env,
        "train",
        "--data",
        "sklearn:digits",
        "--model",
        "mlp",
        "--register",
        "dgm",
        timeout_s=900,
    )
    made = kiln_json(env, "keys", "create", "--scope", "predict:*")
    return {
        "home": home,
        "key_file": key_file,
        "env": env,
        "trained": trained,
        "secret": made["secret"],
    }


@pytest.mark.slow
@pytest.mark.timeout(2400)  # train, evaluate and serve each start a Ray: 10 min at load 30
def test_encrypted_train_evaluate_serve(encrypted_home, tmp_path, monkeypatch):
    home, env = encrypted_home["home"], encrypted_home["env"]
    storage = home / "storage"
    monkeypatch.setenv(enc.MASTER_KEY_ENV, str(encrypted_home["key_file"]))
    store = ArtifactStore(str(storage))
    assert store.encrypted
    weights = load_safetensors(store.read("models/dgm/v1/model.safetensors"))
    needle = next(t for t in weights.values() if t.numel() >= 8).flatten()[:4].numpy().tobytes()
    assert list(storage.glob("runs/**/*.safetensors")), "Ray Train left no checkpoint"

    # The robustness report, stored with the version.
    report = kiln_json(env, "evaluate", "dgm", "--attack", "fgsm", "--epsilon", "2", timeout_s=900)
    assert report["clean_accuracy"] == pytest.approx(
        encrypted_home["trained"]["metrics"]["accuracy"]
    )
    assert report["attacked_accuracy"] < report["clean_accuracy"]
    bad = kiln(env, "evaluate", "dgm", "--attack", "cw", "--epsilon", "2")
    assert bad.returncode == 2 and "--attack" in bad.stderr and "Traceback" not in bad.stderr
    negative = kiln(env, "evaluate", "dgm", "--attack", "pgd", "--epsilon=-1")
    assert negative.returncode == 2 and "--epsilon" in negative.stderr
    compared = kiln_json(env, "models", "compare", "dgm")
    assert compared[0]["robustness"][0]["attacked_accuracy"] == report["attacked_accuracy"]

    serve_env = {**env, "KILN_HTTP_PORT": str(free_port())}
    server = KilnServe(serve_env, ["dgm"], tmp_path / "serve.log").start(timeout_s=600)
    auth = {"Authorization": f"Bearer {encrypted_home['secret']}"}
    digits = load_digits()
    logged = (np.random.default_rng(5).random(64) * 16).astype(np.float32)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            answer = client.post(
                "/v1/models/dgm:predict",
                json={"instances": digits.data[-200:].tolist()},
                headers=auth,
            )
            assert answer.status_code == 200, answer.text
            right = np.mean(np.array(answer.json()["predictions"]) == digits.target[-200:])
            assert right >= 0.9
            sent = client.post(
                "/v1/models/dgm:predict", json={"instances": [logged.tolist()]}, headers=auth
            )
            assert sent.status_code == 200, sent.text
            page = client.get("/ui/fragments/models/dgm/versions/1", headers=auth)
            assert page.status_code == 200, f"{page.text[:300]}\n{server.log()[-4000:]}"
            assert 'id="robustness"' in page.text
            assert "fgsm" in page.text
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(
                logged[:4].tobytes() in store.read(str(p.relative_to(storage)))
                for p in parquet_files(storage)
            ):
                time.sleep(0.5)
        assert server.interrupt() == 0
    finally:
        server.kill()
    plain_logs = [store.read(str(p.relative_to(storage))) for p in parquet_files(storage)]
    assert any(logged[:4].tobytes() in data for data in plain_logs), "the row was not logged"

    on_disk = every_byte(home)
    assert needle not in on_disk
    assert logged[:4].tobytes() not in on_disk

    without_key = {
        k: v for k, v in serve_env.items() if k not in ("KILN_MASTER_KEY", "KILN_ENCRYPT")
    }
    refused = kiln(without_key, "serve", "dgm")
    assert refused.returncode == 2
    assert "holds encrypted files" in refused.stderr and "KILN_MASTER_KEY" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
