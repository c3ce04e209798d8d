"""One settings object, read from the environment; CLI options of the same name override it.

| variable         | CLI option  | default                         |
|------------------|-------------|---------------------------------|
| KILN_HOME        | --home      | ~/.kiln (registry SQLite, logs) |
| KILN_STORAGE     | --storage   | $KILN_HOME/storage              |
| RAY_ADDRESS      | --address   | unset: an embedded local Ray    |
| KILN_HTTP_HOST   | --host      | 127.0.0.1                       |
| KILN_HTTP_PORT   | --port      | 8000                            |
| KILN_INGRESS     | --ingress   | auto (serving/direct.py)        |
| KILN_API_KEY     | --key       | unset: act as the local user    |
| KILN_FEEDBACK_SHARDS |         | 1 (FeedbackStore actors)        |
| KILN_GRPC_FRONT  |             | auto: the C++ gRPC front where built (serving/native/) |
| KILN_FEEDBACK_INDEX_IDS |      | 50,000,000 logged ids a shard indexes (actors/feedback.py) |
| KILN_TLS_CERT    | --tls-cert  | unset: plain HTTP (cluster/tls.py) |
| KILN_TLS_KEY     | --tls-key   | unset                           |
| KILN_TLS_CA      | --tls-ca    | unset: no client certificates   |
| KILN_TLS_INNER_HOST |          | 127.0.0.1: Serve's bind behind TLS on a cluster |
| KILN_ENCRYPT     |             | off: seal new storage files (docs/security.md) |
| KILN_MASTER_KEY  |             | unset: the master key (file, hex/base64, aws-kms:ID) |
| KILN_PRICE_CPU_HOUR  |         | 0.0504 USD (actors/monitor.py)  |
| KILN_PRICE_GPU_HOUR  |         | 1.006 USD (actors/monitor.py)   |
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Ingress = Literal["auto", "serve", "direct"]
"""Who answers `kiln serve`'s ports (cluster/serving_control.py direct_ingress)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    kiln_home: Path = Field(default_factory=lambda: Path.home() / ".kiln")
    """Local state: the registry's SQLite file and logs."""
    kiln_storage: str | None = None
    """Artifact root URI (local folder, file://, s3://, gs://); default $KILN_HOME/storage."""
    ray_address: str | None = None
    """Ray cluster address; unset means an embedded local Ray for the command's lifetime."""
    kiln_http_host: str = "127.0.0.1"
    kiln_http_port: int = Field(8000, ge=1, le=65535)
    kiln_grpc_port: int = Field(9000, ge=0, le=65535)
    """Open Inference Protocol V2 over gRPC (Ray Serve's default port); 0: no gRPC."""
    kiln_ingress: Ingress = "auto"
    """Who answers the HTTP port: every replica itself (direct, serving/direct.py; Serve's
    ingress then listens on another port), Serve's HAProxy ingress (serve), or auto: direct on
    the embedded Ray with a fixed replica count, serve on a cluster or with autoscaling."""
    kiln_num_cpus: int | None = Field(None, ge=1)
    """Logical CPUs of the embedded Ray (default: max(4, cores)); ignored on a cluster."""
    kiln_feedback_shards: int = Field(1, ge=1, le=256)
    """FeedbackStore actors the prediction log spreads over (one per few busy replicas)."""
    kiln_grpc_front: Literal["auto", "native", "python"] = "auto"
    """Who terminates gRPC on the direct ingress: the C++ front (serving/native/, built by
    `make native`), grpc.aio in the replica (python), or native where built (auto)."""
    kiln_feedback_index_ids: int = Field(50_000_000, ge=1000)
    """Logged ids a FeedbackStore shard indexes (8 bytes each) before its oldest day leaves
    memory (actors/feedback.py `IdIndex`)."""
    kiln_api_key: str | None = Field(None, repr=False)
    """An admin API key to act as in registry changes; unset: the local user ("local")."""
    kiln_encrypt: bool = False
    """Encrypt every file Kiln writes to its storage (AES-256-GCM, a data key per file wrapped
    by KILN_MASTER_KEY); a store that holds encrypted files stays encrypted."""

    kiln_tls_cert: str | None = None
    """Server certificate (PEM) for every HTTP endpoint Kiln opens; with kiln_tls_key."""
    kiln_tls_key: str | None = Field(None, repr=False)
    """The certificate's private key (PEM, unencrypted)."""
    kiln_tls_ca: str | None = None
    """CA certificates (PEM) that callers' client certificates must chain to (mutual TLS)."""
    kiln_tls_inner_host: str = "127.0.0.1"
    """With TLS on a cluster: the address Serve (and its replicas' direct-ingress ports)
    binds behind each node's TLS frontend. 127.0.0.1 keeps every clear port on loopback; a
    multi-machine cluster with Serve's HAProxy ingress needs 0.0.0.0 (or the nodes' private
    network) for a node's HAProxy to reach replicas on other nodes (docs/security.md)."""

    @field_validator(
        "ray_address",
        "kiln_storage",
        "kiln_api_key",
        "kiln_tls_cert",
        "kiln_tls_key",
        "kiln_tls_ca",
    )
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @property
    def storage_uri(self) -> str:
        return self.kiln_storage or str(self.kiln_home.expanduser().resolve() / "storage")

    @property
    def registry_db(self) -> Path:
        return self.kiln_home.expanduser().resolve() / "registry.db"

    @property
    def embedded(self) -> bool:
        return self.ray_address is None

    def with_overrides(self, **overrides: object) -> Settings:
        """A copy with the CLI options that were given (None means not given)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return self.model_validate({**self.model_dump(), **given}) if given else self
