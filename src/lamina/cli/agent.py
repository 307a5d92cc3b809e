"""lamina agent (the machine's agent), lamina agent login|logout USER (for a PAM hook),
lamina agent status."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lamina.cli.common import CaOpt, HomeOpt, JsonOpt, emit_json, open_home, out

app = typer.Typer(
    help="The machine agent: identity at boot, layers at login, live changes.",
    invoke_without_command=True,
)


@app.callback()
def agent(
    ctx: typer.Context,
    manager: Annotated[
        str | None, typer.Option("--manager", help="Manager URL; default: LAMINA_MANAGER.")
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="This machine's token; default: LAMINA_TOKEN.")
    ] = None,
    root: Annotated[
        Path | None,
        typer.Option(
            "--root", help="Where sessions are composed: ROOT/USER (default HOME/sessions)."
        ),
    ] = None,
    etc: Annotated[
        Path | None,
        typer.Option("--etc", help="Write hostname, machine-id, SSH host keys here (e.g. /etc)."),
    ] = None,
    ca: CaOpt = None,
    system_root: Annotated[
        Path | None,
        typer.Option(
            "--system-root",
            help="Compose sessions into this running system (/ on a machine): "
            "/usr, /opt, /etc and the user's home.",
        ),
    ] = None,
    lazy: Annotated[
        bool,
        typer.Option(
            "--lazy-layers",
            help="Attach app layers after fetching their metadata only; their data comes "
            "from the manager when first read; default: lazy_layers of the configuration,"
            " LAMINA_LAZY_LAYERS.",
        ),
    ] = False,
    home: HomeOpt = None,
) -> None:
    """Run the agent: report boot, apply identity, serve logins, follow the manager."""
    if ctx.invoked_subcommand is not None:
        return
    from lamina.agent.daemon import Agent
    from lamina.errors import UsageError
    from lamina.manager.client import ManagerClient
    from lamina.manager.home import init_home
    from lamina.settings import load

    settings = load()
    manager, token = manager or settings.manager, token or settings.token
    root, etc = root or settings.agent.root, etc or settings.agent.etc
    lazy = lazy or settings.lazy_layers
    if not manager or not token:
        raise UsageError("lamina agent needs --manager URL and --token T")
    # The agent's home is the machine's cache of what the manager holds: made on first run.
    h = init_home(home).home
    root = root if root is not None else h.root / "sessions"
    root.mkdir(parents=True, exist_ok=True)
    client = ManagerClient(manager, token, ca=ca)
    if system_root is None:
        Agent(h, client, root, etc=etc, lazy=lazy, ca=ca).run()
        return
    from lamina.guest.session import SystemAgent

    SystemAgent(h, client, root, etc=etc, system_root=system_root, lazy=lazy, ca=ca).run()


@app.command("login")
def login(
    user: Annotated[str, typer.Argument(help="The user logging in.")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Mount USER's layers and writable layer (asks the running agent).

    Example: lamina agent login alice
    """
    from lamina.agent.host import request

    result = request(open_home(home), "login", user)
    if as_json:
        emit_json(result)
    else:
        out.print(f"{user}: {result['root']} ({', '.join(result['layers'])})", markup=False)


@app.command("logout")
def logout(
    user: Annotated[str, typer.Argument(help="The user logging out.")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Unmount USER's session; the writable layer's new version goes to the manager.

    Example: lamina agent logout alice
    """
    from lamina.agent.host import request

    result = request(open_home(home), "logout", user)
    if as_json:
        emit_json(result)
    else:
        saved = f", saved {result['saved']}" if result.get("saved") else ""
        out.print(f"{user}: logged out{saved}", markup=False)


@app.command("status")
def status(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Logouts waiting for the manager, and those it refused (kept for recovery).

    Example: lamina agent status --json
    """
    from lamina.agent import host

    result = host.status(open_home(home))
    if as_json:
        emit_json(result)
        return
    out.print(f"machine: {result['machine'] or '-'}", markup=False)
    pending = result["pending_logouts"]
    out.print(f"pending logouts: {', '.join(pending) if pending else 'none'}", markup=False)
    for r in result["refused_logouts"]:
        saved = r.get("saved") or "nothing saved"
        text = f"refused logout: {r['user']} ({saved}) at {r['at']}: {r['reason']} [{r['file']}]"
        out.print(text, markup=False)
    for layer in result["lazy_layers"]:
        held = f"{layer.get('cached_bytes', 0) >> 20}/{layer.get('size', 0) >> 20} MiB"
        state = "offline" if layer.get("offline") else "online"
        if not layer.get("running", True):
            state = "not running"
        lacks = layer.get("missing_chunks", 0)
        lacking = f", {lacks} chunks asked for and missing" if lacks else ""
        out.print(
            f"lazy layer {layer.get('layer') or layer.get('image')}: {held} here, {state}{lacking}",
            markup=False,
        )
