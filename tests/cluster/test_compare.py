"""`kiln models compare`, `kiln models profile` and `kiln serve --slo-p99-ms`.

Most tests run the CLI in-process on an embedded home whose catalog holds real versions
(safetensors + spec.json, an int8 variant made by training/compress.py) and profiles written
with `record_profile` with known numbers: no Ray. Two tests use the session's Ray: a
registration gets a profile, and `kiln models profile` measures a new one.
"""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from kiln.actors.registry import RegistryService, version_dir
from kiln.cli import main
from tests.conftest import TINY_SPEC, tiny_model_files

STUDENT_SPEC = {**TINY_SPEC, "hidden": [4]}
TINY_PARAMETERS = (4 * 8 + 8) + (8 * 3 + 3)  # 4 inputs -> 8 -> 3 classes
STUDENT_PARAMETERS = (4 * 4 + 4) + (4 * 3 + 3)


def profile(b1: float, b64: float) -> dict:
    return {
        "b1_p50_ms": b1,
        "b1_p99_ms": b1 * 1.5,
        "b64_p50_ms": b64,
        "b64_p99_ms": b64 * 1.5,
        "rows_per_s_b64": 64_000 / b64,
        "threads": 1,
        "cpu_model": "test CPU",
        "backend": "torch",
        "measured_at": 1000.0,
    }


def model_files(spec: dict, seed: int) -> dict[str, bytes]:
    import torch

    from kiln.training.artifacts import model_to_files
    from kiln.training.models import build_model

    torch.manual_seed(seed)
    return model_to_files(build_model(spec), spec)


def int8_files() -> tuple[dict[str, bytes], dict]:
    from kiln.training.artifacts import model_from_files, model_to_files
    from kiln.training.compress import quantize_model

    model, spec = model_from_files(tiny_model_files(0))
    quantized, quantized_spec = quantize_model(model, spec)
    return model_to_files(quantized, quantized_spec), quantized_spec


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> str:
    """m@1 fp32 (0.97), m@2 its int8 variant (0.968), m@3 a distilled student (0.91), m@4 not
    profiled (0.95), m@5 archived; profiles with the wide MLP's shape of trade-off. n@1 has
    no profile."""
    home = tmp_path_factory.mktemp("compare") / "home"
    service = RegistryService(str(home / "registry.db"), str(home / "storage"))
    files, spec = int8_files()
    versions = [
        (tiny_model_files(0), TINY_SPEC, 0.97, {}, profile(1.9, 25.0)),
        (files, spec, 0.968, {"parent": "m@1", "compression": [{"method": "dynamic-int8"}]},
         profile(0.68, 19.0)),
        (model_files(STUDENT_SPEC, 1), STUDENT_SPEC, 0.91,
         {"parent": "m@1", "compression": [{"method": "distill", "student": "mlp:4"}]},
         profile(0.2, 2.0)),
        (tiny_model_files(2), TINY_SPEC, 0.95, {}, None),
        (tiny_model_files(3), TINY_SPEC, 0.99, {}, profile(0.1, 1.0)),
    ]  # fmt: skip
    for files, spec, accuracy, lineage, measured in versions:
        record = service.register("m", files, spec, {"accuracy": accuracy}, lineage)
        if measured is not None:
            service.record_profile("m", record.version, "torch", measured)
    service.archive_version("m", 5)
    service.register("n", tiny_model_files(4), TINY_SPEC, {"accuracy": 0.5}, {})  # no profile
    service.close()
    return str(home)


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Tables as wide as their rows (no wrapped cells to search), and no cluster address."""
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture
def no_ray(monkeypatch):
    """A tripwire: these commands must answer from the catalog alone."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr("kiln.runtime.init_ray", refuse)
    monkeypatch.setattr("kiln.runtime.ray_session", refuse)


def kiln(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def audit_entries(home: str, action: str) -> list[dict]:
    service = RegistryService(str(Path(home) / "registry.db"), str(Path(home) / "storage"))
    try:
        return service.audit(limit=100, action=action)
    finally:
        service.close()


# ----------------------------------------------------------------------------- compare


def test_compare_lists_every_active_version_side_by_side(capsys, home, no_ray):
    code, out, err = kiln(capsys, "models", "compare", "m", "--json", "--home", home)
    assert code == 0, err
    rows = {r["ref"]: r for r in json.loads(out.strip().splitlines()[-1])}
    assert list(rows) == ["m@1", "m@2", "m@3", "m@4"]  # m@5 is archived

    # Parameters, not bytes: the int8 variant has its parent's, the student fewer.
    assert [rows[r]["parameters"] for r in rows] == [
        TINY_PARAMETERS,
        TINY_PARAMETERS,
        STUDENT_PARAMETERS,
        TINY_PARAMETERS,
    ]
    for ref, row in rows.items():
        folder = Path(home) / "storage" / version_dir("m", row["version"])
        assert row["artifact_bytes"] == sum(f.stat().st_size for f in folder.iterdir()), ref
    assert rows["m@2"]["artifact_bytes"] != rows["m@1"]["artifact_bytes"]

    assert [rows[r]["score"] for r in rows] == [0.97, 0.968, 0.91, 0.95]
    assert rows["m@2"]["profiles"]["torch"]["b64_p50_ms"] == 19.0
    assert (rows["m@2"]["parent"], rows["m@2"]["compression"]) == ("m@1", "dynamic-int8")
    assert rows["m@3"]["compression"] == "distill"
    # Each of the three profiled versions is best at something; m@4 has no latency to compare.
    assert [rows[r]["pareto"] for r in rows] == [True, True, True, None]


def test_compare_table_says_which_versions_are_not_profiled_and_how(capsys, home, no_ray):
    code, out, err = kiln(capsys, "models", "compare", "m", "--home", home)
    assert code == 0, err
    assert "not profiled" in out and "1.900/2.850" in out and "dynamic-int8" in out
    assert "m@4 is not profiled: kiln models profile m@4" in err


def test_compare_plots_accuracy_against_latency_with_the_front(capsys, home, tmp_path, no_ray):
    import matplotlib.image

    path = tmp_path / "front.png"
    code, _, err = kiln(capsys, "models", "compare", "m", "--plot", str(path), "--home", home)
    assert code == 0, err
    image = matplotlib.image.imread(str(path))
    assert image.shape[:2] == (500, 700)
    rgb = image[..., :3].reshape(-1, 3)
    assert len(np.unique(rgb.round(2), axis=0)) > 20  # not a blank canvas
    front_red = np.array([0.839, 0.153, 0.157])  # tab:red, the front and its points
    assert (np.abs(rgb - front_red).max(axis=1) < 0.02).sum() > 50


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["models", "compare", "m", "--plot", "front.jpg"], 'Got "front.jpg" for --plot'),
        (["models", "compare", "nosuch"], "no model named nosuch is registered"),
        (
            ["models", "compare", "n", "--plot", "front.png"],
            "no plot for n: no active version has both a test score and a latency profile",
        ),
    ],
)
def test_compare_errors_are_one_line(capsys, home, tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    code, _, err = kiln(capsys, *args, "--home", home)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert fragment in lines[0]


def test_an_embedded_client_profiles_in_process_and_records_it(tmp_path, no_ray):
    from kiln.client import Kiln
    from kiln.settings import Settings

    settings = Settings(kiln_home=tmp_path / "home")
    with Kiln(settings=settings, use_ray=False) as client:
        client.register("p", tiny_model_files(), TINY_SPEC, {"accuracy": 0.5}, {})
        found = client.profile("p@1")
        assert (found["ref"], found["backend"], found["profile"]["threads"]) == ("p@1", "torch", 1)
        assert [r["profile"] for r in client.profiles("p")] == [found["profile"]]
        row = client.compare("p")[0]
        assert row["profiles"]["torch"]["b1_p50_ms"] == found["profile"]["b1_p50_ms"]


# ----------------------------------------------------------------------------- SLO choice


def slo(*extra: str) -> list[str]:
    return ["serve", "m", "--slo-p99-ms", "20", "--min-accuracy", "0.95", *extra]


def test_slo_dry_run_picks_the_cheapest_version_that_fits(capsys, home, no_ray):
    code, out, err = kiln(capsys, *slo("--target-rps", "200", "--dry-run", "--home", home))
    assert code == 0, err
    assert "chose m@2 (torch) on 1 replica(s)" in err and "dry run: nothing deployed" in err
    assert "accuracy 0.91 < 0.95" in out  # the student, rejected with its reason
    assert "not profiled: kiln models profile m@4" in out
    decision = audit_entries(home, "slo-choice")[-1]
    assert decision["target"] == "m"
    assert (decision["detail"]["chosen"], decision["detail"]["dry_run"]) == ("m@2", True)
    assert {c["ref"] for c in decision["detail"]["candidates"]} == {"m@1", "m@2", "m@3"}


def test_slo_refuses_when_nothing_is_accurate_enough(capsys, home, no_ray):
    args = ["serve", "m", "--slo-p99-ms", "20", "--min-accuracy", "0.98", "--dry-run"]
    code, out, err = kiln(capsys, *args, "--home", home)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines == [
        "kiln: no version of m reaches accuracy 0.98 (--min-accuracy); closest: m@1 with 0.97"
    ]
    assert "accuracy 0.968 < 0.98" in out  # the table of candidates still shows why
    assert audit_entries(home, "slo-choice")[-1]["detail"]["chosen"] is None


def test_slo_refuses_a_latency_budget_nothing_meets(capsys, home, no_ray):
    args = ["serve", "m", "--slo-p99-ms", "5", "--min-accuracy", "0.95", "--target-rps", "200"]
    code, _, err = kiln(capsys, *args, "--dry-run", "--home", home)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert "meets --slo-p99-ms 5 at 200 rps; closest: m@2 (torch), p99 " in lines[0]


def test_slo_sets_the_replicas_and_backend_of_the_deployment(capsys, home, tmp_path, no_ray):
    """--emit-config writes what would be deployed: the chosen version, replicas, backend."""
    path = tmp_path / "serve.yaml"
    args = slo("--target-rps", "1000", "--emit-config", str(path), "--home", home)
    code, _, err = kiln(capsys, *args)
    assert code == 0, err
    app_args = yaml.safe_load(path.read_text())["applications"][0]["args"]
    # m@2 at 1,000 rps: 1.49 ms of HTTP and 0.3 ms of forward a request; 0.7 busy at most.
    assert (app_args["models"], app_args["num_replicas"]) == (["m@2"], 3)
    assert app_args.get("backend", "torch") == "torch"


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["serve", "m@2", "--slo-p99-ms", "20", "--min-accuracy", "0.9"], 'Got "m@2" with'),
        (["serve", "m", "n", "--slo-p99-ms", "20", "--min-accuracy", "0.9"], 'Got "m n" with'),
        (["serve", "m", "--target-rps", "10"], "--target-rps, --dry-run work only with both"),
        (["serve", "m", "--slo-p99-ms", "20"], "only with both --slo-p99-ms and --min-accuracy"),
        (slo("--max-replicas", "4"), "leave --min-replicas and --max-replicas unset"),
        (slo("--num-replicas", "4"), "chooses --num-replicas itself"),
        (slo("--target-rps", "0"), 'Got "0.0" for --target-rps'),
        (["serve", "m", "--slo-p99-ms", "-1", "--min-accuracy", "0.9"], "for --slo-p99-ms"),
        (["serve", "nosuch", "--slo-p99-ms", "9", "--min-accuracy", "0.9"], "no model named"),
    ],
)
def test_slo_mistakes_are_one_line(capsys, home, no_ray, args, fragment):
    code, _, err = kiln(capsys, *args, "--dry-run", "--home", home)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert fragment in lines[0]


# ----------------------------------------------------------------------------- with Ray


def test_a_registration_gets_a_profile_and_a_failed_one_keeps_the_version(
    ray_local, settings_session, registry_session, trained_digits, caplog
):
    import ray

    from kiln.profiling import profile_at_registration

    record = trained_digits.record
    rows = ray.get(registry_session.profiles.remote(record.name, record.version))
    assert [r["backend"] for r in rows] == ["torch"]
    measured = rows[0]["profile"]
    assert measured["threads"] == 1 and measured["passes_b1"] >= 1
    assert 0 < measured["b1_p50_ms"] <= measured["b1_p99_ms"]

    # A version whose weights cannot be read is still registered, with a warning that says
    # how to profile it later.
    broken = ray.get(
        registry_session.register.remote("unprofiled", tiny_model_files(), TINY_SPEC, {}, {})
    )
    weights = Path(settings_session.storage_uri) / version_dir("unprofiled", broken.version)
    (weights / "model.safetensors").write_bytes(b"not the registered bytes")
    with caplog.at_level(logging.WARNING, logger="kiln.profiling"):
        assert profile_at_registration(registry_session, broken) is None
    assert f"measure it with kiln models profile {broken.ref}" in caplog.text
    assert ray.get(registry_session.resolve.remote(broken.ref)).version == broken.version
    assert ray.get(registry_session.profiles.remote("unprofiled")) == []


def test_kiln_models_profile_measures_and_records_a_new_profile(
    capsys, ray_local, settings_session, registry_session, trained_digits
):
    import ray

    record = trained_digits.record
    before = ray.get(registry_session.profiles.remote(record.name, record.version))[0]
    code, out, err = kiln(
        capsys,
        "models",
        "profile",
        record.ref,
        "--json",
        "--home",
        str(settings_session.kiln_home),
    )
    assert code == 0, err
    found = json.loads(out.strip().splitlines()[-1])
    assert (found["ref"], found["backend"]) == (record.ref, "torch")
    rows = ray.get(registry_session.profiles.remote(record.name, record.version))
    assert len(rows) == 1  # the torch row, replaced
    assert rows[0]["profile"] == found["profile"]
    assert rows[0]["measured_at"] > before["measured_at"]
