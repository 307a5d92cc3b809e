"""lamina demo"""

from __future__ import annotations

import dataclasses
import time
from typing import Annotated

import typer

from lamina.cli.common import HomeOpt, JsonOpt, emit_json, out


def register(root: typer.Typer) -> None:
    root.command("demo")(demo)


def demo(
    nbd_port: Annotated[int, typer.Option("--nbd-port", help="Preferred NBD port.")] = 10809,
    http_port: Annotated[int, typer.Option("--http-port", help="Preferred HTTP port.")] = 8480,
    pxe: Annotated[
        bool,
        typer.Option("--pxe", help="The machines have no disk: they boot from the network."),
    ] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """End-to-end showcase: one image, two machines, two boots each, on embedded defaults.

    Example: lamina demo --nbd-port 10809 --http-port 8480
    """
    from lamina.demo.netboot_demo import run_pxe_demo
    from lamina.demo.showcase import run_demo
    from lamina.manager.home import init_home

    run = run_pxe_demo if pxe else run_demo

    h = init_home(home).home  # the demo makes its home (the default one) on first run
    started = time.monotonic()

    def say(line: str) -> None:
        if not as_json:
            out.print(f"[dim]{time.monotonic() - started:6.1f}s[/dim]  {line}", soft_wrap=True)

    if as_json:
        result = run(h, say, nbd_port=nbd_port, http_port=http_port)
    else:
        with out.status("lamina demo", spinner="dots"):
            result = run(h, say, nbd_port=nbd_port, http_port=http_port)
    if as_json:
        emit_json(dataclasses.asdict(result))
    else:
        out.print(f"demo done in {result.seconds:.0f} s")
