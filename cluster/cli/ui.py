"""`kiln ui`: the web console on this machine, over the embedded default's registry and
storage (or a cluster's, with --address), without deploying a model (serving/console/)."""

from __future__ import annotations

import threading
from typing import Annotated

import typer

from kiln.cli.common import (
    AddressOpt,
    HomeOpt,
    StorageOpt,
    TlsCaOpt,
    TlsCertOpt,
    TlsKeyOpt,
    TlsSelfSignedOpt,
    app,
    check_port,
    connected,
    console,
    load_settings,
    tls_files,
)

DEFAULT_PORT = 8080


@app.command("ui")
def ui(
    port: Annotated[int, typer.Option(help="HTTP port of the console.")] = DEFAULT_PORT,
    host: Annotated[
        str, typer.Option(help="Interface to listen on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    auth: Annotated[
        bool, typer.Option(help="Ask for an API key (kiln keys create) and show what it may see.")
    ] = True,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_ca: TlsCaOpt = None,
    tls_self_signed: TlsSelfSignedOpt = False,
    address: AddressOpt = None,
    home: HomeOpt = None,
    storage: StorageOpt = None,
) -> None:
    """Serve the web console (models, versions, variants, monitoring, sweeps, explanations)
    at http://HOST:PORT/ui until Ctrl-C."""
    import uvicorn

    from kiln.runtime import registry_for
    from kiln.serving.console.standalone import build_console_app
    from kiln.serving.schemas import AUTH_OFF_WARNING

    settings = load_settings(address=address, home=home, storage=storage)
    tls = tls_files(settings, tls_cert, tls_key, tls_ca, tls_self_signed)
    check_port(host, port)
    with connected(settings):
        application = build_console_app(registry_for(settings), auth=auth)
        if not auth:
            console.print(f"[yellow]{AUTH_OFF_WARNING}[/yellow]")
        if tls is None:
            console.print(f"Kiln console at http://{host}:{port}/ui (Ctrl-C stops it)")
            uvicorn.run(application, host=host, port=port, log_level="warning")
            return
        # The console on a loopback port behind the TLS frontend, as kiln serve (cluster/tls.py).
        from kiln.runtime import free_port
        from kiln.tls import TlsFrontend

        inner = free_port()
        config = uvicorn.Config(application, host="127.0.0.1", port=inner, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        frontend = TlsFrontend(tls, host, port, inner).start()
        console.print(f"Kiln console at https://{host}:{port}/ui (Ctrl-C stops it)")
        try:
            while thread.is_alive():
                thread.join(3600)
        except KeyboardInterrupt:
            pass
        finally:
            frontend.stop()
            server.should_exit = True
