"""`kiln models|keys|audit` on an embedded home: each command's --json answer, in-process.

Without --address the CLI runs the registry's code on the catalog file directly, so these
tests need no Ray (the error lines are checked in a real subprocess in test_cli_errors.py).
"""

import json

import pytest

from kiln.actors.registry import RegistryService
from kiln.cli import main
from tests.conftest import TINY_SPEC, tiny_model_files


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    service = RegistryService(str(home / "registry.db"), str(home / "storage"))
    for seed in range(2):
        service.register("m", tiny_model_files(seed), TINY_SPEC, {"accuracy": 0.9}, {})
    service.close()
    return str(home)


def kiln(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def kiln_json(capsys, *args: str):
    code, out, err = kiln(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_models_commands(capsys, home):
    assert kiln_json(capsys, "models", "alias", "m", "2", "production", "--home", home) == {
        "name": "m",
        "alias": "production",
        "version": 2,
        "previous": None,
    }
    shown = kiln_json(capsys, "models", "show", "m", "--home", home)
    assert (shown["version"], shown["aliases"], shown["status"]) == (2, ["production"], "active")
    assert set(shown["lineage"]) >= {"dataset_uri", "code_version", "parent", "sweep_id"}
    assert kiln_json(capsys, "models", "archive", "m@1", "--home", home)["status"] == "archived"
    versions = kiln_json(capsys, "models", "list", "m", "--home", home)
    assert [(v["version"], v["status"]) for v in versions] == [(1, "archived"), (2, "active")]

    code, _, err = kiln(capsys, "models", "delete", "m@2", "--home", home)
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    deleted = kiln_json(capsys, "models", "delete", "m@2", "--force", "--home", home)
    assert deleted["aliases_removed"] == ["production"]
    assert kiln_json(capsys, "models", "list", "--home", home) == [
        {"name": "m", "num_versions": 1, "num_archived": 1, "latest_version": None, "aliases": {}}
    ]


def test_keys_and_audit_commands(capsys, home):
    made = kiln_json(
        capsys,
        "keys",
        "create",
        "--scope",
        "predict:m",
        "--scope",
        "admin",
        "--expires",
        "12h",
        "--home",
        home,
    )
    assert set(made) == {"id", "secret", "scopes", "expires"}
    assert made["scopes"] == ["admin", "predict:m"] and made["secret"].startswith("kiln_")
    listed = kiln_json(capsys, "keys", "list", "--home", home)
    assert [(k["id"], k["status"]) for k in listed] == [(made["id"], "active")]
    assert made["secret"] not in json.dumps(listed)

    # Acting as the key: the change is audited under its id, not "local".
    kiln_json(
        capsys, "models", "alias", "m", "1", "canary", "--key", made["secret"], "--home", home
    )
    revoked = kiln_json(capsys, "keys", "revoke", made["id"], "--home", home)
    assert revoked["status"] == "revoked" and revoked["revoked"]
    entries = kiln_json(capsys, "audit", "--home", home)
    assert [(e["key_id"], e["action"], e["target"]) for e in entries] == [
        ("local", "register", "m@1"),
        ("local", "register", "m@2"),
        ("local", "key.create", made["id"]),
        (made["id"], "alias", "m@canary"),
        ("local", "key.revoke", made["id"]),
    ]
    assert [
        e["action"] for e in kiln_json(capsys, "audit", "--action", "alias", "--home", home)
    ] == ["alias"]
    code, _, err = kiln(
        capsys, "models", "alias", "m", "1", "x", "--key", made["secret"], "--home", home
    )
    assert code == 2 and "revoked" in err


def test_keys_create_without_json_shows_the_secret_once_with_a_warning(capsys, home):
    code, out, err = kiln(capsys, "keys", "create", "--scope", "predict:*", "--home", home)
    assert code == 0 and "kiln_" in out and "cannot show it again" in err
