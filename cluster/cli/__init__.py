"""The `kiln` command line: one module per command group (train, serve, data, registry, jobs)
around the shared apps and helpers in `common`.

Errors a user can act on print as one line on stderr with a non-zero exit; `--debug` anywhere
on the command line shows the traceback instead and streams the Ray workers' logs.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

import typer
from rich.logging import RichHandler
from typer._click import exceptions as click_errors  # typer vendors click since 0.20

# Importing the command modules registers their commands, in this order, on the apps.
# isort: off
from kiln.cli import train  # noqa: E402,F401
from kiln.cli import serve  # noqa: E402,F401
from kiln.cli import data  # noqa: E402,F401
from kiln.cli import registry  # noqa: E402,F401
from kiln.cli import compress  # noqa: E402,F401
from kiln.cli import export  # noqa: E402,F401
from kiln.cli import explain  # noqa: E402,F401
from kiln.cli import federate  # noqa: E402,F401
from kiln.cli import jobs  # noqa: E402,F401
from kiln.cli import monitor  # noqa: E402,F401
from kiln.cli import retrain  # noqa: E402,F401
from kiln.cli import autopilot  # noqa: E402,F401
from kiln.cli import ui  # noqa: E402,F401
from kiln.cli import security  # noqa: E402,F401

# isort: on
from kiln.cli.common import DEBUG, app, console
from kiln.training.errors import KilnError

__all__ = ["app", "main", "user_error"]

# ----------------------------------------------------------------------------- entry point


def user_error(exc: BaseException) -> KilnError | None:
    """The KilnError in an exception chain, found by type alone (never by module name).

    Ray wraps an error raised in an actor or a worker: the RayTaskError it raises derives from
    the error's own class too, but its text carries the remote traceback, so the search looks
    through any wrapper that keeps the original as `cause` and returns the original.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        inner = getattr(current, "cause", None)
        if isinstance(inner, BaseException):
            current = inner
        elif isinstance(current, KilnError):
            return current
        else:
            current = current.__cause__
    return exc if isinstance(exc, KilnError) else None


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def usage_message(exc: click_errors.UsageError) -> str:
    """Typer's parse error as one line that names the bad value and where to look."""
    command = exc.ctx.command_path if exc.ctx else "kiln"
    message = one_line(exc.format_message()).rstrip(".")
    param = getattr(exc, "param", None)
    errors = getattr(exc.__cause__, "errors", None)
    if param is not None and callable(errors) and errors():
        option = "/".join(param.opts) if getattr(param, "opts", None) else param.name
        message = f'Got "{errors()[0].get("input")}" for {option}: {errors()[0]["msg"]}'
    return f"{message}. See '{command} --help'."


def run() -> None:
    """The `kiln` console script: `main()`, then the exit handlers, then the process ends
    without tearing the interpreter down (with torch and Ray loaded that took 0.95 s of
    every command; the handlers took 14 ms). An unexpected exception under --debug takes
    Python's own way out, with its traceback."""
    try:
        main()
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:  # sys.exit("message"): printed, status 1, as Python does
            print(exc.code, file=sys.stderr)
            code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    DEBUG["on"] = "--debug" in args
    args = [a for a in args if a != "--debug"]
    logging.basicConfig(
        level=logging.INFO if DEBUG["on"] else logging.WARNING,
        handlers=[RichHandler(console=console, show_path=False)],
        format="%(message)s",
    )
    try:
        # Outside standalone mode click returns a command's typer.Exit code instead of exiting.
        code = app(args=args, prog_name="kiln", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except click_errors.UsageError as exc:
        print(f"kiln: {usage_message(exc)}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("kiln: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if DEBUG["on"]:
            raise
        found = user_error(exc)
        if found is not None:
            print(f"kiln: {one_line(str(found))}", file=sys.stderr)
            sys.exit(2)
        print(
            f"kiln: {type(exc).__name__}: {one_line(str(exc))[:300]} "
            "(rerun with --debug for details)",
            file=sys.stderr,
        )
        sys.exit(1)
