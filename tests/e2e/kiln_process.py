"""Running `kiln` as a user does: commands as subprocesses on their own embedded Ray.

`KilnServe` starts `kiln serve` in a process group of its own, waits until it answers, and
stops it with SIGINT (Ctrl-C) like a person at the terminal. It records every process of that
Ray while it runs, so a test can check that none outlives the command.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

KILN = [str(Path(sys.executable).with_name("kiln"))]
"""The `kiln` script the package installs (the one a user's shell finds)."""


def files_holding(folder: Path, needle: bytes, pattern: str = "*") -> list[Path]:
    """The files under `folder` whose bytes contain `needle` (a byte search of the storage)."""
    return [p for p in folder.rglob(pattern) if p.is_file() and needle in p.read_bytes()]


def kiln_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    """The environment of a user's shell: KILN_HOME and the HTTP port, no RAY_ADDRESS. No
    gRPC port (KILN_GRPC_PORT=0) unless `extra` gives one: tests running at once would all
    open 9000, the default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST"))}
    env.update(
        KILN_HOME=str(home),
        KILN_HTTP_PORT=str(port),
        OMP_NUM_THREADS="1",
        **{"KILN_GRPC_PORT": "0", **extra},
    )
    home.mkdir(parents=True, exist_ok=True)  # also the commands' working directory
    return env


def kiln(env: dict[str, str], *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    """Run one `kiln` command to its end; its output is kept for the assertion message."""
    return subprocess.run(
        [*KILN, *args],
        env=env,
        cwd=env["KILN_HOME"],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def kiln_json(env: dict[str, str], *args: str, timeout_s: float = 300) -> dict[str, Any]:
    done = kiln(env, *args, "--json", timeout_s=timeout_s)
    assert done.returncode == 0, f"kiln {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class KilnServe:
    """`kiln serve ARGS` in its own process group, stopped with Ctrl-C."""

    env: dict[str, str]
    args: list[str]
    log_path: Path
    process: subprocess.Popen | None = None
    ray_processes: dict[int, float] = field(default_factory=dict)
    """pid -> create time of every process under `kiln serve` seen while it ran."""
    sigint_ignored: bool = False
    """Start it as a script's background job starts: with SIGINT ignored (inherited)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['KILN_HTTP_PORT']}"

    def start(self, timeout_s: float = 180) -> KilnServe:
        self.start_in_background()
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"kiln serve exited {self.process.returncode}:\n{self.log()}")
            if "Ctrl-C stops" in self.log() and self.answers():
                self.record_processes()
                return self
            time.sleep(0.5)
        raise AssertionError(f"kiln serve did not answer within {timeout_s} s:\n{self.log()}")

    def start_in_background(self) -> None:
        """Start the command and return at once (`start` also waits until it answers)."""
        log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [*KILN, "serve", *self.args],
            env=self.env,
            cwd=self.env["KILN_HOME"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=ignore_sigint if self.sigint_ignored else None,
        )

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/v1/models", timeout=5).status_code in (200, 401)
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def record_processes(self) -> None:
        """Every descendant of the command now (raylet, GCS, workers, replicas, HAProxy)."""
        assert self.process is not None
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                self.ray_processes[child.pid] = child.create_time()
            except psutil.NoSuchProcess:
                continue

    def survivors(self) -> list[str]:
        """The recorded processes still alive (the same pid and start time), described."""
        alive = []
        for pid, created in self.ray_processes.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{pid} {' '.join(proc.cmdline())[:120]}")
            except psutil.NoSuchProcess:
                continue
        return alive

    def interrupt(self, timeout_s: float = 60) -> int:
        """Ctrl-C: SIGINT to the command alone (a terminal sends it to the foreground group,
        which Ray's own processes are not in) and wait for it to exit."""
        assert self.process is not None
        self.record_processes()
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"kiln serve ignored Ctrl-C for {timeout_s} s") from exc

    def kill(self) -> None:
        """Last resort after a failed test: the whole group and everything recorded."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        for pid, created in self.ray_processes.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created:
                    proc.kill()
            except psutil.NoSuchProcess:
                continue


@dataclass
class KilnServeTls(KilnServe):
    """`kiln serve ... --tls-self-signed`: answers over HTTPS, trusting the certificate the
    command wrote into its KILN_HOME."""

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.env['KILN_HTTP_PORT']}"

    @property
    def ca(self) -> Path:
        return Path(self.env["KILN_HOME"]) / "tls" / "self-signed.crt"

    def answers(self) -> bool:
        if not self.ca.is_file():
            return False
        try:
            verify = ssl.create_default_context(cafile=str(self.ca))
            reply = httpx.get(f"{self.url}/v1/models", timeout=5, verify=verify)
            return reply.status_code in (200, 401)
        except httpx.HTTPError:
            return False
