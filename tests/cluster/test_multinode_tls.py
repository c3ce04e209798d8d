"""`kiln serve --tls-*` on a cluster of a head and 2 worker nodes (tests/cluster/
multinode_tls_run.py, in a subprocess: a Ray Cluster cannot share the session's ray.init):
real TLS handshakes against the cluster's port with the CA; plain HTTP, no CA and another CA
get no model answer; gRPC (tritonclient, ssl=True) answers through its frontend, not in clear;
Serve itself listens on loopback; a frontend pinned to a worker node runs there with its key in
a 0600 file, asks for client certificates of the CA it is given, and its HAProxy ends when the
actor is killed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

SCRIPT = Path(__file__).with_name("multinode_tls_run.py")


@pytest.fixture(scope="module")
def observed() -> dict:
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_cluster_port_speaks_tls_only(observed: dict) -> None:
    assert observed["url"].startswith("https://")
    assert observed["with_ca"] == "200"
    assert observed["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert observed["no_ca"] == "ConnectError"  # the certificate is not trusted
    assert observed["other_ca"] == "ConnectError"
    assert observed["plain_http"] != "200"
    assert observed["serve_loopback"] == "200"  # Serve answers, but on 127.0.0.1 only
    # HAProxy's backends, the replicas' direct-ingress HTTP servers, bind loopback as well.
    http = observed["replica_listeners"]["http"]
    assert http and all(address.startswith("127.0.0.1:") for address in http)
    assert observed["grpc_tls_live"] == "live"  # gRPC through its own frontend (ALPN h2)
    assert observed["grpc_plain_live"] != "live"


def test_a_frontend_runs_on_each_proxy_node(observed: dict) -> None:
    assert observed["fronts"] == [f"kiln-tls-front-{observed['head']}"]
    assert observed["front_node"] == observed["head"]  # HeadOnly: the proxy's node
    assert observed["pinned_ran"] == observed["pinned_asked"] != observed["head"]
    assert observed["pinned_client_cert"] == "200"  # its --tls-ca reached the node too
    assert observed["pinned_no_client_cert"] != "200"
    assert observed["key_mode"] == "0o600" and observed["folder_mode"] == "0o700"


def test_kiln_serve_on_the_cluster_replaces_the_frontends(observed: dict) -> None:
    assert "cli_error" not in observed, observed.get("cli_error")
    assert observed["cli_url"] == f"https://127.0.0.1:{observed['cli_port']}"
    assert observed["cli_with_ca"] == "200"
    assert observed["cli_fronts"] == [f"kiln-tls-front-{observed['head']}"]  # one, replaced
    assert observed["first_port_closed"]  # the first deploy's frontend stopped


def test_frontends_end_with_their_actors(observed: dict) -> None:
    assert observed["haproxy_gone_after_kill"] and observed["port_closed_after_kill"]
    assert observed["stopped"] == 1 and observed["public_closed_after_stop"]
