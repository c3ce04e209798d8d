"""`kiln submit` and `kiln jobs ...`: Kiln commands as Ray Jobs on a cluster."""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from kiln.cli.common import (
    DEBUG,
    JobsAddressOpt,
    JsonOpt,
    TokenOpt,
    app,
    console,
    jobs_app,
    output,
    short_time,
)
from kiln.training.errors import KilnError

# ----------------------------------------------------------------------------- jobs


@app.command(no_args_is_help=True)
def submit(
    entrypoint: Annotated[
        list[str], typer.Argument(help="The command after --, e.g. -- kiln train --data ...")
    ],
    wait: Annotated[
        bool, typer.Option(help="Follow the job's logs; exit 0 only if it succeeds.")
    ] = False,
    env: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE for the job (repeat), e.g. KILN_HOME=...")
    ] = None,
    job_id: Annotated[str | None, typer.Option(help="Submission id (default: generated).")] = None,
    as_json: JsonOpt = False,
    address: JobsAddressOpt = None,
    token: TokenOpt = None,
) -> None:
    """Run a command on the cluster as a Ray Job, with this checkout as its working_dir."""
    from kiln.jobs import JobsClient, parse_env

    quiet_ray_logs()
    client = JobsClient(address, token)
    submitted = client.submit(entrypoint, parse_env(env or []), submission_id=job_id)
    console.print(f"submitted {submitted} to {client.address}")
    if not wait:
        output({"job_id": submitted, "status": "PENDING"}, as_json, lambda job: job["job_id"])
        return
    for chunk in client.follow(submitted):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    info = client.wait(submitted, timeout_s=60)
    output(info.to_dict(), as_json, lambda _: None)
    console.print(f"job {submitted} {info.status}{': ' + info.message if info.message else ''}")
    if info.status != "SUCCEEDED":
        raise typer.Exit(1)


def quiet_ray_logs() -> None:
    """Ray's client logs each file it leaves out of a job's working_dir at INFO."""
    if not DEBUG["on"]:
        logging.getLogger("ray").setLevel(logging.WARNING)


@jobs_app.command("list")
def jobs_list(
    as_json: JsonOpt = False, address: JobsAddressOpt = None, token: TokenOpt = None
) -> None:
    """Every job of the cluster, oldest first."""
    from kiln.jobs import JobsClient

    jobs = JobsClient(address, token).list()
    output([j.to_dict() for j in jobs], as_json, jobs_table)


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    from kiln.client import iso_time

    table = Table("id", "status", "started (UTC)", "ended", "entrypoint")
    for j in jobs:
        table.add_row(
            j["job_id"],
            j["status"],
            short_time(iso_time(j["start_time_s"])),
            short_time(iso_time(j["end_time_s"])),
            j["entrypoint"][:60],
        )
    return table


@jobs_app.command("logs")
def jobs_logs(
    job_id: Annotated[str, typer.Argument(metavar="ID", help="The job id (kiln jobs list).")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until it ends.")] = False,
    address: JobsAddressOpt = None,
    token: TokenOpt = None,
) -> None:
    """A job's output (driver stdout and stderr)."""
    from kiln.jobs import JobsClient

    client = JobsClient(address, token)
    chunks = client.follow(job_id) if follow else iter([client.logs(job_id)])
    for chunk in chunks:
        sys.stdout.write(chunk)
        sys.stdout.flush()


@jobs_app.command("stop")
def jobs_stop(
    job_id: Annotated[str, typer.Argument(metavar="ID", help="The job id (kiln jobs list).")],
    as_json: JsonOpt = False,
    address: JobsAddressOpt = None,
    token: TokenOpt = None,
) -> None:
    """Stop a running job (SIGTERM to its driver, then SIGKILL)."""
    from kiln.jobs import JobsClient

    client = JobsClient(address, token)
    if not client.stop(job_id):
        status = client.info(job_id).status
        raise KilnError(f'Got "{job_id}": that job already ended ({status}); nothing to stop.')
    output({"job_id": job_id, "stopping": True}, as_json, lambda r: f"stopping {r['job_id']}")
