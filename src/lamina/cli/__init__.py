"""The ``lamina`` command line: one module per noun, errors as one line on stderr.

options.py   global options before the subcommand, --version
config.py    lamina config show
service.py   lamina service install [serve|agent] (systemd units)
common.py    what every command shares: --home, --json, one-line errors, progress, tables
home.py      lamina init, lamina backup DEST, lamina restore SRC
image.py     lamina image import|export|list|log|rm
layer.py     lamina layer import|capture|list|log|export|diff|rm
mount.py     lamina mount|umount|attach|detach
machine.py   lamina machine add|list|show|set|reset|rm, lamina delta commit
access.py    lamina user add|set|list|rm, group add|list|rm|add-member|rm-member, entitle, unentitle
rebase.py    lamina rebase ... and lamina rebase policy ...
serve.py     lamina serve
stream.py    lamina stream IMAGE | stream status | stream sync
store.py     lamina store verify|gc|du
agent.py     lamina agent, lamina agent login|logout|status
credentials.py   lamina machine credentials NAME | lamina admin credentials (TLS)
admin.py     lamina admin token|account, lamina audit
demo.py      lamina demo
guest.py     lamina image build, lamina guest install
netboot.py   lamina netboot dnsmasq
"""

from __future__ import annotations

import os
import sys

import typer

from lamina._tuning import tune_process
from lamina.cli import (
    access,
    admin,
    agent,
    config,
    demo,
    guest,
    home,
    image,
    layer,
    machine,
    mount,
    netboot,
    options,
    rebase,
    serve,
    service,
    store,
    stream,
)
from lamina.errors import LaminaError

app = typer.Typer(
    name="lamina",
    help="One golden disk image and a set of application layers for a fleet of machines."
    "\n\nThe options --home, --json, --manager, --token and --ca may come before or after"
    " the subcommand. Settings come from /etc/lamina/lamina.toml (or $LAMINA_CONFIG), then"
    " LAMINA_* variables, then flags.\n\nExample: lamina --home /var/lib/lamina image list",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.callback()(options.root)
app.add_typer(config.app, name="config")
app.add_typer(service.app, name="service")
app.add_typer(image.app, name="image")
image.app.command("build")(guest.image_build)
app.add_typer(guest.app, name="guest")
app.add_typer(store.app, name="store")
app.add_typer(layer.app, name="layer")
app.add_typer(machine.app, name="machine")
app.add_typer(machine.delta_app, name="delta")
app.add_typer(admin.app, name="admin")
app.add_typer(agent.app, name="agent")
app.add_typer(stream.app, name="stream")
app.add_typer(rebase.app, name="rebase")
app.add_typer(netboot.app, name="netboot")
home.register(app)
mount.register(app)
serve.register(app)
demo.register(app)
access.register(app)
app.command("audit")(admin.audit)


def _debug() -> bool:
    """LAMINA_DEBUG (or debug in lamina.toml): let unexpected errors show a traceback."""
    from lamina.settings import load

    try:
        return load().debug
    except LaminaError:
        return False


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"lamina: {message}\n")
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    tune_process()
    command = typer.main.get_command(app)
    try:
        args = options.move_globals(command, sys.argv[1:] if argv is None else argv)
        result = command.main(args=args, prog_name="lamina", standalone_mode=False)
    except LaminaError as exc:
        _fail(str(exc), exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _fail("interrupted", 130)
    except OSError as exc:
        if _debug():
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{where}{exc.strerror or exc}", 1)
    except Exception as exc:
        # Usage errors of the (vendored) click inside typer: one line, their exit code.
        fmt, code = getattr(exc, "format_message", None), getattr(exc, "exit_code", None)
        if fmt is not None and isinstance(code, int):
            _fail(fmt(), code)
        if _debug():
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        _fail(
            f"internal error: {type(exc).__name__}: {first} (LAMINA_DEBUG=1 shows a traceback)", 1
        )
    code = result if isinstance(result, int) else 0
    # Everything is committed and flushed by now; skipping interpreter teardown (freeing
    # every module of SQLAlchemy, pydantic, rich) saves 0.1-0.2 s per command.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
