"""lamina admin token [--rotate] | admin account add|list|rm|token | admin credentials | lamina audit"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from lamina.cli import credentials
from lamina.cli.common import HomeOpt, JsonOpt, emit_json, open_home, out, say, table
from lamina.errors import UsageError

app = typer.Typer(help="Administration of the manager.", no_args_is_help=True)
app.command("credentials")(credentials.admin_credentials)
accounts_app = typer.Typer(
    help="Named admin accounts: a role each (admin, or read-only helpdesk), a token each.",
    no_args_is_help=True,
)
app.add_typer(accounts_app, name="account")


@app.command("token")
def token(
    rotate: credentials.TokenRotateOpt = False, home: HomeOpt = None, as_json: JsonOpt = False
) -> None:
    """Show the admin token of the manager API (created on first use): the token of the
    built-in account `admin`; --rotate replaces it (the old one is refused from then on).

    Example: lamina admin token

    With curl: curl -H "Authorization: Bearer $(lamina admin token)" localhost:8480/metrics
    """
    from lamina.manager.services import accounts, settings

    h = open_home(home)
    with h.session() as session:
        if rotate:
            value = accounts.new_token(session, name=accounts.BUILT_IN)
        else:
            value = settings.admin_token(session)
    if as_json:
        emit_json({"token": value, "rotated": rotate})
    else:
        out.print(value)


RoleOpt = Annotated[
    str, typer.Option("--role", help="admin (everything) or helpdesk (reads only).")
]


@accounts_app.command("add")
def account_add(
    name: str, role: RoleOpt = "admin", home: HomeOpt = None, as_json: JsonOpt = False
) -> None:
    """Add an account; its token is printed once (keep it: only its hash is stored).

    Example: lamina admin account add alice --role helpdesk
    """
    from lamina.manager.services import accounts

    with open_home(home).session() as session:
        account, value = accounts.add(session, name=name, role=role)
    if as_json:
        emit_json({"name": account.name, "role": account.role, "token": value})
    else:
        say(value)


@accounts_app.command("list")
def account_list(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """The accounts and their roles (`admin` is the token of `lamina admin token`).

    Example: lamina admin account list --json
    """
    from lamina.manager.services import accounts

    with open_home(home).session(read_only=True) as session:
        found = accounts.list_all(session)
    if as_json:
        emit_json([{"name": a.name, "role": a.role, "built_in": a.built_in} for a in found])
        return
    table(["NAME", "ROLE", ""], [[a.name, a.role, "built-in" if a.built_in else ""] for a in found])


@accounts_app.command("rm")
def account_rm(names: list[str], home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Remove accounts; their tokens stop working at once.

    Example: lamina admin account rm alice bob
    """
    from lamina.manager.services import accounts

    h = open_home(home)
    for name in names:
        with h.session() as session:
            accounts.remove(session, name=name)
    if as_json:
        emit_json({"removed": names})
    else:
        say(f"removed {', '.join(names)}")


@accounts_app.command("token")
def account_token(name: str, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Give an account a new token (its old one stops working) and print it.

    Example: lamina admin account token alice
    """
    from lamina.manager.services import accounts

    with open_home(home).session() as session:
        value = accounts.new_token(session, name=name)
    if as_json:
        emit_json({"name": name, "token": value})
    else:
        say(value)


_AGO = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``30m``, ``12h``, ``7d`` ago, or an ISO 8601 time (UTC when it names no zone)."""
    found = _AGO.match(text.strip())
    if found:
        seconds = int(found.group(1)) * _UNITS[found.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"bad --since {text!r}: expected a duration (30m, 12h, 7d) or an ISO 8601 time"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def audit(
    since: Annotated[
        str | None, typer.Option(help="From this time on: 30m, 12h, 7d, or ISO 8601.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many entries.")] = 100,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Who changed what, when, from where (newest first): CLI, API and console alike.

    Example: lamina audit --since 1d --json
    """
    from lamina.manager.services import audit as log

    start = parse_since(since) if since is not None else None
    with open_home(home).session(read_only=True) as session:
        rows = [log.as_dict(e) for e in log.entries(session, since=start, limit=limit)]
    if as_json:
        emit_json(rows)
        return
    table(
        ["TIME", "ACTOR", "VIA", "FROM", "ACTION", "TARGET"],
        [[r["at"], r["actor"], r["via"], r["address"], r["action"], r["target"]] for r in rows],
    )
