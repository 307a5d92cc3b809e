"""lamina user add|set|list|rm, lamina group add|list|rm|add-member|rm-member,
lamina entitle|unentitle: who gets which layers.

Each command works on the embedded database under --home, or through a manager's API with
--manager URL --token T (LAMINA_MANAGER, LAMINA_TOKEN): one code path (``lamina.manager
.admin``), the same output and the same refusals.
"""

from __future__ import annotations

from typing import Annotated

import typer

from lamina.cli.common import (
    CaOpt,
    HomeOpt,
    JsonOpt,
    ManagerOpt,
    TokenOpt,
    admin,
    emit_json,
    say,
    table,
)

user_app = typer.Typer(help="Users and their writable layers.", no_args_is_help=True)
group_app = typer.Typer(help="Groups of users.", no_args_is_help=True)

UserOpt = Annotated[str | None, typer.Option("--user", help="Entitle a user.")]
GroupOpt = Annotated[str | None, typer.Option("--group", help="Entitle a group.")]
MachineOpt = Annotated[str | None, typer.Option("--machine", help="Entitle a machine.")]
PolicyOpt = Annotated[
    str, typer.Option("--policy", help="What the writable layer keeps: all, profile, apps.")
]


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help="Login name.")],
    group: Annotated[list[str] | None, typer.Option("--group", help="Group, repeat.")] = None,
    policy: PolicyOpt = "all",
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a user (with an empty writable layer) to groups."""
    from lamina.manager.schemas import UserCreate, build

    body = build(UserCreate, name=name, groups=group or [], policy=policy)
    user = admin(home, manager, token, ca).add_user(body)
    emit_json(user.model_dump(exclude={"created_at"})) if as_json else say(user.summary())


@user_app.command("set")
def user_set(
    name: Annotated[str, typer.Argument(help="Login name.")],
    group: Annotated[
        list[str] | None, typer.Option("--group", help="Its groups, all of them (repeat).")
    ] = None,
    no_groups: Annotated[bool, typer.Option("--no-groups", help="In no group.")] = False,
    policy: Annotated[
        str | None, typer.Option("--policy", help="What the writable layer keeps.")
    ] = None,
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a user's groups or writable-layer policy (its sessions follow live)."""
    from lamina.manager.schemas import UserUpdate, build

    groups = [] if no_groups else group
    body = build(UserUpdate, groups=groups, policy=policy)
    user = admin(home, manager, token, ca).change_user(name, body)
    if as_json:
        emit_json(user.model_dump(exclude={"created_at"}))
    else:
        say(user.summary("changed"))


@user_app.command("list")
def user_list(
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Users, their groups and where their writable layer is in use."""
    users = admin(home, manager, token, ca).list_users()
    if as_json:
        emit_json([u.model_dump(exclude={"created_at"}) for u in users])
        return
    table(
        ["NAME", "GROUPS", "WRITABLE", "POLICY", "VERSION", "IN USE ON"],
        [
            [
                u.name,
                ",".join(u.groups),
                u.writable or "-",
                u.policy or "-",
                u.writable_version or "-",
                u.in_use_on or "-",
            ]
            for u in users
        ],
    )


@user_app.command("rm")
def user_rm(
    name: Annotated[str, typer.Argument()],
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a user (refused while logged in; the writable layer's data stays)."""
    admin(home, manager, token, ca).remove_user(name)
    emit_json({"removed": name}) if as_json else say(f"removed user {name}")


@group_app.command("add")
def group_add(
    name: Annotated[str, typer.Argument()],
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a group."""
    from lamina.manager.schemas import GroupCreate, build

    admin(home, manager, token, ca).add_group(build(GroupCreate, name=name))
    emit_json({"name": name}) if as_json else say(f"added group {name}")


@group_app.command("list")
def group_list(
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Groups and how many members each has."""
    rows = [
        {"name": g.name, "members": g.members}
        for g in admin(home, manager, token, ca).list_groups()
    ]
    if as_json:
        emit_json(rows)
    else:
        table(["NAME", "MEMBERS"], [[r["name"], r["members"]] for r in rows])


@group_app.command("rm")
def group_rm(
    name: Annotated[str, typer.Argument()],
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a group (its members stay; its entitlements go)."""
    admin(home, manager, token, ca).remove_group(name)
    emit_json({"removed": name}) if as_json else say(f"removed group {name}")


@group_app.command("add-member")
def group_add_member(
    group: Annotated[str, typer.Argument(metavar="GROUP")],
    user: Annotated[str, typer.Argument(metavar="USER")],
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Put a user in a group (its layers attach live where the user is logged in)."""
    from lamina.manager.schemas import MemberCreate, build

    admin(home, manager, token, ca).add_member(group, build(MemberCreate, user=user))
    data = {"group": group, "user": user, "member": True}
    emit_json(data) if as_json else say(f"{user} is in group {group}")


@group_app.command("rm-member")
def group_rm_member(
    group: Annotated[str, typer.Argument(metavar="GROUP")],
    user: Annotated[str, typer.Argument(metavar="USER")],
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Take a user out of a group (its layers detach live)."""
    admin(home, manager, token, ca).remove_member(group, user)
    data = {"group": group, "user": user, "member": False}
    emit_json(data) if as_json else say(f"{user} is no longer in group {group}")


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
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Entitle an app layer to a user, a group or a machine (attached live at login)."""
    from lamina.errors import UsageError
    from lamina.manager.schemas import EntitlementCreate, build

    if sum(x is not None for x in (user, group, machine)) != 1:
        raise UsageError("give exactly one of --user, --group, --machine")
    body = build(
        EntitlementCreate, layer=layer, user=user, group=group, machine=machine, priority=priority
    )
    ent = admin(home, manager, token, ca).entitle(body)
    if as_json:
        emit_json(ent.model_dump(exclude={"created_at"}))
    else:
        say(ent.summary())


def unentitle(
    layer: Annotated[str, typer.Argument(help="Layer NAME.")],
    user: UserOpt = None,
    group: GroupOpt = None,
    machine: MachineOpt = None,
    manager: ManagerOpt = None,
    token: TokenOpt = None,
    ca: CaOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Take an entitlement back (the layer detaches live from sessions it was on)."""
    from lamina.errors import UsageError

    if sum(x is not None for x in (user, group, machine)) != 1:
        raise UsageError("give exactly one of --user, --group, --machine")
    gone = admin(home, manager, token, ca).unentitle(layer, user=user, group=group, machine=machine)
    emit_json(gone) if as_json else say(gone.summary())


def register(root: typer.Typer) -> None:
    root.add_typer(user_app, name="user")
    root.add_typer(group_app, name="group")
    root.command("entitle")(entitle)
    root.command("unentitle")(unentitle)
