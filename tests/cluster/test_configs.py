"""Every YAML in cluster_configs/ is loaded and validated against Ray's own schemas.

Cluster YAMLs go through the autoscaler's `prepare_config` (fills the provider's defaults) and
`validate_config` (jsonschema against ray-schema.json, plus Ray's own cross-checks), offline;
Serve configs through `ServeDeploySchema`, the model `serve deploy` and KubeRay use.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[2] / "cluster_configs"
CLUSTER_YAMLS = ["local.yaml", "aws.yaml", "gcp.yaml"]


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / name).read_text())


def validate_cluster(cfg: dict[str, Any]) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def serve_app_args(serve_config: dict[str, Any]) -> dict[str, Any]:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config)
    (application,) = schema.applications
    assert application.import_path == "kiln.serving.app:build_app"
    return application.args


def test_every_yaml_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(
        [*CLUSTER_YAMLS, "kuberay-rayservice.yaml", "serve.yaml"]
    )


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_cluster_yaml_passes_ray_validation(name):
    prepared = validate_cluster(load(name))
    head_start = " ".join(prepared["head_start_ray_commands"])
    # The dashboard (and the Jobs API) must never listen beyond the head's loopback.
    assert "--dashboard-host=127.0.0.1" in head_start
    # The project and the auth token every node and client share.
    assert prepared["file_mounts"] == {"~/kiln": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    assert ".venv" in prepared["rsync_exclude"] and ".git" in prepared["rsync_exclude"]
    setup = "\n".join(prepared["setup_commands"])
    assert "~/.bashrc" in setup and "activate" in setup  # `ray` on the login shell's PATH


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_a_broken_cluster_yaml_is_refused(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load(name)
    cfg["setup_command"] = cfg.pop("setup_commands")  # a typo the schema must catch
    with pytest.raises(Exception, match="setup_command"):
        validate_config(prepare_config(cfg))


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_yaml_has_cpu_head_and_spot_gpu_with_on_demand_fallback(name):
    types = validate_cluster(load(name))["available_node_types"]
    head = types[load(name)["head_node_type"]]
    assert "GPU" not in head["resources"]
    spot, fallback = types["gpu_spot"], types["gpu_ondemand"]
    assert spot["resources"]["GPU"] == fallback["resources"]["GPU"] == 1
    assert spot["min_workers"] == 0 < spot["max_workers"]
    if name == "aws.yaml":
        assert spot["node_config"]["InstanceType"] == "g5.xlarge"
        assert spot["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        assert "InstanceMarketOptions" not in fallback["node_config"]
    else:
        assert spot["node_config"]["scheduling"]["provisioningModel"] == "SPOT"
        assert "provisioningModel" not in fallback["node_config"]["scheduling"]


def test_local_yaml_lists_its_machines():
    provider = validate_cluster(load("local.yaml"))["provider"]
    assert provider["type"] == "local"
    assert provider["head_ip"] and provider["worker_ips"]


def test_serve_yaml_is_a_valid_serve_config_for_kiln():
    from kiln.serving.schemas import ServeArgs

    args = serve_app_args(load("serve.yaml"))
    assert ServeArgs(**args).auth is True  # a cluster endpoint never serves without keys


def test_rayservice_has_kuberay_shape_and_a_valid_serve_config():
    from kiln.serving.schemas import ServeArgs

    service = load("kuberay-rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"].startswith("2.60")
    head = cluster["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["name"] == "ray-head"
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    # serveConfigV2 is a string holding a Serve config: it must parse and validate on its own.
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    args = serve_app_args(serve_config)
    assert ServeArgs(**args).models == load("serve.yaml")["applications"][0]["args"]["models"]
    env = {e["name"]: e for e in head["template"]["spec"]["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
