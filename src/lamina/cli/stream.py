"""lamina stream IMAGE | stream status | stream sync"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from lamina.cli.common import CaOpt, HomeOpt, JsonOpt, emit_json, human, open_home, out
from lamina.errors import UsageError
from lamina.home import home_path
from lamina.settings import load


class _DefaultRun(TyperGroup):
    """``lamina stream IMAGE ...`` means ``lamina stream run IMAGE ...``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_DefaultRun,
    help="Stream an image from a manager: a local NBD endpoint that fetches on demand.",
    no_args_is_help=True,
)

CacheOpt = Annotated[
    Path, typer.Option("--cache", help="The stream's cache directory.", show_default=False)
]
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_rate(text: str | None) -> float | None:
    """``10M``, ``512KiB``, ``1G``, ``2500000``: bytes per second (binary multiples)."""
    if text is None or text in ("", "0", "none", "unlimited"):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?(?:/s)?", text.strip(), re.IGNORECASE)
    if match is None:
        raise UsageError(f"bad --rate {text!r}: expected bytes per second such as 20M or 512K")
    return float(match[1]) * _UNITS[match[2].upper()]


def _ask(cache: Path, op: str, timeout: float | None) -> dict[str, Any] | None:
    """Ask the endpoint running on ``cache``; None when none answers."""
    from lamina import control
    from lamina.stream.endpoint import control_address

    try:
        answer: dict[str, Any] = control.ask(
            control_address(cache),
            {"op": op},
            timeout=timeout,
            hung_up="the endpoint gave no answer",
        )
    except control.NotListening:
        return None
    return answer


@app.command("run")
def run(
    image: Annotated[str, typer.Argument(help="IMAGE or IMAGE@VERSION (the export's name).")],
    url: Annotated[
        str | None, typer.Option("--from", help="Manager URL, e.g. http://manager:8480.")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="Admin or machine token; default: LAMINA_TOKEN, else the admin token of"
            " --home's manager, if it has one.",
        ),
    ] = None,
    cache: Annotated[
        Path | None, typer.Option("--cache", help="Cache directory [HOME/stream/NAME].")
    ] = None,
    nbd: Annotated[str, typer.Option("--nbd", help="NBD listen address.")] = "127.0.0.1:10810",
    machine: Annotated[
        str | None, typer.Option("--machine", help="Serve this machine, writable.")
    ] = None,
    rate: Annotated[
        str | None, typer.Option("--rate", help="Bandwidth limit in bytes/s (20M, 512K).")
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds a read waits for a missing chunk.")
    ] = 30.0,
    hydrate: Annotated[
        bool, typer.Option("--hydrate/--no-hydrate", help="Fetch everything in the background.")
    ] = True,
    connections: Annotated[
        int, typer.Option("--connections", help="Parallel HTTP connections.")
    ] = 8,
    ca: CaOpt = None,
    home: HomeOpt = None,
) -> None:
    """Serve IMAGE as a local NBD export at once; fetch chunks as they are read.

    Example: lamina stream run base --from https://manager:8480 --nbd 127.0.0.1:10810
    """
    from lamina.serve.server import parse_address
    from lamina.stream.endpoint import StreamOptions, check_names
    from lamina.stream.endpoint import run as run_endpoint

    if timeout <= 0 or connections < 1:
        raise UsageError("--timeout must be positive and --connections at least 1")
    # Before anything touches the filesystem: the default cache path is made of these names.
    check_names(image, machine)
    if cache is None:
        # A host that streams needs no home of its own: the folder only holds the caches.
        cache = home_path(home) / "stream" / (machine or image.replace("@", "-"))
    token = token or load().token
    if token is None and not (cache / "config.json").exists():
        token = _local_admin_token(home)
    options = StreamOptions(
        image=image,
        cache=cache.expanduser().absolute(),
        nbd=parse_address(nbd, "--nbd"),
        url=url,
        token=token,
        machine=machine,
        rate=parse_rate(rate),
        timeout=timeout,
        hydrate=hydrate,
        connections=connections,
        ca=ca,
    )
    run_endpoint(options)


def _local_admin_token(home: Path | None) -> str | None:
    """On the manager's own host (``--home`` holds its database) a new cache needs no
    ``--token``: the admin token is read from there. Elsewhere there is none."""
    from lamina.home import read_identity
    from lamina.manager.services import settings

    if read_identity(home_path(home)) is None:
        return None
    h = open_home(home)
    with h.session() as session:
        return settings.admin_token(session)


def _status(cache: Path) -> dict[str, Any]:
    from lamina.stream.cache import is_locked, offline_status

    answer = _ask(cache, "status", 10.0) if is_locked(cache) else None
    if answer is not None:
        status: dict[str, Any] = answer["status"]
        return status
    return offline_status(cache) | {"running": False, "rate_bytes_per_s": 0}


def _show(status: dict[str, Any]) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    state = "complete" if status["complete"] else "hydrating" if status["running"] else "stopped"
    if status.get("online") is False:
        state += ", manager unreachable"
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TextColumn("{task.fields[rate]}/s"),
        console=out,
        auto_refresh=False,
    )
    data, cached = status["data_bytes"], status["cached_data_bytes"]
    bar.add_task(
        status["image"], total=max(data, 1), completed=cached if data else 1,
        rate=human(status.get("rate_bytes_per_s", 0)),
    )  # fmt: skip
    bar.refresh()
    out.print(bar.get_renderable())
    out.print(
        f"{state}: {human(status['cached_bytes'])} of {human(status['size'])} readable locally"
        + (f", machine {status['machine']}" if status.get("machine") else "")
    )


@app.command("status")
def status(
    cache: CacheOpt,
    as_json: JsonOpt = False,
    watch: Annotated[bool, typer.Option("--watch", help="Follow until complete.")] = False,
    home: HomeOpt = None,  # accepted like everywhere; a cache directory stands alone
) -> None:
    """Size, cached bytes, completeness and fetch rate of a stream's cache.

    Example: lamina stream status --cache /var/lib/lamina/stream/base --watch
    """
    import sys

    while True:
        current = _status(cache)
        if as_json:
            emit_json(current)
        elif sys.stdout.isatty():
            _show(current)
        else:
            rate = human(current.get("rate_bytes_per_s", 0))
            out.print(
                f"{current['image']}: {human(current['cached_bytes'])} of"
                f" {human(current['size'])} cached, complete={current['complete']},"
                f" rate {rate}/s, running={current['running']}"
            )
        if not watch or current["complete"]:
            return
        time.sleep(1.0)


@app.command("sync")
def sync(
    cache: CacheOpt,
    token: Annotated[
        str | None, typer.Option("--token", help="Overrides the cache's; default: LAMINA_TOKEN.")
    ] = None,
    as_json: JsonOpt = False,
    home: HomeOpt = None,  # accepted like everywhere; a cache directory stands alone
) -> None:
    """Upload a stateful machine's local writes to the manager as its delta.

    Example: lamina stream sync --cache /var/lib/lamina/stream/desk-001
    """
    from lamina.stream.cache import is_locked

    answer = _ask(cache, "sync", None) if is_locked(cache) else None
    result = answer["result"] if answer is not None else _sync_here(cache, token or load().token)
    if as_json:
        emit_json(result)
    else:
        out.print(
            f"{result['machine']}: {result['status']}"
            + (f", {result['blocks']} blocks" if result.get("blocks") else "")
        )


def _sync_here(cache: Path, token: str | None) -> dict[str, Any]:
    """No endpoint is running: sync from the files."""
    import asyncio
    import os
    from dataclasses import replace

    from lamina.stream import cache as cachedir
    from lamina.stream.remote import Remote
    from lamina.stream.stack import DeltaStack
    from lamina.stream.sync import check_syncable
    from lamina.stream.sync import sync as run_sync

    lock = cachedir.lock_dir(cache)
    try:
        config = cachedir.read_config(cache)
        if token:
            config = replace(config, token=token)
        check_syncable(config)
        stack = DeltaStack(cache / "deltas", size=config.size, base_id=config.manifest_id)

        async def go() -> dict[str, Any]:
            remote = Remote(config.url, config.token, connections=2, ca=cachedir.ca_file(cache))
            try:
                return await run_sync(stack, remote, config)
            finally:
                await remote.close()

        try:
            return asyncio.run(go())
        finally:
            stack.close()
    finally:
        os.close(lock)
