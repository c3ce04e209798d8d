"""Shared fixtures: one local Ray for the whole session, temp Kiln homes, a trained model.

Unit tests of pure logic do not touch these; integration tests share `ray_local`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kiln.runtime import free_port  # noqa: F401 (tests import it from here)

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.05")  # as Kiln sets it
# No gRPC port unless a test asks for one: every deploy would open 9000, Serve's default.
os.environ.setdefault("KILN_GRPC_PORT", "0")


def wait_for(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> bool:
    """Poll `condition` until it holds or the deadline passes; returns whether it held."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return condition()


TINY_SPEC = {
    "kind": "mlp",
    "task": "classification",
    "num_features": 4,
    "classes": [0, 1, 2],
    "hidden": [8],
}


def tiny_model_files(seed: int = 0) -> dict[str, bytes]:
    """A small MLP as its real artifacts (safetensors + spec.json), distinct per seed."""
    import torch

    from kiln.training.artifacts import model_to_files
    from kiln.training.models import build_model

    torch.manual_seed(seed)
    return model_to_files(build_model(TINY_SPEC), TINY_SPEC)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    import ray

    from kiln.runtime import serve_env

    # Serve in the tests runs as `kiln` runs it on the embedded Ray (HAProxy ingress); only
    # this Ray's processes see the setting, not the multi-node tests' own clusters.
    env = serve_env()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: os.environ.get(k) or v for k, v in env.items()})
    try:
        ray.init(
            address="local",
            num_cpus=6,
            include_dashboard=False,
            namespace="kiln",
            log_to_driver=False,
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    yield
    from kiln.runtime import shutdown_ray

    shutdown_ray()


@pytest.fixture(scope="session")
def settings_session(tmp_path_factory: pytest.TempPathFactory):
    from kiln.settings import Settings

    home = tmp_path_factory.mktemp("kiln-home")
    return Settings(kiln_home=home, kiln_http_port=free_port())


@pytest.fixture(scope="session")
def registry_session(ray_local, settings_session):
    from kiln.runtime import registry_for

    return registry_for(settings_session)


@pytest.fixture(scope="session")
def trained_digits(ray_local, settings_session, registry_session):
    """An MLP trained on digits by 2 Ray Train workers and registered (shared by many tests)."""
    from kiln.actors.sources import SourceSpec
    from kiln.pipeline import train_and_register
    from kiln.requests import TrainRequest
    from kiln.training.config import TrainConfig

    cfg = TrainConfig(model="mlp", workers=2, epochs=8, batch_size=32, lr=2e-3)
    request = TrainRequest(
        data="sklearn:digits", source=SourceSpec(uri="sklearn:digits"), train=cfg, name="digits-mlp"
    )
    return train_and_register(settings_session, request, registry_session)


@pytest.fixture
def tmp_home(tmp_path: Path):
    from kiln.settings import Settings

    return Settings(kiln_home=tmp_path / "home")
