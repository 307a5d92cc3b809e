"""lamina admin token | admin credentials"""

from __future__ import annotations

import typer

from lamina.cli import credentials
from lamina.cli.common import HomeOpt, JsonOpt, emit_json, open_home, out

app = typer.Typer(help="Administration of the manager.", no_args_is_help=True)
app.command("credentials")(credentials.admin_credentials)


@app.command("token")
def token(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Show the admin token of the manager API (created on first use).

    Example: lamina admin token
    """
    from lamina.manager.services import settings

    h = open_home(home)
    with h.session() as session:
        value = settings.admin_token(session)
    if as_json:
        emit_json({"token": value})
    else:
        out.print(value)
