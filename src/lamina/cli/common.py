"""What every command shares: --home, --json, one-line errors, progress bars, tables."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from lamina.home import Home
from lamina.manager.home import open_home as _open_home
from lamina.units import human_bytes, timestamp

if TYPE_CHECKING:
    from lamina.manager.admin import Admin

HomeOpt = Annotated[
    Path | None,
    typer.Option(
        "--home",
        help="Lamina home (database, store, deltas); default: home in lamina.toml,"
        " LAMINA_HOME, else ~/.local/share/lamina.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
CaOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca",
        help="CA certificate of an https:// manager (a PEM file, or a credentials folder"
        " with ca-cert.pem); default: LAMINA_CA, else the system's trust store.",
        show_default=False,
    ),
]

ManagerOpt = Annotated[
    str | None,
    typer.Option(
        "--manager", help="Manager URL; default: LAMINA_MANAGER, else the --home's database."
    ),
]
TokenOpt = Annotated[
    str | None, typer.Option("--token", help="Admin token for --manager; default: LAMINA_TOKEN.")
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Confirm a change that loses data (it says what).")
]

# No emoji codes: a MAC address such as 4a:cd:05:... would print a disc for ":cd:".
out = Console(highlight=False, emoji=False)
err = Console(stderr=True, highlight=False, emoji=False)


def say(text: str) -> None:
    """One line of plain text (names and messages are not markup)."""
    out.print(text, markup=False, soft_wrap=True)


def open_home(home: Path | None) -> Home:
    return _open_home(home)


def admin(
    home: Path | None, manager: str | None, token: str | None, ca: Path | None = None
) -> Admin:
    """The admin operations on the --home's database, or through --manager's API."""
    from lamina.manager.admin import HomeAdmin, RemoteAdmin
    from lamina.settings import load

    settings = load()
    manager = manager or settings.manager
    token = token or settings.token
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
    """Aligned columns on a terminal; through a pipe, every cell whole and separated by
    tabs (``cut -f2``, ``awk -F'\\t'``), never cut to a terminal's width."""
    if not sys.stdout.isatty():
        lines = [columns, *([_cell(c) for c in row] for row in rows)]
        sys.stdout.write("".join("\t".join(line) + "\n" for line in lines))
        return
    from rich.table import Table

    t = Table(*columns, title=title, box=None, header_style="bold")
    for row in rows:
        t.add_row(*(str(c) for c in row))
    out.print(t)


def _cell(value: Any) -> str:
    return " ".join(str(value).split()) if value is not None else "-"


def fields(values: dict[str, Any], indent: str = "") -> None:
    """``key: value`` lines a person reads: None as -, times in the one format, lists
    joined by commas, a mapping as indented lines of its own."""
    for key, value in values.items():
        if isinstance(value, dict) and value:
            say(f"{indent}{key}:")
            fields(value, indent + "  ")
        else:
            say(f"{indent}{key}: {_plain(value)}")


def _plain(value: Any) -> str:
    from datetime import datetime

    if value is None or (isinstance(value, dict | list) and not value):
        return "-"
    if isinstance(value, datetime):
        return timestamp(value)
    if isinstance(value, list):
        return ", ".join(_plain(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


@dataclass(frozen=True)
class Said:
    """A result that is a line and its JSON, where the operation gives back nothing."""

    text: str
    data: dict[str, Any]

    def summary(self) -> str:
        return self.text

    def model_dump(self, mode: str = "json") -> dict[str, Any]:
        return self.data


def each(names: list[str], act: Callable[[str], Any], as_json: bool) -> None:
    """``act`` on every name, going on past a failure (said on one line, as ``rm a b c``
    does); a result's summary line as it comes, or with --json the result (a list of them
    for several names). The last failure's exit code is the command's."""
    from lamina.errors import LaminaError

    done: list[Any] = []
    failed: LaminaError | None = None
    for name in names:
        try:
            result = act(name)
        except LaminaError as exc:
            if len(names) == 1:
                raise
            err.print(f"lamina: {exc}", markup=False)
            failed = exc
            continue
        done.append(result)
        if not as_json:
            say(result.summary())
    if as_json:
        dumped = [r.model_dump(mode="json") for r in done]
        emit_json(dumped[0] if len(names) == 1 else dumped)
    if failed is not None:
        raise SystemExit(failed.exit_code)


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
