"""Kiln's TLS frontend with real handshakes over loopback (no Ray): a plain HTTP server stands
for Serve's ingress behind it, clients are httpx, curl and Python's ssl with old settings."""

from __future__ import annotations

import datetime as dt
import http.server
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kiln.runtime import free_port
from kiln.tls import (
    TlsFiles,
    TlsFrontend,
    fingerprint,
    issue,
    make_ca,
    self_signed_files,
    tls_from_options,
)
from kiln.training.errors import KilnError

ANSWER = b'{"predictions": [7]}'


class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def backend_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate it issued, a client certificate it issued, an expired
    server certificate, and a second CA with its own client certificate."""
    folder = tmp_path_factory.mktemp("pki")
    ca_pem, _, ca = make_ca()
    other_pem, _, other = make_ca("another CA")
    files = {"ca.pem": ca_pem, "other-ca.pem": other_pem}
    files["server.pem"], files["server.key"], _ = issue("server", ["127.0.0.1", "localhost"], ca)
    files["client.pem"], files["client.key"], _ = issue("client", [], ca, client=True)
    files["stranger.pem"], files["stranger.key"], _ = issue("x", [], other, client=True)
    long_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=40)
    files["expired.pem"], files["expired.key"], _ = issue(
        "server", ["127.0.0.1"], ca, not_before=long_ago, days=30
    )
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


def frontend(files: TlsFiles, backend_port: int) -> TlsFrontend:
    return TlsFrontend(files, "127.0.0.1", free_port(), backend_port).start()


@pytest.fixture(scope="module")
def served(pki: dict[str, Path], backend_port: int) -> Iterator[TlsFrontend]:
    front = frontend(TlsFiles(pki["server.pem"], pki["server.key"]), backend_port)
    yield front
    front.stop()


def test_httpx_with_the_ca_gets_the_answer(served: TlsFrontend, pki: dict[str, Path]) -> None:
    context = ssl.create_default_context(cafile=str(pki["ca.pem"]))
    reply = httpx.get(f"https://127.0.0.1:{served.port}/", verify=context, timeout=10)
    assert reply.status_code == 200 and reply.content == ANSWER


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_cacert(served: TlsFrontend, pki: dict[str, Path]) -> None:
    url = f"https://127.0.0.1:{served.port}/"
    done = subprocess.run(
        ["curl", "-sS", "--cacert", str(pki["ca.pem"]), url], capture_output=True, timeout=20
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ANSWER
    unverified = subprocess.run(["curl", "-sS", url], capture_output=True, timeout=20)
    assert unverified.returncode != 0  # curl without the CA refuses the certificate


def test_plain_http_to_the_tls_port_gets_no_answer(served: TlsFrontend) -> None:
    try:
        reply = httpx.get(f"http://127.0.0.1:{served.port}/", timeout=10)
    except httpx.HTTPError:
        return  # the frontend dropped the connection
    assert ANSWER not in reply.content and reply.status_code != 200


def test_wrong_ca_is_refused(served: TlsFrontend, pki: dict[str, Path]) -> None:
    context = ssl.create_default_context(cafile=str(pki["other-ca.pem"]))
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://127.0.0.1:{served.port}/", verify=context, timeout=10)


def test_expired_certificate_is_refused(pki: dict[str, Path], backend_port: int) -> None:
    front = frontend(TlsFiles(pki["expired.pem"], pki["expired.key"]), backend_port)
    try:
        context = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        with pytest.raises(httpx.ConnectError, match="expired"):
            httpx.get(f"https://127.0.0.1:{front.port}/", verify=context, timeout=10)
    finally:
        front.stop()
    with pytest.raises(KilnError, match="expired"):  # and kiln refuses to serve with it
        tls_from_options(
            str(pki["expired.pem"]), str(pki["expired.key"]), None, False, pki["ca.pem"].parent
        )


def handshake(port: int, context: ssl.SSLContext) -> str:
    """The negotiated protocol version, or an ssl.SSLError / OSError."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return str(tls.version())


def test_old_protocols_and_weak_ciphers_are_refused(
    served: TlsFrontend, pki: dict[str, Path]
) -> None:
    context = ssl.create_default_context(cafile=str(pki["ca.pem"]))
    assert handshake(served.port, context) == "TLSv1.3"
    tls12 = ssl.create_default_context(cafile=str(pki["ca.pem"]))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert handshake(served.port, tls12) == "TLSv1.2"
    old = ssl.create_default_context(cafile=str(pki["ca.pem"]))
    old.set_ciphers("ALL:@SECLEVEL=0")
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(served.port, old)
    weak = ssl.create_default_context(cafile=str(pki["ca.pem"]))
    weak.maximum_version = ssl.TLSVersion.TLSv1_2
    weak.set_ciphers("ECDHE-ECDSA-AES128-SHA:AES128-SHA:AES128-GCM-SHA256")  # CBC, no PFS
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(served.port, weak)


def test_client_certificate_required_with_a_ca(pki: dict[str, Path], backend_port: int) -> None:
    files = TlsFiles(pki["server.pem"], pki["server.key"], client_ca=pki["ca.pem"])
    front = frontend(files, backend_port)
    url = f"https://127.0.0.1:{front.port}/"
    try:
        context = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        with pytest.raises(httpx.HTTPError):
            httpx.get(url, verify=context, timeout=10)  # no client certificate
        stranger = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        stranger.load_cert_chain(pki["stranger.pem"], pki["stranger.key"])
        with pytest.raises(httpx.HTTPError):
            httpx.get(url, verify=stranger, timeout=10)  # one from another CA
        client = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        client.load_cert_chain(pki["client.pem"], pki["client.key"])
        assert httpx.get(url, verify=client, timeout=10).content == ANSWER
    finally:
        front.stop()


def test_self_signed_certificate_is_its_own_ca(tmp_path: Path, backend_port: int) -> None:
    cert, key = self_signed_files(tmp_path)
    assert key.stat().st_mode & 0o077 == 0  # the key is readable by its owner only
    assert len(fingerprint(cert).split(":")) == 32
    front = frontend(TlsFiles(cert, key), backend_port)
    try:
        context = ssl.create_default_context(cafile=str(cert))
        reply = httpx.get(f"https://localhost:{front.port}/", verify=context, timeout=10)
        assert reply.content == ANSWER
    finally:
        front.stop()


def test_bad_options_are_one_line(tmp_path: Path, pki: dict[str, Path]) -> None:
    with pytest.raises(KilnError, match="--tls-key"):
        tls_from_options(str(pki["server.pem"]), None, None, False, tmp_path)
    with pytest.raises(KilnError, match="no such file"):
        tls_from_options(str(tmp_path / "nope.pem"), str(pki["server.key"]), None, False, tmp_path)
    with pytest.raises(KilnError, match="not the key"):
        tls_from_options(str(pki["server.pem"]), str(pki["client.key"]), None, False, tmp_path)
    with pytest.raises(KilnError, match="not a PEM certificate"):
        tls_from_options(str(pki["server.key"]), str(pki["server.key"]), None, False, tmp_path)
    with pytest.raises(KilnError, match="--tls-self-signed"):
        tls_from_options(str(pki["server.pem"]), None, None, True, tmp_path)
    with pytest.raises(KilnError, match="--tls-cert"):
        tls_from_options(None, None, str(pki["ca.pem"]), False, tmp_path)


def test_the_fingerprint_is_printed_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kiln.tls
    from kiln.cli.common import tls_files
    from kiln.settings import Settings

    monkeypatch.setattr(kiln.tls, "fingerprint", lambda _: "04:CA:85:CD:12:[B]")
    files = tls_files(Settings(kiln_home=tmp_path), None, None, None, self_signed=True)
    assert files is not None and files.cert.is_file()
    assert "SHA-256 fingerprint 04:CA:85:CD:12:[B]" in capsys.readouterr().err  # no :cd: emoji
