"""Kiln commands as Ray Jobs: submit, follow, list and stop them through a cluster's Jobs API.

A job is a `kiln ...` command line run on the cluster by Ray's job supervisor, with this
project's code uploaded as the runtime_env working_dir (so the job runs exactly the code the
submitter has, without a redeploy) and the job's Kiln settings as env vars. Inside the job
RAY_ADDRESS points at the cluster, so `kiln train` there joins it instead of starting a Ray.

Ray 2.60 clusters use token authentication by default. Ray's own client sends the token only
when this process runs with RAY_AUTH_MODE=token; Kiln instead finds the token itself (an
explicit token, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token, Ray's own order)
and sends it as the Authorization header, which Ray's client then leaves alone. A cluster
without auth ignores the header.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.training.errors import KilnError

logger = logging.getLogger(__name__)

DEFAULT_JOBS_ADDRESS = "http://127.0.0.1:8265"
# What never goes to the cluster: local environments, git objects, caches, local state.
WORKING_DIR_EXCLUDES = [
    ".venv",
    ".git",
    "**/__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "*.egg-info",
    ".issue.txt",
]
# How long a submit waits for the job agent of a head that has just started.
AGENT_WAIT_S = 60.0
TERMINAL_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}
TOKEN_HELP = (
    "Copy the cluster's token (on the head: ray get-auth-token, or ~/.ray/auth_token) into "
    "~/.ray/auth_token here, or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
)


def project_root() -> Path:
    """The checkout holding cluster/, actors/, ...: what a job's working_dir uploads."""
    return Path(__file__).resolve().parents[1]


def jobs_address(address: str | None = None) -> str:
    """The Jobs API URL: --address, else RAY_ADDRESS when it is an http(s) URL, else local.

    RAY_ADDRESS usually holds the GCS address (host:6379 or "auto") that `kiln train` joins;
    only an http(s) value there names the dashboard, as it does for `ray job submit`.
    """
    if address is None:
        env = os.environ.get("RAY_ADDRESS", "")
        address = env if env.startswith(("http://", "https://")) else DEFAULT_JOBS_ADDRESS
    if address in ("auto", "local") or address.startswith("ray://"):
        raise KilnError(
            f'Got "{address}" for --address. Job submission needs the dashboard URL, '
            f"e.g. {DEFAULT_JOBS_ADDRESS} (ray dashboard CLUSTER.yaml forwards it there)."
        )
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def resolve_token(token: str | None = None) -> str | None:
    """The cluster token to send, in Ray's own order; None when there is none to send."""
    if token:
        return token.strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if token_path:
        path = Path(token_path).expanduser()
        if not path.is_file():
            raise KilnError(
                f'Got "{token_path}" for RAY_AUTH_TOKEN_PATH, which is not a file. '
                "Point it at the cluster's token file, or unset it."
            )
        return path.read_text().strip()
    default = Path.home() / ".ray" / "auth_token"
    return default.read_text().strip() if default.is_file() else None


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    status: str
    entrypoint: str
    message: str
    start_time_s: float | None
    end_time_s: float | None

    @classmethod
    def from_details(cls, details: Any) -> JobInfo:
        def seconds(ms: int | None) -> float | None:
            return ms / 1000 if ms else None

        return cls(
            job_id=details.submission_id or details.job_id or "",
            status=str(details.status.value),
            entrypoint=details.entrypoint,
            message=details.message or "",
            start_time_s=seconds(details.start_time),
            end_time_s=seconds(details.end_time),
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class JobsClient:
    """One cluster's Jobs API, with token auth and one-line errors."""

    def __init__(self, address: str | None = None, token: str | None = None) -> None:
        from ray.job_submission import JobSubmissionClient

        self.address = jobs_address(address)
        found = resolve_token(token)
        headers = {"Authorization": f"Bearer {found}"} if found else {}
        self._client = self._guard(lambda: JobSubmissionClient(self.address, headers=headers))

    def _guard(self, call: Callable[[], Any]) -> Any:
        """Run one Jobs API call; auth and connection failures become one clear line."""
        from ray.exceptions import AuthenticationError

        try:
            return call()
        except AuthenticationError as exc:
            raise KilnError(auth_error_message(self.address, str(exc))) from None
        except ConnectionError as exc:
            raise KilnError(
                f"cannot reach the Ray Jobs API at {self.address}. Start the cluster, or "
                "forward its dashboard (ray dashboard CLUSTER.yaml) and pass --address."
            ) from exc
        except RuntimeError as exc:
            text = " ".join(str(exc).split())
            if "does not exist" in text or "404" in text:
                raise KilnError(f"{text[:200]}. See `kiln jobs list`.") from None
            raise

    def submit(
        self,
        argv: list[str],
        env_vars: dict[str, str] | None = None,
        submission_id: str | None = None,
        working_dir: Path | None = None,
    ) -> str:
        """Start `argv` on the cluster with the project as working_dir; returns the job id."""
        if not argv:
            raise KilnError("Give the command to run after --, e.g. kiln submit -- kiln train ...")
        job_id = submission_id or new_job_id(argv)
        runtime_env: dict[str, Any] = {
            "working_dir": str(working_dir or project_root()),
            "excludes": WORKING_DIR_EXCLUDES,
            "env_vars": dict(env_vars or {}),
        }
        logger.info("submitting %s as %s to %s", shlex.join(argv), job_id, self.address)
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return self._guard(
                    lambda: self._client.submit_job(
                        entrypoint=shlex.join(argv), runtime_env=runtime_env, submission_id=job_id
                    )
                )
            except RuntimeError as exc:
                # A head that just started answers before its job agent is up.
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def info(self, job_id: str) -> JobInfo:
        return JobInfo.from_details(self._guard(lambda: self._client.get_job_info(job_id)))

    def list(self) -> list[JobInfo]:
        jobs = [JobInfo.from_details(d) for d in self._guard(self._client.list_jobs)]
        return sorted(jobs, key=lambda j: j.start_time_s or 0.0)

    def logs(self, job_id: str) -> str:
        return self._guard(lambda: self._client.get_job_logs(job_id))

    def stop(self, job_id: str) -> bool:
        return bool(self._guard(lambda: self._client.stop_job(job_id)))

    def follow(self, job_id: str) -> Iterator[str]:
        """The job's log as it is written, until the job ends."""
        self.info(job_id)  # an unknown id fails here, with a clear line
        stream = self._client.tail_job_logs(job_id)
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    yield loop.run_until_complete(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(stream.aclose())
            loop.close()

    def wait(self, job_id: str, timeout_s: float = 3600.0, interval_s: float = 0.5) -> JobInfo:
        """Poll until the job ends; raises KilnError when it is still running at the deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.info(job_id)
            if info.status in TERMINAL_STATES:
                return info
            if time.monotonic() > deadline:
                raise KilnError(
                    f"job {job_id} is still {info.status} after {timeout_s:.0f} s; "
                    f"follow it with kiln jobs logs {job_id} --follow"
                )
            time.sleep(interval_s)


def auth_error_message(address: str, detail: str) -> str:
    if "invalid or incorrect" in detail or "Forbidden" in detail:
        return f"the Ray cluster at {address} refused this token. {TOKEN_HELP}."
    return f"the Ray cluster at {address} requires a token and none was found. {TOKEN_HELP}."


def new_job_id(argv: list[str]) -> str:
    """`kiln-train-20250131-120000-3f2a9c`: readable in `kiln jobs list`, unique."""
    command = argv[1] if len(argv) > 1 and Path(argv[0]).name == "kiln" else "job"
    command = "".join(c if c.isalnum() else "-" for c in command)[:20]
    return f"kiln-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def last_json_line(log: str) -> dict[str, Any] | None:
    """The result a `kiln ... --json` job printed as its last JSON line, if any."""
    import json

    for line in reversed(log.strip().splitlines()):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def parse_env(pairs: list[str]) -> dict[str, str]:
    """`["KILN_HOME=/data/kiln", ...]` -> a dict; a pair without "=" is refused."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise KilnError(f'Got "{pair}" for --env. Use KEY=VALUE, e.g. --env KILN_HOME=/data.')
        env[key] = value
    return env
