"""`kiln ui`: the web console on this machine, over the embedded default's registry and
storage (or a cluster's, with --address), without deploying a model (serving/console/)."""

from __future__ import annotations

import socket
from typing import Annotated

import typer

from cluster.cli.common import (
    AddressOpt,
    HomeOpt,
    StorageOpt,
    app,
    connected,
    console,
    load_settings,
)
from training.errors import KilnError

DEFAULT_PORT = 8080


def check_port(host: str, port: int) -> None:
    """One line now rather than uvicorn's log after Ray has started."""
    if not 1 <= port <= 65535:
        raise KilnError(f'Got "{port}" for --port. Use a port between 1 and 65535.')
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise KilnError(
                f"cannot listen on {host}:{port} ({exc.strerror}); choose another with --port"
            ) from exc


@app.command("ui")
def ui(
    port: Annotated[int, typer.Option(help="HTTP port of the console.")] = DEFAULT_PORT,
    host: Annotated[
        str, typer.Option(help="Interface to listen on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    auth: Annotated[
        bool, typer.Option(help="Ask for an API key (kiln keys create) and show what it may see.")
    ] = True,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
) -> None:
    """Serve the web console (models, versions, variants, monitoring, sweeps, explanations)
    at http://HOST:PORT/ui until Ctrl-C."""
    import uvicorn

    from cluster.runtime import registry_for
    from serving.console.standalone import build_console_app
    from serving.schemas import AUTH_OFF_WARNING

    settings = load_settings(address=address, home=home, storage=storage)
    check_port(host, port)
    with connected(settings):
        application = build_console_app(registry_for(settings), auth=auth)
        if not auth:
            console.print(f"[yellow]{AUTH_OFF_WARNING}[/yellow]")
        console.print(f"Kiln console at http://{host}:{port}/ui (Ctrl-C stops it)")
        uvicorn.run(application, host=host, port=port, log_level="warning")
