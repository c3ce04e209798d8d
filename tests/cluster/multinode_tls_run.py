"""`kiln serve --tls-*` on a Ray cluster (a head and 2 worker nodes, one process): Serve binds
loopback on its proxy node and a TLS frontend actor pinned to that node terminates TLS on the
public port (cluster/tls_cluster.py). Run by tests/cluster/test_multinode_tls.py in a
subprocess; prints one JSON line of what it observed.

All nodes share 127.0.0.1 here, so Serve runs its proxy on the head only (per-node proxies
would clash on one port); a second frontend is pinned to a worker node on a port of its own,
to see one run, and answer, off the driver's and the proxy's node.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from kiln.actors.registry import NAMESPACE  # noqa: E402
from kiln.runtime import registry_for, serve_env  # noqa: E402
from kiln.serving_control import deploy_models, grpc_options  # noqa: E402
from kiln.settings import Settings  # noqa: E402
from kiln.tls import TlsFiles, issue, make_ca  # noqa: E402
from kiln.tls_cluster import NodeTlsFront, TlsMaterial, front_names  # noqa: E402
from tests.conftest import TINY_SPEC, free_port, tiny_model_files, wait_for  # noqa: E402

NODE_ARGS: dict[str, Any] = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
BODY = {"instances": [[0.1, 0.2, 0.3, 0.4]]}


def answers(url: str, **client: Any) -> str:
    """`200` for a model answer, else what the client saw instead."""
    try:
        reply = httpx.post(url, json=BODY, timeout=15, **client)
    except (httpx.HTTPError, OSError) as exc:
        return type(exc).__name__
    if reply.status_code == 200 and "predictions" in reply.text:
        return "200"
    return f"HTTP {reply.status_code}"


def grpc_live(port: int, ca: Path | None) -> str:
    """`live` when the stock tritonclient.grpc reaches the server (over TLS with `ca`)."""
    import tritonclient.grpc as triton

    try:
        if ca is None:
            client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        else:
            client = triton.InferenceServerClient(
                f"127.0.0.1:{port}", ssl=True, root_certificates=str(ca)
            )
        return "live" if client.is_server_live(client_timeout=10) else "not live"
    except Exception as exc:  # tritonclient's InferenceServerException and grpc's errors
        return type(exc).__name__


def replica_listeners() -> dict[str, list[str]]:
    """The addresses the replicas' direct-ingress servers (HAProxy's backends) listen on."""
    import subprocess

    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    found: dict[str, list[str]] = {"http": [], "grpc": []}
    for kind in found:
        low = int(os.environ[f"RAY_SERVE_DIRECT_INGRESS_MIN_{kind.upper()}_PORT"])
        high = int(os.environ[f"RAY_SERVE_DIRECT_INGRESS_MAX_{kind.upper()}_PORT"])
        for line in out.splitlines():
            address = line.split()[3]
            if low <= int(address.rpartition(":")[2]) <= high:
                found[kind].append(address)
    return found


def listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "zombie" in status.read_text())


def cli_serve_replaces_the_fronts(cluster: Cluster, settings: Settings, root: Path) -> dict:
    """`kiln serve tiny --address ... --tls-*` as a user types it, on another public port: it
    reuses the running Serve's loopback port and replaces the frontends of the first deploy."""
    import subprocess

    first_port, port = settings.kiln_http_port, free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(
        KILN_HOME=str(settings.kiln_home),
        KILN_STORAGE=str(settings.kiln_storage),
        KILN_GRPC_PORT="0",
        RAY_ADDRESS=cluster.address,
    )
    kiln = str(Path(sys.executable).with_name("kiln"))
    done = subprocess.run(
        [kiln, "serve", "tiny", "--no-auth", "--json", "--port", str(port),
         "--tls-cert", str(root / "server.crt"), "--tls-key", str(root / "server.key")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if done.returncode != 0:
        return {"cli_error": done.stderr[-2000:]}
    url = json.loads(done.stdout.strip().splitlines()[-1])["url"]
    return {
        "cli_url": url,
        "cli_with_ca": answers(f"{url}/v1/models/tiny:predict", verify=str(root / "ca.pem")),
        "cli_fronts": front_names(NAMESPACE),
        "first_port_closed": wait_for(lambda: not listening(first_port), 30),
        "cli_port": port,
    }


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="kiln-multinode-tls-"))
    ca_pem, _, ca = make_ca()
    cert_pem, key_pem, _ = issue("kiln cluster", ["127.0.0.1", "localhost"], issuer=ca)
    other_ca_pem, _, _ = make_ca("another CA")
    for name, data in [
        ("ca.pem", ca_pem),
        ("server.crt", cert_pem),
        ("other-ca.pem", other_ca_pem),
    ]:
        (root / name).write_bytes(data)
    client_pem, client_key_pem, _ = issue("a caller", [], issuer=ca, client=True)
    (root / "client.crt").write_bytes(client_pem)
    (root / "client.key").write_bytes(client_key_pem)
    (root / "server.key").touch(mode=0o600)
    (root / "server.key").write_bytes(key_pem)
    tls = TlsFiles(root / "server.crt", root / "server.key")

    # Serve's HAProxy ingress, as Kiln's cluster configs start every node (cluster/runtime.py),
    # with ports of its own on this shared machine.
    os.environ.update(serve_env())
    cluster = Cluster(
        initialize_head=True, head_node_args={**NODE_ARGS, "include_dashboard": False}
    )
    workers = [cluster.add_node(**NODE_ARGS) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    settings = Settings(
        kiln_home=root / "home",
        kiln_storage=str(root / "storage"),
        kiln_http_port=free_port(),
        ray_address=cluster.address,  # a cluster: kiln serve --address
    )
    result: dict[str, Any] = {"head": cluster.head_node.node_id}
    try:
        registry_for(settings)
        ray.get(
            registry_for(settings).register.remote("tiny", tiny_model_files(0), TINY_SPEC, {}, {})
        )
        # One proxy, on the head (see the module's docstring); Serve's port on loopback.
        serve.start(
            proxy_location="HeadOnly",
            http_options={"host": "127.0.0.1", "port": free_port()},
            grpc_options=grpc_options(free_port()),
        )
        serve_port = serve.context._get_global_client().http_config.port
        public_grpc = free_port()
        base = deploy_models(
            settings,
            ["tiny"],
            auth=False,
            num_replicas=2,
            num_cpus=0.25,
            tls=tls,
            grpc_port=public_grpc,
        )
        url = f"{base}/v1/models/tiny:predict"
        public = settings.kiln_http_port
        result["url"] = base
        result["fronts"] = front_names(NAMESPACE)
        front = ray.get_actor(result["fronts"][0], namespace=NAMESPACE)
        result["front_node"] = ray._private.state.actors(front._actor_id.hex())["Address"]["NodeID"]
        result["with_ca"] = answers(url, verify=str(root / "ca.pem"))
        result["no_ca"] = answers(url)
        result["other_ca"] = answers(url, verify=str(root / "other-ca.pem"))
        result["plain_http"] = answers(f"http://127.0.0.1:{public}/v1/models/tiny:predict")
        result["serve_loopback"] = answers(f"http://127.0.0.1:{serve_port}/v1/models/tiny:predict")
        with httpx.Client(verify=str(root / "ca.pem")) as client:
            reply = client.post(url, json=BODY, timeout=15)
            result["tls_version"] = (
                reply.extensions["network_stream"].get_extra_info("ssl_object").version()
            )

        result["replica_listeners"] = replica_listeners()
        result["grpc_tls_live"] = grpc_live(public_grpc, root / "ca.pem")
        result["grpc_plain_live"] = grpc_live(public_grpc, None)
        result.update(cli_serve_replaces_the_fronts(cluster, settings, root))

        # A frontend pinned to a worker node, on a port of its own, to the head's Serve port.
        node = workers[0].node_id
        extra_port = free_port()
        pinned = NodeTlsFront.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
        ).remote()
        started = ray.get(
            pinned.start.remote(
                TlsMaterial(cert_pem, key_pem, client_ca=ca_pem),  # callers need certificates
                "127.0.0.1",
                [(extra_port, serve_port, "http/1.1")],
            )
        )
        result["pinned_asked"], result["pinned_ran"] = node, started["node_id"]
        key_file = Path(started["folder"]) / "server.key"
        result["key_mode"] = oct(key_file.stat().st_mode & 0o777)
        result["folder_mode"] = oct(Path(started["folder"]).stat().st_mode & 0o777)
        extra_url = f"https://127.0.0.1:{extra_port}/v1/models/tiny:predict"
        result["pinned_no_client_cert"] = answers(extra_url, verify=str(root / "ca.pem"))
        with_cert = ssl.create_default_context(cafile=str(root / "ca.pem"))
        with_cert.load_cert_chain(root / "client.crt", root / "client.key")
        result["pinned_client_cert"] = answers(extra_url, verify=with_cert)
        # The frontend ends with its actor, even killed without a word (SIGKILL).
        pid = started["pids"][0]
        ray.kill(pinned, no_restart=True)
        result["haproxy_gone_after_kill"] = wait_for(lambda: not pid_alive(pid), 30)
        result["port_closed_after_kill"] = wait_for(lambda: not listening(extra_port), 30)
    finally:
        if ray.is_initialized():
            from kiln.tls_cluster import stop_node_fronts

            result["stopped"] = stop_node_fronts(NAMESPACE)
            result["public_closed_after_stop"] = wait_for(
                lambda: not listening(result.get("cli_port", settings.kiln_http_port)), 30
            )
            serve.shutdown()
            ray.shutdown()
        cluster.shutdown()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
