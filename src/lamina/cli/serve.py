"""lamina serve: the manager and the block server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lamina.cli.common import HomeOpt, open_home


def register(root: typer.Typer) -> None:
    root.command("serve")(serve)


def serve(
    nbd: Annotated[
        str | None, typer.Option("--nbd", help="NBD listen address [127.0.0.1:10809].")
    ] = None,
    http: Annotated[
        str | None,
        typer.Option("--http", help="HTTP listen address (manager API) [127.0.0.1:8480]."),
    ] = None,
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
        bool | None,
        typer.Option(
            "--tls",
            help="Require TLS: NBD with STARTTLS and a client certificate, HTTPS"
            " [default on any address that is not loopback].",
            show_default=False,
        ),
    ] = None,
    insecure: Annotated[
        bool | None,
        typer.Option(
            "--insecure",
            help="No TLS, even on an address that is not loopback.",
            show_default=False,
        ),
    ] = None,
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
    server_name: Annotated[
        str | None,
        typer.Option(
            "--server-name",
            help="Join the block servers of this database under this name (machines are"
            " assigned to the least loaded).",
        ),
    ] = None,
    advertise: Annotated[
        str | None,
        typer.Option(
            "--advertise",
            help="HOST:PORT machines dial for this server's NBD [the --nbd address].",
        ),
    ] = None,
    heartbeat: Annotated[
        float | None,
        typer.Option(
            "--heartbeat",
            min=0.1,
            help="Seconds between heartbeats; lost after three missed [5].",
        ),
    ] = None,
    agent_url: Annotated[
        str | None,
        typer.Option(
            "--agent-url",
            help="The manager's URL as machines reach it, for their seeds (kept; '' clears);"
            " default: serve.agent_url of the configuration, LAMINA_SERVE__AGENT_URL.",
        ),
    ] = None,
    boot_nbd: Annotated[
        str | None,
        typer.Option(
            "--boot-nbd",
            help="NBD address written into network boot scripts"
            " [the address served, else the host machines reach HTTP at].",
        ),
    ] = None,
    boot_http: Annotated[
        str | None,
        typer.Option(
            "--boot-http",
            help="Serve network boot on this plain-HTTP address too (with TLS, the one way"
            " firmware gets it).",
        ),
    ] = None,
    boot_allow: Annotated[
        list[str] | None,
        typer.Option("--boot-allow", help="Serve network boot to this network only (repeatable)."),
    ] = None,
    auto_add: Annotated[
        str | None,
        typer.Option(
            "--auto-add",
            help="A MAC that boots from the network and is no machine becomes one of IMAGE.",
            metavar="IMAGE",
        ),
    ] = None,
    auto_add_name: Annotated[
        str, typer.Option("--auto-add-name", help="Names of auto-added machines ('#': number).")
    ] = "pxe-###",
    auto_add_mode: Annotated[
        str, typer.Option("--auto-add-mode", help="Mode of auto-added machines.")
    ] = "stateless",
    home: HomeOpt = None,
) -> None:
    """Serve image versions and machines over NBD, and the manager over HTTP.

    Every option may also come from the [serve] table of lamina.toml or from
    LAMINA_SERVE__<OPTION> (a flag wins over the variable, the variable over the file).

    Example: lamina serve --nbd 0.0.0.0:10809 --http 0.0.0.0:8480 --tls
    """
    from lamina.manager.services.netboot import AutoAdd
    from lamina.serve.options import ServeOptions
    from lamina.serve.server import parse_address, run

    def str_address(text: str) -> str:
        host, port = parse_address(text, "--advertise")
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    from lamina.serve.tls import want_tls
    from lamina.settings import load

    flags = {
        "nbd": nbd,
        "http": http,
        "workers": workers,
        "tls": tls,
        "insecure": insecure,
        "tls_names": tls_names or None,
        "https_cert": https_cert,
        "https_key": https_key,
        "agent_url": agent_url,
    }
    top = {"server_name": server_name, "advertise": advertise, "heartbeat": heartbeat}
    settings = load(serve={k: v for k, v in flags.items() if v is not None}, **top)
    s = settings.serve
    if s.agent_url is not None:
        from lamina.guest.paths import set_agent_url

        set_agent_url(open_home(home), s.agent_url)

    options = ServeOptions(
        nbd=None if no_nbd else parse_address(s.nbd, "--nbd"),
        http=None if no_http else parse_address(s.http, "--http"),
        workers=s.workers,
        tls_names=tuple(s.tls_names),
        https_cert=s.https_cert,
        https_key=s.https_key,
        boot_nbd=parse_address(boot_nbd, "--boot-nbd") if boot_nbd else None,
        boot_http=parse_address(boot_http, "--boot-http") if boot_http else None,
        boot_allow=tuple(boot_allow or ()),
        auto_add=AutoAdd(auto_add, auto_add_name, auto_add_mode) if auto_add else None,
        server_name=settings.server_name,
        advertise=str_address(settings.advertise) if settings.advertise else None,
        heartbeat=settings.heartbeat,
    )
    options.tls = want_tls(
        options.hosts, tls=s.tls, insecure=s.insecure, https_cert=s.https_cert is not None
    )
    run(open_home(home), options)
