"""What every command shares: --home, --json, one-line errors, progress bars, tables."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from lamina.home import Home
from lamina.manager.home import open_home as _open_home
from lamina.units import human_bytes

if TYPE_CHECKING:
    from lamina.manager.admin import Admin

HomeOpt = Annotated[
    Path | None,
    typer.Option(
        "--home",
        envvar="LAMINA_HOME",
        help="Lamina home (database, store, deltas).",
        show_default="~/.local/share/lamina",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
CaOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca",
        envvar="LAMINA_CA",
        help="CA certificate of an https:// manager (a PEM file, or a credentials folder"
        " with ca-cert.pem) [the system's trust store].",
        show_default=False,
    ),
]

ManagerOpt = Annotated[
    str | None,
    typer.Option(
        "--manager", envvar="LAMINA_MANAGER", help="Manager URL (else the --home's database)."
    ),
]
TokenOpt = Annotated[
    str | None, typer.Option("--token", envvar="LAMINA_TOKEN", help="Admin token for --manager.")
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Confirm a change that loses data (it says what).")
]

# No emoji codes: a MAC address such as 4a:cd:05:... would print a disc for ":cd:".
out = Console(highlight=False, emoji=False)
err = Console(stderr=True, highlight=False, emoji=False)


def say(text: str) -> None:
    """One line of plain text (names and messages are not markup)."""
    out.print(text, markup=False)


def open_home(home: Path | None) -> Home:
    return _open_home(home)


def admin(
    home: Path | None, manager: str | None, token: str | None, ca: Path | None = None
) -> Admin:
    """The admin operations on the --home's database, or through --manager's API."""
    from lamina.manager.admin import HomeAdmin, RemoteAdmin

    if manager is None:
        return HomeAdmin(open_home(home))
    from lamina.errors import UsageError
    from lamina.manager.client import ManagerClient

    if not token:
        raise UsageError("--manager needs --token (the admin token: lamina admin token)")
    return RemoteAdmin(ManagerClient(manager, token, ca=ca))


def emit_json(data: Any) -> None:
    if hasattr(data, "model_dump"):  # an API schema (pydantic)
        data = data.model_dump(mode="json")
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def human(n: float) -> str:
    return human_bytes(n)


def table(columns: list[str], rows: list[list[Any]], title: str | None = None) -> None:
    from rich.table import Table

    t = Table(*columns, title=title, box=None, header_style="bold")
    for row in rows:
        t.add_row(*(str(c) for c in row))
    out.print(t)


@contextmanager
def progress(
    description: str, total: int | None, *, enabled: bool = True
) -> Iterator[Callable[[int], None]]:
    """A byte progress bar on a terminal; a no-op otherwise (pipes, --json, CI logs)."""
    if not (enabled and sys.stdout.isatty()):
        yield lambda _n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=True,
        console=out,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
