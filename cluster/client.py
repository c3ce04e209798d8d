"""The Python client: what the `kiln models|keys|audit` commands do, from a script or notebook.

    from kiln.client import Kiln
    k = Kiln()                          # embedded: the catalog under KILN_HOME, no Ray started
    k = Kiln(address="auto")            # a cluster: every call goes to its Registry actor
    k.alias("digits-mlp", 3, "production")
    key = k.create_key(["predict:digits-mlp"], expires="30d")   # key["secret"] is shown once

    k = Kiln(url="http://127.0.0.1:8000", key=KEY)   # a served app (cluster/http_client.py)
    k.predict("digits-mlp", rows)       # also explain, feedback, metrics, complete, chat

    k = Kiln("http://127.0.0.1:8265")   # a cluster's Jobs API (after `ray dashboard ...`)
    job = k.submit_train(data="sklearn:iris", model="logistic", register="iris-lr")
    k.wait(job); k.job_result(job)      # the `kiln train --json` summary of the job

The CLI is a thin layer over this class, so both do exactly the same thing. With a Ray address
(or `use_ray=True`, or by default when this process already runs Ray) every call goes to the
Registry actor. Otherwise the client runs the registry's own code (`RegistryService`)
in-process on the SQLite file: SQLite's write lock serializes it with a Registry actor using
the same file, and a catalog command needs no 5 s Ray start.

`url` is a served app's HTTP address (`kiln serve`): `predict`, `explain`, `feedback`,
`metrics`, `complete` and `chat` go there, with retries and one connection pool
(cluster/http_client.py); `Kiln(url=...)` alone opens no catalog and starts no Ray. Without
`url` those calls go to KILN_HTTP_HOST:KILN_HTTP_PORT.

An http(s) address is a cluster's Jobs API: `submit_train`, `submit_tune` and `deploy` run the
matching `kiln` command there as a Ray Job (cluster/jobs.py); registry calls then need a Ray
address instead, and say so.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ray

from kiln.actors.catalog import VersionRecord, parse_model_ref, parse_version_ref, validate_name
from kiln.actors.keys import parse_duration_s, parse_grace_s
from kiln.actors.registry import RegistryService
from kiln.http_client import RetryPolicy, ServingCalls
from kiln.options import COMMAND_OPTIONS
from kiln.settings import Settings
from kiln.training.errors import KilnError

logger = logging.getLogger(__name__)

# A CLI flag named in an error message: `--limit`, `--canary-weight`.
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


@contextmanager
def flags_as_keywords() -> Iterator[None]:
    """Errors name the `kiln` command's flags; from Python they are keyword arguments.

    The message stays the CLI's (one text for both); a note on the exception, shown under it
    in a traceback, tells a Python caller what the flag means here.
    """
    try:
        yield
    except KilnError as exc:
        flags = list(dict.fromkeys(FLAG.findall(str(exc))))
        note = (
            f"From Python: {', '.join(flags)} {'is' if len(flags) == 1 else 'are'} the kiln "
            "command's name for the matching keyword argument of this call."
        )
        if flags and note not in getattr(exc, "__notes__", ()):
            exc.add_note(note)
        raise


def iso_time(epoch_s: float | None) -> str | None:
    """UTC ISO 8601 with seconds, or None."""
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).isoformat(timespec="seconds")


class Kiln(ServingCalls):
    """Registry, keys and audit of one Kiln installation (embedded or on a Ray cluster), and
    the HTTP client of its served app (`url`)."""

    def __init__(
        self,
        address: str | None = None,
        home: str | Path | None = None,
        storage: str | None = None,
        key: str | None = None,
        settings: Settings | None = None,
        use_ray: bool | None = None,
        jobs_address: str | None = None,
        token: str | None = None,
        url: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        base = settings or Settings()
        self.jobs_address = jobs_address
        self.token = token
        self.url = url.rstrip("/") if url is not None else None
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self._transports = {}
        if address is not None and address.startswith(("http://", "https://")):
            self.jobs_address, address = address, None
            use_ray = False if use_ray is None else use_ray
        self.settings = base.with_overrides(
            ray_address=address, kiln_home=home, kiln_storage=storage
        )
        self.key = key if key is not None else self.settings.kiln_api_key
        self._local: RegistryService | None = None
        self._registry: Any = None
        self._started_ray = False
        self._jobs: Any = None
        if self.jobs_address is not None and not use_ray:
            return  # a Jobs API client only: no catalog is opened on this machine
        if url is not None and use_ray is None and address is None and home is None:
            return  # a served app's client only: no catalog, no Ray
        if use_ray is None:
            use_ray = self.settings.ray_address is not None or ray.is_initialized()
        if not use_ray:
            self._local = RegistryService(
                str(self.settings.registry_db), self.settings.storage_uri, recover=False
            )
        else:
            self._connect(home_given=home is not None)

    def _connect(self, home_given: bool) -> None:
        from kiln.runtime import init_ray, registry_for

        self._started_ray = init_ray(self.settings)
        self._registry = registry_for(self.settings)
        actual = ray.get(self._registry.get_db_path.remote())
        if home_given and Path(actual) != self.settings.registry_db:
            raise KilnError(
                f"the Registry actor on this Ray uses {actual}, not {self.settings.registry_db}. "
                "Leave --home unset, or use the KILN_HOME the cluster was started with."
            )

    @property
    def uses_ray(self) -> bool:
        return self._registry is not None

    def close(self) -> None:
        self._close_serving()
        if self._local is not None:
            self._local.close()
        if self._started_ray:
            ray.shutdown()  # only the connection: Serve and the registry stay on the cluster

    def __enter__(self) -> Kiln:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One registry operation, in-process or on the Registry actor, with clean errors."""
        if self._local is None and self._registry is None and self.jobs_address is None:
            raise KilnError(
                f"Kiln(url={self.url!r}) talks to a served app only; registry calls need the "
                'catalog: Kiln(home=...) on this machine, or Kiln(address="auto") on a node '
                "of the cluster (url= may be given as well)."
            )
        if self._local is None and self._registry is None:
            raise KilnError(
                f"Kiln({self.jobs_address!r}) talks to the Jobs API only; registry calls need "
                "the cluster's Ray address: Kiln(address=\"auto\") on a node, or a job's "
                "result with job_result(job_id)."
            )
        with flags_as_keywords():
            if self._local is not None:
                return getattr(self._local, method)(*args, **kwargs)
            try:
                return ray.get(getattr(self._registry, method).remote(*args, **kwargs))
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, KilnError):
                    raise exc.cause from None
                raise

    # ------------------------------------------------------------------ models

    def models(self) -> list[dict[str, Any]]:
        return self._call("list_models")

    def versions(self, name: str) -> list[dict[str, Any]]:
        records: list[VersionRecord] = self._call("list_versions", validate_name(name))
        aliases = self._call("aliases", name)
        return [
            {**r.to_dict(), "aliases": sorted(a for a, v in aliases.items() if v == r.version)}
            for r in records
        ]

    def resolve(self, ref: str) -> VersionRecord:
        parse_model_ref(ref)
        return self._call("resolve", ref)

    def show(self, ref: str) -> dict[str, Any]:
        record = self.resolve(ref)
        aliases = self._call("aliases", record.name)
        return {
            **record.to_dict(),
            "aliases": sorted(a for a, v in aliases.items() if v == record.version),
            "log_policy": self._call("log_policy", record.name),
        }

    def compare(self, name: str) -> list[dict[str, Any]]:
        """`kiln models compare NAME`: every active version's score, parameters, bytes, latency
        per backend, lineage and Pareto flag (cluster/compare.py)."""
        from kiln.compare import compare_rows

        versions = self.versions(name)
        profiles = self._call("profiles", name)
        return compare_rows(versions, profiles, self._call("get_storage_uri"))

    def profiles(self, name: str, version: int | None = None) -> list[dict[str, Any]]:
        """The recorded latency profiles of a model (or one version), one per backend."""
        return self._call("profiles", validate_name(name), version)

    def profile(self, ref: str, backend: str = "torch", num_cpus: float = 1.0) -> dict[str, Any]:
        """Measure a version's latency profile and record it (replacing the backend's last).

        With Ray it runs in a Ray task holding `num_cpus` CPUs, as at registration; an
        embedded client without Ray measures in this process with as many torch threads.
        """
        from kiln.profiling import measure_version, profile_version

        record = self.resolve(ref)
        storage_uri = self._call("get_storage_uri")
        if self._registry is not None:
            found = profile_version(
                storage_uri, record, backend, num_cpus, registry=self._registry, key=self.key
            )
        else:
            found = measure_version(record, storage_uri, backend, num_cpus)
            self._call(
                "record_profile", record.name, record.version, found["backend"], found, key=self.key
            )
        return {"ref": record.ref, "backend": found["backend"], "profile": found}

    def record_event(self, action: str, target: str, detail: dict[str, Any] | None = None) -> None:
        """An audited decision made outside the catalog (e.g. the SLO choice of kiln serve)."""
        self._call("record_event", action, target, detail, key=self.key)

    def register(
        self,
        name: str,
        files: dict[str, bytes],
        spec: dict[str, Any],
        metrics: dict[str, Any],
        lineage: dict[str, Any],
        request_id: str | None = None,
    ) -> VersionRecord:
        """A new version; the request id makes a retried call register it once."""
        request_id = request_id or uuid.uuid4().hex
        return self._call(
            "register",
            name,
            files,
            spec,
            metrics,
            lineage,
            key=self.key,
            request_id=request_id,
        )

    def export(
        self,
        ref: str,
        format: str = "onnx",
        quantize: str | None = None,
        data: str | None = None,
    ) -> dict[str, Any]:
        """`kiln export REF`: the version as ONNX, checked against torch on its test rows;
        fp32 joins the version, `quantize="int8"` registers a new version. Returns the
        `kiln export --json` summary. It loads the version's dataset into ShardStore actors,
        so an embedded client starts a local Ray for the call."""
        from kiln.exporting import ExportRequest, export_version
        from kiln.runtime import ray_session, registry_for

        with flags_as_keywords():
            request = ExportRequest(
                ref=ref, format=format, quantize=quantize, data=data, key=self.key
            )
            request.check_against(self.resolve(ref))
            if self._registry is not None:
                return export_version(self.settings, request, self._registry).to_dict()
            with ray_session(self.settings):
                return export_version(self.settings, request, registry_for(self.settings)).to_dict()

    def alias(self, name: str, version: int, alias: str) -> dict[str, Any]:
        return self._call("set_alias", validate_name(name), alias, int(version), key=self.key)

    def log_policy(self, name: str) -> dict[str, Any] | None:
        """NAME's prediction-log policy ({"mask": [...], "drop": [...], "mask_text": bool}),
        None without one."""
        return self._call("log_policy", validate_name(name))

    def set_log_policy(
        self,
        name: str,
        mask: list[str] | None = None,
        drop: list[str] | None = None,
        mask_text: bool = False,
    ) -> dict[str, Any]:
        """Replace NAME's prediction-log policy (nothing given: remove it); replicas apply it
        from their next start or reconfigure (kiln serve, kiln deploy). Needs admin."""
        return self._call(
            "set_log_policy",
            validate_name(name),
            list(mask or []),
            list(drop or []),
            bool(mask_text),
            key=self.key,
        )

    def unalias(self, name: str, alias: str) -> dict[str, Any]:
        return self._call("remove_alias", validate_name(name), alias, key=self.key)

    def delete(self, ref: str, force: bool = False) -> dict[str, Any]:
        name, version = parse_version_ref(ref)
        return self._call("delete_version", name, version, force, key=self.key)

    def archive(self, ref: str, force: bool = False) -> dict[str, Any]:
        name, version = parse_version_ref(ref)
        return self._call("archive_version", name, version, force, key=self.key)

    def unarchive(self, ref: str) -> dict[str, Any]:
        name, version = parse_version_ref(ref)
        return self._call("unarchive_version", name, version, key=self.key)

    # ------------------------------------------------------------------ keys and audit

    def create_key(
        self,
        scopes: list[str],
        expires: str | None = None,
        expires_in_s: float | None = None,
    ) -> dict[str, Any]:
        """`{"id", "secret", "scopes", "expires"}`; `expires` like "30d", "12h" or "90m"."""
        if expires is not None:
            with flags_as_keywords():
                expires_in_s = parse_duration_s(expires)
        made = self._call("create_key", list(scopes), expires_in_s, key=self.key)
        return {
            "id": made["id"],
            "secret": made["secret"],
            "scopes": made["scopes"],
            "expires": iso_time(made["expires_at"]),
        }

    def keys(self) -> list[dict[str, Any]]:
        return [self._public_key(k) for k in self._call("list_keys", key=self.key)]

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        return self._public_key(self._call("revoke_key", key_id, key=self.key))

    def rotate_key(self, key_id: str, grace: str = "1h") -> dict[str, Any]:
        """A new secret with `key_id`'s scopes; the old one stays valid for `grace` ("1h",
        "30m", "7d" or "0"). `{"id", "secret", "scopes", "expires", "replaces", "old_expires"}`."""
        with flags_as_keywords():
            grace_s = parse_grace_s(grace)
        made = self._call("rotate_key", key_id, grace_s, key=self.key)
        return {
            "id": made["id"],
            "secret": made["secret"],
            "scopes": made["scopes"],
            "expires": iso_time(made["expires_at"]),
            "replaces": made["replaces"],
            "old_expires": iso_time(made["old_expires_at"]),
        }

    @staticmethod
    def _public_key(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": row["id"],
            "scopes": row["scopes"],
            "status": row["status"],
            "created": iso_time(row["created_at"]),
            "created_by": row["created_by"],
            "expires": iso_time(row["expires_at"]),
            "revoked": iso_time(row["revoked_at"]),
            "last_used": iso_time(row.get("last_used_at")),
            "unused_warning": bool(row.get("unused_warning", False)),
        }

    def audit(self, limit: int = 100, action: str | None = None) -> list[dict[str, Any]]:
        if limit < 1:
            with flags_as_keywords():
                raise KilnError(f'Got "{limit}" for --limit. --limit must be at least 1.')
        entries = self._call("audit", limit, action, key=self.key)
        return [{**e, "at": iso_time(e["at"])} for e in entries]

    # ------------------------------------------------------------------ monitoring

    def monitor(self, name: str, window: str = "1h") -> dict[str, Any]:
        """What `kiln monitor NAME --json` prints: per logged version, traffic, latency,
        quality from feedback, drift and cost over the window (actors/monitor.py)."""
        from kiln.monitoring import model_report

        return model_report(self, name, window)

    # ------------------------------------------------------------------ jobs on a cluster

    @property
    def jobs(self) -> Any:
        """The cluster's Jobs API client (kiln.jobs.JobsClient), made on first use."""
        if self._jobs is None:
            from kiln.jobs import JobsClient

            self._jobs = JobsClient(self.jobs_address, self.token)
        return self._jobs

    def submit(self, argv: list[str], env_vars: dict[str, str] | None = None) -> str:
        """Any `kiln ...` command line as a Ray Job; returns the job id."""
        return self.jobs.submit(argv, env_vars)

    def submit_train(self, env_vars: dict[str, str] | None = None, **options: Any) -> str:
        """`kiln train --json` on the cluster, options as keywords: data=, model=, workers= ..."""
        return self.submit(["kiln", "train", *command_args("train", options), "--json"], env_vars)

    def submit_tune(self, env_vars: dict[str, str] | None = None, **options: Any) -> str:
        """`kiln tune --json` on the cluster (a sweep), options as keywords."""
        return self.submit(["kiln", "tune", *command_args("tune", options), "--json"], env_vars)

    def submit_compress(
        self, ref: str, env_vars: dict[str, str] | None = None, **options: Any
    ) -> str:
        """`kiln compress REF --json` on the cluster: quantize="int8", prune=0.5, distill=True,
        student="mlp:64", ... as keywords; its result names the variant registered."""
        args = ["kiln", "compress", ref, *command_args("compress", options), "--json"]
        return self.submit(args, env_vars)

    def submit_federate(self, env_vars: dict[str, str] | None = None, **options: Any) -> str:
        """`kiln federate --json` on the cluster: data=, clients=, partition="dirichlet:0.5",
        strategy=, secure_agg=True, dp_clip=, dp_noise= ... as keywords."""
        args = ["kiln", "federate", *command_args("federate", options), "--json"]
        return self.submit(args, env_vars)

    def deploy(
        self, models: list[str], env_vars: dict[str, str] | None = None, **serve_options: Any
    ) -> str:
        """`kiln serve MODELS ...` on the cluster: it deploys and returns; the app stays up."""
        if not models:
            raise KilnError("Give deploy() one or more models: NAME, NAME@VERSION or NAME@ALIAS.")
        argv = ["kiln", "serve", *models, *command_args("serve", serve_options)]
        return self.submit(argv, env_vars)

    def wait(self, job_id: str, timeout_s: float = 3600.0) -> str:
        """Block until the job ends; returns SUCCEEDED, FAILED or STOPPED."""
        return str(self.jobs.wait(job_id, timeout_s).status)

    def job_status(self, job_id: str) -> str:
        return str(self.jobs.info(job_id).status)

    def job_logs(self, job_id: str) -> str:
        return str(self.jobs.logs(job_id))

    def job_result(self, job_id: str) -> dict[str, Any]:
        """The JSON summary a finished `--json` job printed (train: model, version, metrics)."""
        from kiln.jobs import last_json_line

        info = self.jobs.info(job_id)
        if info.status != "SUCCEEDED":
            raise KilnError(
                f"job {job_id} is {info.status}{': ' + info.message if info.message else ''}; "
                f"see kiln jobs logs {job_id}"
            )
        found = last_json_line(self.job_logs(job_id))
        if found is None:
            raise KilnError(f"job {job_id} printed no JSON result; was it run with --json?")
        return found

    def stop_job(self, job_id: str) -> bool:
        return bool(self.jobs.stop(job_id))


def command_args(command: str, options: dict[str, Any]) -> list[str]:
    """Keyword options as `kiln COMMAND` flags, checked against that command's own options.

    `epochs=3` -> `--epochs 3`, `auth=False` -> `--no-auth`, a list repeats the flag. A name
    the command does not take fails here, before anything is submitted.
    """
    known = COMMAND_OPTIONS.get(command)
    args: list[str] = []
    for name, value in options.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if known is not None and flag not in known and f"--no-{flag[2:]}" not in known:
            raise KilnError(
                f'Got "{name}" for kiln {command}, which has no {flag} option. '
                f"Options: {', '.join(sorted(k[2:].replace('-', '_') for k in known))}."
            )
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list | tuple):
            for item in value:
                args += [flag, str(item)]
        else:
            args += [flag, str(value)]
    return args
