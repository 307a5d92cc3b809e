"""lamina serve: the manager and the block server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lamina.cli.common import HomeOpt, open_home


def register(root: typer.Typer) -> None:
    root.command("serve")(serve)


def serve(
    nbd: Annotated[str, typer.Option("--nbd", help="NBD listen address.")] = "127.0.0.1:10809",
    http: Annotated[
        str, typer.Option("--http", help="HTTP listen address (manager API).")
    ] = "127.0.0.1:8480",
    no_http: Annotated[bool, typer.Option("--no-http", help="Serve block devices only.")] = False,
    no_nbd: Annotated[
        bool, typer.Option("--no-nbd", help="Serve the manager only (extra managers).")
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=0,
            help="NBD worker processes (default: one per core; 0: none, serve NBD in the main process).",
        ),
    ] = None,
    tls: Annotated[
        bool,
        typer.Option(
            "--tls",
            help="Require TLS: NBD with STARTTLS and a client certificate, HTTPS"
            " [default on any address that is not loopback].",
        ),
    ] = False,
    insecure: Annotated[
        bool,
        typer.Option("--insecure", help="No TLS, even on an address that is not loopback."),
    ] = False,
    tls_names: Annotated[
        list[str] | None,
        typer.Option(
            "--tls-name",
            help="Another name or address for the server certificate (DNS alias, NAT).",
        ),
    ] = None,
    https_cert: Annotated[
        Path | None, typer.Option("--https-cert", help="HTTPS certificate [the home CA's].")
    ] = None,
    https_key: Annotated[
        Path | None, typer.Option("--https-key", help="Key of --https-cert.")
    ] = None,
    home: HomeOpt = None,
) -> None:
    """Serve image versions and machines over NBD, and the manager over HTTP."""
    from lamina.serve.options import ServeOptions
    from lamina.serve.server import parse_address, run
    from lamina.serve.tls import want_tls

    options = ServeOptions(
        nbd=None if no_nbd else parse_address(nbd, "--nbd"),
        http=None if no_http else parse_address(http, "--http"),
        workers=workers,
        tls_names=tuple(tls_names or ()),
        https_cert=https_cert,
        https_key=https_key,
    )
    options.tls = want_tls(
        options.hosts, tls=tls, insecure=insecure, https_cert=https_cert is not None
    )
    run(open_home(home), options)
