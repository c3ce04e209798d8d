"""The HTTP schemas: the canary weight rule and what importing them costs (no Ray needed)."""

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from kiln.serving.schemas import CanarySpec, ServeArgs, is_canary_weight


@pytest.mark.parametrize(
    "weight,valid", [(-1, False), (0, True), (37, True), (100, True), (101, False)]
)
def test_the_canary_weight_rule_is_the_schemas(weight, valid):
    assert is_canary_weight(weight) is valid
    spec = {"ref": "m@2", "weight": weight}
    if valid:
        assert CanarySpec.model_validate(spec).weight == weight
        assert ServeArgs(models=["m@1"], canary={"m": spec}).canary["m"].weight == weight
    else:
        with pytest.raises(ValidationError, match="weight"):
            CanarySpec.model_validate(spec)


def test_the_schemas_load_without_torch_or_the_serve_app():
    probe = "import json, sys, kiln.serving.schemas; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(
        subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
        ).stdout
    )
    assert not {"torch", "ray", "kiln.serving.app", "fastapi"} & set(loaded)
