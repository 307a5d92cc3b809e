"""The admin operations as one interface, ``Admin``, with two implementations:

- ``HomeAdmin`` runs them on a home's database: it calls the service that holds each
  operation's rules and turns the rows into the API's Public schemas (``views``). The CLI
  on a ``--home``, the HTTP API's admin routes and the console all go through it.
- ``RemoteAdmin`` runs them through a manager's HTTP API (the CLI's ``--manager URL``),
  whose routes go through a ``HomeAdmin`` on the manager's home.

So an operation answers alike on every front end: the same result, or the same refusal
(errors travel over HTTP by kind, see ``lamina.errors.from_http``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

from lamina.manager import schemas as s
from lamina.manager import views
from lamina.manager.services import audit
from lamina.manager.services.audit import Actor
from lamina.names import parse_ref

P = ParamSpec("P")
R = TypeVar("R")

if TYPE_CHECKING:
    from lamina.home import Home
    from lamina.manager.client import ManagerClient


class Admin(Protocol):
    # machines
    def add_machine(self, body: s.MachineCreate) -> s.MachineCreated: ...
    def show_machine(self, name: str) -> s.MachineDetail: ...
    def change_machine(
        self, name: str, body: s.MachineUpdate, *, force: bool = False
    ) -> s.MachineDetail: ...
    def reset_machine(self, name: str, *, force: bool = False) -> s.MachineReset: ...
    def remove_machine(self, name: str, *, force: bool = False) -> s.MachineRemoved: ...
    def commit_delta(self, name: str, body: s.DeltaCommit) -> s.DeltaCommitted: ...
    def move_machine(
        self, name: str, body: s.MachineMove, *, force: bool = False
    ) -> s.MachineMoved: ...

    # images and layers
    def remove_image(self, ref: str) -> s.VersionsRemoved: ...
    def remove_layer(self, ref: str, *, force: bool = False) -> s.VersionsRemoved: ...

    # users and groups
    def add_user(self, body: s.UserCreate) -> s.UserPublic: ...
    def change_user(self, name: str, body: s.UserUpdate) -> s.UserPublic: ...
    def remove_user(self, name: str) -> None: ...
    def show_user(self, name: str) -> s.UserPublic: ...
    def list_users(self) -> list[s.UserPublic]: ...
    def add_group(self, body: s.GroupCreate) -> s.GroupPublic: ...
    def remove_group(self, name: str) -> None: ...
    def list_groups(self) -> list[s.GroupPublic]: ...
    def add_member(self, group: str, body: s.MemberCreate) -> None: ...
    def remove_member(self, group: str, user: str) -> None: ...

    # entitlements
    def entitle(self, body: s.EntitlementCreate) -> s.EntitlementPublic: ...
    def unentitle(
        self,
        layer: str,
        *,
        user: str | None = None,
        group: str | None = None,
        machine: str | None = None,
    ) -> s.Unentitled: ...
    def remove_entitlement(self, id: int, *, layer: str | None = None) -> s.Unentitled: ...
    def list_entitlements(
        self,
        *,
        layer: str | None = None,
        user: str | None = None,
        group: str | None = None,
        machine: str | None = None,
    ) -> list[s.EntitlementPublic]: ...


def _acting(method: Callable[P, R]) -> Callable[P, R]:
    """Run a changing operation as the admin's actor, whom its service's audit entry names."""

    @functools.wraps(method)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        actor = getattr(args[0], "actor", None)
        if actor is None:
            return method(*args, **kwargs)
        with audit.acting_as(actor):
            return method(*args, **kwargs)

    return run


class HomeAdmin:
    """``Admin`` on a home's database: each method one transaction (a delta commit reads
    the delta outside any, see ``services.commit``)."""

    def __init__(self, home: Home, actor: Actor | None = None) -> None:
        self.home = home
        self.actor = actor  # who the audit log names (None: the local user of the CLI)

    # -- machines --------------------------------------------------------------------------

    def _detail(self, name: str) -> s.MachineDetail:
        from lamina.manager.services import fleet, machines

        with self.home.session(read_only=True) as session:
            m = machines.get(session, name)
            users = fleet.users_on(session, [m.id]).get(m.id, [])
            return views.machine_detail(self.home, m, users)

    @_acting
    def add_machine(self, body: s.MachineCreate) -> s.MachineCreated:
        from lamina.manager.services import machines

        with self.home.session() as session:
            added = machines.add(session, **body.model_dump())
            detail = views.machine_detail(self.home, added.machine, [])
        return s.MachineCreated(**detail.model_dump(), token=added.token)

    def show_machine(self, name: str) -> s.MachineDetail:
        return self._detail(name)

    @_acting
    def change_machine(
        self, name: str, body: s.MachineUpdate, *, force: bool = False
    ) -> s.MachineDetail:
        from lamina.manager.services import machines

        machines.change(self.home, name=name, update=body, force=force)
        return self._detail(name)

    @_acting
    def reset_machine(self, name: str, *, force: bool = False) -> s.MachineReset:
        from lamina.manager.services import machines

        freed = machines.reset(self.home, name=name, force=force)
        return s.MachineReset(name=name, freed_bytes=freed)

    @_acting
    def remove_machine(self, name: str, *, force: bool = False) -> s.MachineRemoved:
        from lamina.manager.services import machines

        freed = machines.remove(self.home, name=name, force=force)
        return s.MachineRemoved(removed=name, freed_bytes=freed)

    @_acting
    def commit_delta(self, name: str, body: s.DeltaCommit) -> s.DeltaCommitted:
        from lamina.manager.services.commit import commit_delta

        return commit_delta(self.home, machine=name, image=body.image, repin=body.repin)

    @_acting
    def move_machine(
        self, name: str, body: s.MachineMove, *, force: bool = False
    ) -> s.MachineMoved:
        from lamina.manager.services import servers

        moved = servers.move(self.home, name=name, to=body.to, force=force)
        return s.MachineMoved(
            name=name,
            server=moved.server.name,
            nbd_server=moved.server.nbd_address,
            committed=moved.committed,
        )

    # -- images and layers -----------------------------------------------------------------

    @_acting
    def remove_image(self, ref: str) -> s.VersionsRemoved:
        from lamina.manager.services import images

        parsed = parse_ref(ref, "image name")
        with self.home.session() as session:
            return s.VersionsRemoved(removed=images.remove(session, ref=parsed))

    @_acting
    def remove_layer(self, ref: str, *, force: bool = False) -> s.VersionsRemoved:
        from lamina.manager.services import layers

        parsed = parse_ref(ref, "layer name")
        return s.VersionsRemoved(removed=layers.remove(self.home, ref=parsed, force=force))

    # -- users and groups ------------------------------------------------------------------

    @_acting
    def add_user(self, body: s.UserCreate) -> s.UserPublic:
        from lamina.manager.services import access

        with self.home.session() as session:
            access.add_user(session, name=body.name, groups=body.groups, policy=body.policy)
            return views.user(access.user_row(session, body.name))

    @_acting
    def change_user(self, name: str, body: s.UserUpdate) -> s.UserPublic:
        from lamina.manager.services import access

        with self.home.session() as session:
            access.update_user(session, name=name, policy=body.policy, groups=body.groups)
            return views.user(access.user_row(session, name))

    @_acting
    def remove_user(self, name: str) -> None:
        from lamina.manager.services import access

        with self.home.session() as session:
            access.remove_user(session, name=name)

    def show_user(self, name: str) -> s.UserPublic:
        from lamina.manager.services import access

        with self.home.session(read_only=True) as session:
            return views.user(access.user_row(session, name))

    def list_users(self) -> list[s.UserPublic]:
        from lamina.manager.services import access

        rows: list[s.UserPublic] = []
        with self.home.session(read_only=True) as session:
            while True:
                page, total = access.list_users(session, offset=len(rows), limit=1000)
                rows += [views.user(r) for r in page]
                if not page or len(rows) >= total:
                    return rows

    @_acting
    def add_group(self, body: s.GroupCreate) -> s.GroupPublic:
        from lamina.manager.services import access

        with self.home.session() as session:
            return views.group(access.add_group(session, name=body.name), 0)

    @_acting
    def remove_group(self, name: str) -> None:
        from lamina.manager.services import access

        with self.home.session() as session:
            access.remove_group(session, name=name)

    def list_groups(self) -> list[s.GroupPublic]:
        from lamina.manager.services import access

        with self.home.session(read_only=True) as session:
            found, _total = access.list_groups(session, limit=100_000)
            return [views.group(g, n) for g, n in found]

    @_acting
    def add_member(self, group: str, body: s.MemberCreate) -> None:
        from lamina.manager.services import access

        with self.home.session() as session:
            access.add_member(session, group=group, user=body.user)

    @_acting
    def remove_member(self, group: str, user: str) -> None:
        from lamina.manager.services import access

        with self.home.session() as session:
            access.remove_member(session, group=group, user=user)

    # -- entitlements ----------------------------------------------------------------------

    @_acting
    def entitle(self, body: s.EntitlementCreate) -> s.EntitlementPublic:
        from lamina.manager.services import access

        with self.home.session() as session:
            to = access.target(session, user=body.user, group=body.group, machine=body.machine)
            ent = access.entitle(session, layer=body.layer, to=to, priority=body.priority)
            return views.entitlement(access.entitlement_row(session, id=ent.id))

    @_acting
    def unentitle(
        self,
        layer: str,
        *,
        user: str | None = None,
        group: str | None = None,
        machine: str | None = None,
    ) -> s.Unentitled:
        from lamina.manager.services import access

        with self.home.session() as session:
            return access.unentitle(session, layer=layer, user=user, group=group, machine=machine)

    @_acting
    def remove_entitlement(self, id: int, *, layer: str | None = None) -> s.Unentitled:
        from lamina.manager.services import access

        with self.home.session() as session:
            return access.unentitle(session, layer=layer, id=id)

    def list_entitlements(
        self,
        *,
        layer: str | None = None,
        user: str | None = None,
        group: str | None = None,
        machine: str | None = None,
    ) -> list[s.EntitlementPublic]:
        """Filtered by layer, user, group or machine (each name exactly)."""
        from lamina.manager.services import access

        rows: list[s.EntitlementPublic] = []
        with self.home.session(read_only=True) as session:
            while True:
                page, total = access.list_entitlements(
                    session,
                    layer=layer,
                    user=user,
                    group=group,
                    machine=machine,
                    offset=len(rows),
                    limit=1000,
                )
                rows += [views.entitlement(r) for r in page]
                if not page or len(rows) >= total:
                    return rows


class RemoteAdmin:
    """``Admin`` through a manager's HTTP API."""

    def __init__(self, client: ManagerClient) -> None:
        self.client = client

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.client.json(method, path, **kwargs)

    @staticmethod
    def _force(force: bool) -> dict[str, Any]:
        return {"params": {"force": "true"}} if force else {}

    # -- machines --------------------------------------------------------------------------

    def add_machine(self, body: s.MachineCreate) -> s.MachineCreated:
        data = self._call("POST", "/machines", json=body.model_dump(exclude_none=True))
        return s.MachineCreated.model_validate(data)

    def show_machine(self, name: str) -> s.MachineDetail:
        return s.MachineDetail.model_validate(self._call("GET", f"/machines/{name}"))

    def change_machine(
        self, name: str, body: s.MachineUpdate, *, force: bool = False
    ) -> s.MachineDetail:
        data = self._call(
            "PATCH",
            f"/machines/{name}",
            json=body.model_dump(exclude_defaults=True),
            **self._force(force),
        )
        return s.MachineDetail.model_validate(data)

    def reset_machine(self, name: str, *, force: bool = False) -> s.MachineReset:
        data = self._call("POST", f"/machines/{name}/reset", **self._force(force))
        return s.MachineReset.model_validate(data)

    def remove_machine(self, name: str, *, force: bool = False) -> s.MachineRemoved:
        data = self._call("DELETE", f"/machines/{name}", **self._force(force))
        return s.MachineRemoved.model_validate(data)

    def commit_delta(self, name: str, body: s.DeltaCommit) -> s.DeltaCommitted:
        data = self._call("POST", f"/machines/{name}/commit", json=body.model_dump())
        return s.DeltaCommitted.model_validate(data)

    def move_machine(
        self, name: str, body: s.MachineMove, *, force: bool = False
    ) -> s.MachineMoved:
        data = self._call(
            "POST", f"/machines/{name}/move", json=body.model_dump(), **self._force(force)
        )
        return s.MachineMoved.model_validate(data)

    # -- images and layers -----------------------------------------------------------------

    def _remove_versions(self, kind: str, ref: str, force: bool) -> s.VersionsRemoved:
        parsed = parse_ref(ref, f"{kind} name")
        params: dict[str, Any] = {} if parsed.version is None else {"version": parsed.version}
        if force:
            params["force"] = "true"
        data = self._call("DELETE", f"/{kind}s/{parsed.name}", params=params)
        return s.VersionsRemoved.model_validate(data)

    def remove_image(self, ref: str) -> s.VersionsRemoved:
        return self._remove_versions("image", ref, False)

    def remove_layer(self, ref: str, *, force: bool = False) -> s.VersionsRemoved:
        return self._remove_versions("layer", ref, force)

    # -- users and groups ------------------------------------------------------------------

    def add_user(self, body: s.UserCreate) -> s.UserPublic:
        return s.UserPublic.model_validate(self._call("POST", "/users", json=body.model_dump()))

    def change_user(self, name: str, body: s.UserUpdate) -> s.UserPublic:
        data = self._call("PATCH", f"/users/{name}", json=body.model_dump(exclude_none=True))
        return s.UserPublic.model_validate(data)

    def remove_user(self, name: str) -> None:
        self._call("DELETE", f"/users/{name}")

    def show_user(self, name: str) -> s.UserPublic:
        return s.UserPublic.model_validate(self._call("GET", f"/users/{name}"))

    def list_users(self) -> list[s.UserPublic]:
        return [s.UserPublic.model_validate(u) for u in self.client.pages("/users")]

    def add_group(self, body: s.GroupCreate) -> s.GroupPublic:
        return s.GroupPublic.model_validate(self._call("POST", "/groups", json=body.model_dump()))

    def remove_group(self, name: str) -> None:
        self._call("DELETE", f"/groups/{name}")

    def list_groups(self) -> list[s.GroupPublic]:
        return [s.GroupPublic.model_validate(g) for g in self.client.pages("/groups")]

    def add_member(self, group: str, body: s.MemberCreate) -> None:
        self._call("POST", f"/groups/{group}/members", json=body.model_dump())

    def remove_member(self, group: str, user: str) -> None:
        self._call("DELETE", f"/groups/{group}/members/{user}")

    # -- entitlements ----------------------------------------------------------------------

    def entitle(self, body: s.EntitlementCreate) -> s.EntitlementPublic:
        data = self._call("POST", "/entitlements", json=body.model_dump(exclude_none=True))
        return s.EntitlementPublic.model_validate(data)

    def unentitle(
        self,
        layer: str,
        *,
        user: str | None = None,
        group: str | None = None,
        machine: str | None = None,
    ) -> s.Unentitled:
        targets = {"user": user, "group": group, "machine": machine}
        params = {"layer": layer} | {k: v for k, v in targets.items() if v is not None}
        return s.Unentitled.model_validate(self._call("DELETE", "/entitlements", params=params))

    def remove_entitlement(self, id: int, *, layer: str | None = None) -> s.Unentitled:
        params = {"layer": layer} if layer is not None else {}
        data = self._call("DELETE", f"/entitlements/{id}", params=params)
        return s.Unentitled.model_validate(data)

    def list_entitlements(
        self,
        *,
        layer: str | None = None,
        user: str | None = None,
        group: str | None = None,
        machine: str | None = None,
    ) -> list[s.EntitlementPublic]:
        filters = {"layer": layer, "user": user, "group": group, "machine": machine}
        given = {k: v for k, v in filters.items() if v is not None}
        found = self.client.pages("/entitlements", **given)
        return [s.EntitlementPublic.model_validate(e) for e in found]
