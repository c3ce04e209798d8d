"""`kiln keys rotate` and `kiln keys list` as a user runs them: the new secret works for
admin commands at once, the old one stops after the grace, listing shows last use, bad input
gets one line."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import free_port
from tests.e2e.kiln_process import kiln, kiln_env, kiln_json


def test_rotate_and_list(tmp_path: Path) -> None:
    env = kiln_env(tmp_path / "home", free_port())
    old = kiln_json(env, "keys", "create", "--scope", "admin")
    new = kiln_json(env, "keys", "rotate", old["id"], "--grace", "0")
    assert new["replaces"] == old["id"] and new["scopes"] == ["admin"]
    rows = {r["id"]: r for r in kiln_json(env, "keys", "list", "--key", new["secret"])}
    assert rows[old["id"]]["status"] == "expired" and rows[new["id"]]["status"] == "active"
    assert rows[new["id"]]["last_used"] is None and rows[new["id"]]["unused_warning"] is False
    refused = kiln(env, "keys", "list", "--key", old["secret"])
    assert refused.returncode != 0 and "expired" in refused.stderr
    audit = kiln_json(env, "audit", "--action", "key.rotate")
    assert audit[-1]["target"] == old["id"]


def test_bad_rotations_are_one_line(tmp_path: Path) -> None:
    env = kiln_env(tmp_path / "home", free_port())
    unknown = kiln(env, "keys", "rotate", "0123456789ab")
    assert unknown.returncode == 2 and "no API key with id" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1 and "Traceback" not in unknown.stderr
    made = kiln_json(env, "keys", "create", "--scope", "predict:*")
    bad = kiln(env, "keys", "rotate", made["id"], "--grace", "soon")
    assert bad.returncode == 2 and 'Got "soon" for --grace' in bad.stderr
    kiln_json(env, "keys", "revoke", made["id"])
    revoked = kiln(env, "keys", "rotate", made["id"])
    assert revoked.returncode == 2 and "revoked" in revoked.stderr
