"""A model's prediction-log policy in the registry (`kiln models log-policy`): stored in the
real SQLite catalog, admin only, audited, checked against the model's inputs (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.actors.registry import RegistryService
from kiln.training.errors import KilnError, NotFoundError
from tests.conftest import TINY_SPEC, tiny_model_files


@pytest.fixture
def registry(tmp_path: Path):
    service = RegistryService(str(tmp_path / "registry.db"), str(tmp_path / "storage"))
    service.register("m", tiny_model_files(0), TINY_SPEC, {}, {})
    yield service
    service.close()


def test_a_policy_is_stored_shown_and_audited(registry, tmp_path: Path) -> None:
    assert registry.log_policy("m") is None
    made = registry.set_log_policy("m", mask=["x1"], drop=["x3"], mask_text=False)
    assert made["log_policy"] == {"mask": ["x1"], "drop": ["x3"], "mask_text": False}
    assert made["previous"] is None
    registry.close()
    reopened = RegistryService(str(tmp_path / "registry.db"), str(tmp_path / "storage"))
    try:
        assert reopened.log_policy("m") == made["log_policy"]  # on disk, not in memory
        assert reopened.log_policies(["m", "other"]) == {"m": made["log_policy"]}
        entry = reopened.audit(action="log-policy")[-1]
        assert entry["target"] == "m" and entry["detail"]["policy"] == made["log_policy"]
        cleared = reopened.set_log_policy("m")
        assert cleared["log_policy"] is None and cleared["previous"] == made["log_policy"]
        assert reopened.log_policy("m") is None
    finally:
        reopened.close()


def test_a_field_the_model_lacks_is_refused_naming_its_inputs(registry) -> None:
    with pytest.raises(KilnError) as caught:
        registry.set_log_policy("m", mask=["income"])
    message = str(caught.value)
    assert '"income"' in message and "m@1 has x0..x3" in message and "\n" not in message
    with pytest.raises(KilnError, match="not both"):
        registry.set_log_policy("m", mask=["x1"], drop=["x1"])
    with pytest.raises(NotFoundError):
        registry.set_log_policy("nope", mask=["x1"])
    assert registry.log_policy("m") is None


def test_only_an_admin_key_may_change_it(registry) -> None:
    predict = registry.create_key(["predict:m"])
    with pytest.raises(KilnError, match="admin"):
        registry.set_log_policy("m", mask=["x0"], key=predict["secret"])
    admin = registry.create_key(["admin"])
    registry.set_log_policy("m", mask=["x0"], key=admin["secret"])
    assert registry.audit(action="log-policy")[-1]["key_id"] == admin["id"]
