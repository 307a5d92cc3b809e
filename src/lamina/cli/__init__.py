"""The ``lamina`` command line: one module per noun, errors as one line on stderr."""

from __future__ import annotations

import os
import sys

import typer

from lamina.cli import image, store
from lamina.errors import LaminaError

app = typer.Typer(
    name="lamina",
    help="One golden disk image and a set of application layers for a fleet of machines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(image.app, name="image")
app.add_typer(store.app, name="store")


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"lamina: {message}\n")
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="lamina", standalone_mode=False)
    except LaminaError as exc:
        _fail(str(exc), exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _fail("interrupted", 130)
    except OSError as exc:
        if os.environ.get("LAMINA_DEBUG"):
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{where}{exc.strerror or exc}", 1)
    except Exception as exc:
        # Usage errors of the (vendored) click inside typer: one line, their exit code.
        fmt, code = getattr(exc, "format_message", None), getattr(exc, "exit_code", None)
        if fmt is not None and isinstance(code, int):
            _fail(fmt(), code)
        if os.environ.get("LAMINA_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        _fail(
            f"internal error: {type(exc).__name__}: {first} (LAMINA_DEBUG=1 shows a traceback)", 1
        )
    sys.exit(result if isinstance(result, int) else 0)
