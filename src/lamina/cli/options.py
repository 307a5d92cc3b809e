"""Global options: ``lamina --home DIR image list`` is ``lamina image list --home DIR``.

Each command declares the options it takes (--home, --json, --manager, --token, --ca);
those given before the subcommand are moved after the command's path, so that both
orders reach the same parameter, and a command that does not take one says so.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any, Final

import typer

from lamina.errors import UsageError

# Options that take a value, and flags.
VALUED: Final = frozenset({"--home", "--manager", "--token", "--ca"})
FLAGS: Final = frozenset({"--json"})


def lamina_version() -> str:
    try:
        return version("lamina")
    except PackageNotFoundError:  # a source tree run without installing
        return "unknown"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"lamina {lamina_version()}")
        raise typer.Exit()


def root(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """The root command's own options (the global ones are moved onto the subcommand)."""


def _split(token: str) -> tuple[str, bool]:
    """The option's name, and whether its value is in the same token (``--home=DIR``)."""
    name, eq, _ = token.partition("=")
    return name, bool(eq)


def _subcommands(command: Any) -> dict[str, Any] | None:
    """A group's commands by name (typer's groups, on its own copy of click); None for a
    command."""
    found = getattr(command, "commands", None)
    return found if isinstance(found, dict) else None


def move_globals(command: Any, argv: list[str]) -> list[str]:
    """``argv`` with the global options found before the command's path placed after it."""
    path: list[str] = []
    moved: list[str] = []
    i = 0
    current = command
    while i < len(argv) and (children := _subcommands(current)) is not None:
        token = argv[i]
        name, inline = _split(token)
        if name in FLAGS and not inline:
            moved.append(token)
            i += 1
        elif name in VALUED:
            if not inline and i + 1 >= len(argv):
                raise UsageError(f"{name} needs a value")
            moved += argv[i : i + (1 if inline else 2)]
            i += 1 if inline else 2
        elif token in children:
            path.append(token)
            current = children[token]
            i += 1
        else:
            break
    if moved and path and _subcommands(current) is None:
        _check_accepts(current, path, moved)  # a group (stream IMAGE) leaves it to click
    elif moved:
        return argv  # no subcommand: click's own message about the root
    return path + moved + argv[i:]


def _check_accepts(command: Any, path: list[str], moved: list[str]) -> None:
    names = {opt for p in command.params for opt in getattr(p, "opts", ())}
    for token in moved:
        name, _ = _split(token)
        if name.startswith("--") and name not in names:
            raise UsageError(f"'lamina {' '.join(path)}' takes no {name}")
