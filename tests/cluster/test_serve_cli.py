"""`kiln serve --emit-config` and the serving commands' bad input; no Ray needed."""

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from kiln.cli import main


def run(args, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        main(args)
    except SystemExit as exited:
        return exited.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


def test_emitted_config_is_a_valid_serve_deploy_config(tmp_path, monkeypatch, capsys):
    path = tmp_path / "serve.yaml"
    code, _ = run(
        [
            "serve",
            "digits-mlp@production",
            "--min-replicas",
            "0",
            "--max-replicas",
            "4",
            "--rate-limit",
            "50",
            "--emit-config",
            str(path),
        ],
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert code == 0
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    app = config.applications[0]
    assert app.import_path == "kiln.serving.app:build_app" and app.route_prefix == "/"
    assert app.args["models"] == ["digits-mlp@production"]
    assert (app.args["min_replicas"], app.args["max_replicas"], app.args["rate_limit_per_s"]) == (
        0,
        4,
        50.0,
    )
    from kiln.serving.app import build_app

    # The args build the application as written (Serve has no public getter for the bound
    # deployment of an Application).
    deployment = build_app(app.args)._bound_deployment
    assert deployment.name == "KilnServer"
    live = deployment.user_config
    assert (live["models"], live["rate_limit_per_s"]) == (["digits-mlp@production"], 50.0)
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (0, 4)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["serve"], "Give one or more models"),
        (
            ["serve", "m", "--min-replicas", "5", "--max-replicas", "2"],
            "min_replicas 5 exceeds max_replicas 2",
        ),
        (["serve", "m", "--num-gpus", "2"], 'Got "2.0" for num_gpus'),
        (["serve", "m", "--rate-limit", "-1"], 'Got "-1.0" for rate_limit_per_s'),
        (
            ["deploy", "m", "--version", "2", "--canary-weight", "150"],
            'Got "150" for --canary-weight',
        ),
        (["deploy", "m", "--version", "2"], "kiln deploy needs a running Ray cluster"),
        (["promote", "m"], "kiln promote needs a running Ray cluster"),
        (["rollback", "m"], "kiln rollback needs a running Ray cluster"),
        (["serve", "nosuch"], "no model named nosuch is registered"),  # before Ray starts
        (["serve", "nosuch@9", "--no-auth"], "no model named nosuch is registered"),
        (["serve", "Bad/Name"], 'Got "Bad/Name" for a model name'),
    ],
)
def test_bad_serving_input_is_one_line(args, fragment, tmp_path, monkeypatch, capsys):
    code, err = run(args, tmp_path, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert fragment in lines[0]


def test_deploying_a_missing_version_fails_from_the_registry_before_serve(
    ray_local, settings_session, registry_session, trained_digits
):
    """On a cluster (or from Python) the Registry actor answers first: no failed deployment."""
    from kiln.serving_control import deploy_models
    from kiln.training.errors import NotFoundError

    with pytest.raises(NotFoundError, match="model digits-mlp has no version 999"):
        deploy_models(settings_session, ["digits-mlp", "digits-mlp@999"], auth=False)


def test_settings_without_an_option_of_their_own_reach_the_serve_args(
    tmp_path, monkeypatch, capsys
):
    """KILN_FEEDBACK_SHARDS, KILN_FEEDBACK_INDEX_IDS and KILN_GRPC_FRONT come only from the
    environment: `kiln serve` hands them to the replicas (it once kept ServeArgs' defaults)."""
    monkeypatch.setenv("KILN_FEEDBACK_SHARDS", "3")
    monkeypatch.setenv("KILN_FEEDBACK_INDEX_IDS", "2000000")
    monkeypatch.setenv("KILN_GRPC_FRONT", "python")
    path = tmp_path / "serve.yaml"
    code, err = run(["serve", "m@1", "--emit-config", str(path)], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    args = yaml.safe_load(path.read_text())["applications"][0]["args"]
    assert (args["feedback_shards"], args["feedback_index_ids"], args["grpc_front"]) == (
        3,
        2_000_000,
        "python",
    )


def test_a_native_grpc_front_that_is_not_built_is_one_line_before_ray_starts(
    tmp_path, monkeypatch, capsys
):
    from kiln.serving import direct
    from tests.conftest import free_port

    monkeypatch.setattr(direct, "NATIVE_FRONT", tmp_path / "missing" / "kiln-grpc-front")
    monkeypatch.setenv("KILN_GRPC_FRONT", "native")
    monkeypatch.setenv("KILN_GRPC_PORT", str(free_port()))
    code, err = run(["serve", "m@1"], tmp_path, monkeypatch, capsys)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert 'Got "native" for KILN_GRPC_FRONT' in line and "make native" in line
