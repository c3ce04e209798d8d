"""`kiln export` and `kiln serve --backend`: refusals are one line and exit 2 before Ray starts;
the slow test runs the commands end to end in their own processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.actors.registry import RegistryService
from kiln.cli import main
from tests.actors.test_add_artifact import identity_onnx
from tests.conftest import TINY_SPEC, tiny_model_files


def run(args, home: Path, monkeypatch, capsys) -> tuple[int, list[str]]:
    monkeypatch.setenv("KILN_HOME", str(home))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        main(args)
        code = 0
    except SystemExit as exited:
        code = int(exited.code or 0)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture
def home(tmp_path) -> Path:
    """A catalog holding m@1 (plain), m@2 (exported: model.onnx), m@3 (an ONNX int8 variant of
    m@2) and m@4 (a torch int8 variant, as kiln compress --quantize int8 registers it)."""
    import torch

    from kiln.training.artifacts import model_to_files
    from kiln.training.compress import quantize_model
    from kiln.training.models import build_model

    service = RegistryService(str(tmp_path / "registry.db"), str(tmp_path / "storage"))
    service.register("m", tiny_model_files(), TINY_SPEC, {}, {})
    service.register("m", tiny_model_files(1), TINY_SPEC, {}, {})
    service.add_artifact("m", 2, "model.onnx", identity_onnx())
    variant = {**TINY_SPEC, "onnx_quantized": "int8"}
    files = {**tiny_model_files(1), "spec.json": json.dumps(variant).encode()}
    service.register("m", {**files, "model.onnx": identity_onnx("int8")}, variant, {}, {
        "parent": "m@2"})  # fmt: skip
    torch.manual_seed(0)
    model, spec = quantize_model(build_model(TINY_SPEC).eval(), TINY_SPEC)
    service.register("m", model_to_files(model, spec), spec, {}, {"parent": "m@1"})
    service.close()
    return tmp_path


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["export", "m@1", "--format", "tflite"], 'Got "tflite" for --format. Kiln exports onnx.'),
        (
            ["export", "m@1", "--quantize", "int4"],
            'Got "int4" for --quantize. Choose one of: int8.',
        ),
        (["export", "nosuch"], "no model named nosuch is registered"),
        (["export", "m@9"], "model m has no version 9"),
        (["export", "m@2"], "m@2 is already exported: its model.onnx has sha256 "),
        (["export", "m@3", "--quantize", "int8"], "m@3 is already an ONNX int8 export"),
        (["export", "m@4", "--quantize", "int8"], "m@4 is a torch int8 variant"),
        (["serve", "m@1", "--backend", "onnxruntime"], "run `kiln export m@1 --format onnx` first"),
        (["serve", "m@3", "--backend", "torch"], "m@3 is an ONNX int8 variant"),
        (["serve", "m@1", "--backend", "tensorrt"], 'Got "tensorrt" for backend'),
    ],
)
def test_refusals_are_one_line_before_ray_starts(home, args, fragment, monkeypatch, capsys):
    code, lines = run(args, home, monkeypatch, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("kiln: ") and fragment in lines[0], lines


def test_the_already_exported_refusal_names_the_stored_checksum(home, monkeypatch, capsys):
    service = RegistryService(str(home / "registry.db"), str(home / "storage"), recover=False)
    sha = service.resolve("m@2").artifacts["model.onnx"]
    service.close()
    _, lines = run(["export", "m@2"], home, monkeypatch, capsys)
    assert f"sha256 {sha}" in lines[0] and "kiln serve m@2 --backend onnxruntime" in lines[0]


def kiln(home: Path, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    env = {"KILN_HOME": str(home), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
    )


def last_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_kiln_export_end_to_end(tmp_path):
    """train -> export (fp32) -> export --quantize int8 -> the refusals, each its own process
    on its own embedded Ray, as a user runs them."""
    trained = last_json(
        kiln(
            tmp_path,
            "train",
            "--data",
            "sklearn:digits",
            "--model",
            "mlp",
            "--epochs",
            "6",
            "--register",
            "digits",
            "--json",
        )  # fmt: skip
    )
    ref = f"digits@{trained['version']}"
    fp32 = last_json(kiln(tmp_path, "export", ref, "--format", "onnx", "--json"))
    assert fp32["ref"] == ref and fp32["quantize"] is None and fp32["file"] == "model.onnx"
    assert fp32["check"]["max_abs_diff"] <= 1e-4 and fp32["check"]["rows"] == 360
    int8 = last_json(kiln(tmp_path, "export", ref, "--quantize", "int8", "--json"))
    assert int8["exported"] == ref and int8["version"] == trained["version"] + 1
    assert int8["check"]["agreement"] >= 0.995
    assert abs(int8["metrics"]["accuracy"] - trained["metrics"]["accuracy"]) <= 0.02
    shown = last_json(kiln(tmp_path, "models", "show", int8["ref"], "--json"))
    assert shown["lineage"]["parent"] == ref and shown["spec"]["onnx_quantized"] == "int8"
    assert shown["artifacts"]["model.onnx"] == int8["sha256"]
    again = kiln(tmp_path, "export", ref)
    assert again.returncode == 2 and f"{ref} is already exported" in again.stderr
    assert again.stderr.strip().count("\n") == 0 and "Traceback" not in again.stderr
