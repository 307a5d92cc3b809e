"""lamina user|group add/list/rm, lamina entitle|unentitle: who gets which layers.

Each command works on the embedded database under --home, or through a manager's API with
--manager URL --token T (LAMINA_MANAGER, LAMINA_TOKEN); the output is the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lamina.cli.common import HomeOpt, JsonOpt, emit_json, open_home, out, table

if TYPE_CHECKING:
    from lamina.manager.client import ManagerClient

user_app = typer.Typer(help="Users and their writable layers.", no_args_is_help=True)
group_app = typer.Typer(help="Groups of users.", no_args_is_help=True)

ManagerOpt = Annotated[
    str | None,
    typer.Option("--manager", envvar="LAMINA_MANAGER", help="Manager URL (else the --home)."),
]
TokenOpt = Annotated[
    str | None, typer.Option("--token", envvar="LAMINA_TOKEN", help="Admin token for --manager.")
]
UserOpt = Annotated[str | None, typer.Option("--user", help="Entitle a user.")]
GroupOpt = Annotated[str | None, typer.Option("--group", help="Entitle a group.")]
MachineOpt = Annotated[str | None, typer.Option("--machine", help="Entitle a machine.")]


def _remote(manager: str | None, token: str | None) -> ManagerClient | None:
    if manager is None:
        return None
    from lamina.errors import UsageError
    from lamina.manager.client import ManagerClient

    if not token:
        raise UsageError("--manager needs --token (the admin token: lamina admin token)")
    return ManagerClient(manager, token)


def _user_dict(row: Any) -> dict[str, Any]:
    return {
        "name": row.user.name,
        "groups": row.groups,
        "writable": row.writable,
        "policy": row.policy,
        "writable_version": row.writable_version,
        "in_use_on": row.in_use_on,
    }


def _show_user(data: dict[str, Any], as_json: bool, verb: str = "added") -> None:
    if as_json:
        emit_json(data)
    else:
        groups = f", groups {', '.join(data['groups'])}" if data["groups"] else ""
        out.print(f"{verb} user {data['name']}{groups}, writable layer {data['writable']}")


def _remove(
    kind: str,
    name: str,
    manager: str | None,
    token: str | None,
    home: Path | None,
    as_json: bool,
) -> None:
    """``user rm`` and ``group rm``: through the manager's API, or on the --home."""
    client = _remote(manager, token)
    if client is not None:
        client.request("DELETE", f"/{kind}s/{name}")
    else:
        from lamina.manager.services import access

        remove = access.remove_user if kind == "user" else access.remove_group
        with open_home(home).session() as session:
            remove(session, name=name)
    emit_json({"removed": name}) if as_json else out.print(f"removed {kind} {name}")


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help="Login name.")],
    group: Annotated[list[str] | None, typer.Option("--group", help="Group, repeat.")] = None,
    policy: Annotated[
        str, typer.Option("--policy", help="What the writable layer keeps: all, profile, apps.")
    ] = "all",
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a user (with an empty writable layer) to groups."""
    groups = group or []
    client = _remote(manager, token)
    if client is not None:
        body = {"name": name, "groups": groups, "policy": policy}
        data = client.json("POST", "/users", json=body)
    else:
        from lamina.manager.services import access

        with open_home(home).session() as session:
            access.add_user(session, name=name, groups=groups, policy=policy)
            data = _user_dict(access.user_row(session, name))
    _show_user({k: data[k] for k in _KEYS}, as_json)


_KEYS = ("name", "groups", "writable", "policy", "writable_version", "in_use_on")


@user_app.command("list")
def user_list(
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Users, their groups and where their writable layer is in use."""
    client = _remote(manager, token)
    if client is not None:
        rows = [{k: u[k] for k in _KEYS} for u in client.pages("/users")]
    else:
        from lamina.manager.services import access

        rows = []
        with open_home(home).session() as session:
            while True:
                page, total = access.list_users(session, offset=len(rows), limit=1000)
                rows += [_user_dict(r) for r in page]
                if not page or len(rows) >= total:
                    break
    if as_json:
        emit_json(rows)
        return
    table(
        ["NAME", "GROUPS", "WRITABLE", "POLICY", "VERSION", "IN USE ON"],
        [
            [
                r["name"],
                ",".join(r["groups"]),
                r["writable"] or "-",
                r["policy"] or "-",
                r["writable_version"] or "-",
                r["in_use_on"] or "-",
            ]
            for r in rows
        ],
    )


@user_app.command("rm")
def user_rm(
    name: Annotated[str, typer.Argument()],
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a user (refused while logged in; the writable layer's data stays)."""
    _remove("user", name, manager, token, home, as_json)


@group_app.command("add")
def group_add(
    name: Annotated[str, typer.Argument()],
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a group."""
    client = _remote(manager, token)
    if client is not None:
        client.json("POST", "/groups", json={"name": name})
    else:
        from lamina.manager.services import access

        with open_home(home).session() as session:
            access.add_group(session, name=name)
    emit_json({"name": name}) if as_json else out.print(f"added group {name}")


@group_app.command("list")
def group_list(
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Groups and how many members each has."""
    client = _remote(manager, token)
    if client is not None:
        rows = [{"name": g["name"], "members": g["members"]} for g in client.pages("/groups")]
    else:
        from lamina.manager.services import access

        with open_home(home).session() as session:
            found, _total = access.list_groups(session, limit=100_000)
            rows = [{"name": g.name, "members": n} for g, n in found]
    if as_json:
        emit_json(rows)
    else:
        table(["NAME", "MEMBERS"], [[r["name"], r["members"]] for r in rows])


@group_app.command("rm")
def group_rm(
    name: Annotated[str, typer.Argument()],
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a group (its members stay; its entitlements go)."""
    _remove("group", name, manager, token, home, as_json)


def _target_text(user: str | None, group: str | None, machine: str | None) -> str:
    """The one target given to entitle or unentitle, as text ("user NAME")."""
    from lamina.errors import UsageError

    if sum(x is not None for x in (user, group, machine)) != 1:
        raise UsageError("give exactly one of --user, --group, --machine")
    if user is not None:
        return f"user {user}"
    return f"group {group}" if group is not None else f"machine {machine}"


def entitle(
    layer: Annotated[str, typer.Argument(help="NAME (follows its latest version) or NAME@V.")],
    user: UserOpt = None,
    group: GroupOpt = None,
    machine: MachineOpt = None,
    priority: Annotated[
        int, typer.Option("--priority", help="Attach order, lower first (first wins).")
    ] = 100,
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Entitle an app layer to a user, a group or a machine (attached live at login)."""
    what = _target_text(user, group, machine)
    client = _remote(manager, token)
    if client is not None:
        body = {"layer": layer, "user": user, "group": group, "machine": machine}
        data = client.json("POST", "/entitlements", json=body | {"priority": priority})
    else:
        from lamina.manager.services import access

        with open_home(home).session() as session:
            to = access.target(session, user=user, group=group, machine=machine)
            ent = access.entitle(session, layer=layer, to=to, priority=priority)
            data = {"id": ent.id, "layer": layer.partition("@")[0], "version": ent.version}
    if as_json:
        emit_json({"id": data["id"], "layer": layer, "target": what, "priority": priority})
    else:
        out.print(f"entitled {layer} to {what}")


def unentitle(
    layer: Annotated[str, typer.Argument(help="Layer NAME.")],
    user: UserOpt = None,
    group: GroupOpt = None,
    machine: MachineOpt = None,
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Take an entitlement back (the layer detaches live from sessions it was on)."""
    what = _target_text(user, group, machine)
    client = _remote(manager, token)
    if client is not None:
        params = {k: v for k, v in {"user": user, "group": group, "machine": machine}.items() if v}
        client.json("DELETE", "/entitlements", params={"layer": layer, **params})
    else:
        from lamina.manager.services import access

        with open_home(home).session() as session:
            to = access.target(session, user=user, group=group, machine=machine)
            access.unentitle(session, layer=layer, to=to)
    if as_json:
        emit_json({"layer": layer, "target": what, "removed": True})
    else:
        out.print(f"unentitled {layer} from {what}")


def register(root: typer.Typer) -> None:
    root.add_typer(user_app, name="user")
    root.add_typer(group_app, name="group")
    root.command("entitle")(entitle)
    root.command("unentitle")(unentitle)
