"""Rows as the API's Public schemas: the API, the CLI on a home and the console show the
same fields, made in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lamina.manager import schemas as s

if TYPE_CHECKING:
    from lamina.home import Home
    from lamina.manager.models import Group, Image, Layer, Machine
    from lamina.manager.services.access import EntitlementRow, UserRow
    from lamina.manager.services.fleet import VersionRow
    from lamina.manager.services.servers import Assigned


def user(row: UserRow) -> s.UserPublic:
    return s.UserPublic(
        name=row.user.name,
        groups=row.groups,
        writable=row.writable,
        policy=row.policy,
        writable_version=row.writable_version,
        in_use_on=row.in_use_on,
        created_at=row.user.created_at,
    )


def group(row: Group, members: int) -> s.GroupPublic:
    return s.GroupPublic(name=row.name, members=members, created_at=row.created_at)


def entitlement(row: EntitlementRow) -> s.EntitlementPublic:
    return s.EntitlementPublic.model_validate(row, from_attributes=True)


def _server(m: Machine) -> Assigned | None:
    from sqlalchemy.orm import object_session

    from lamina.manager.services import servers

    session = object_session(m)
    return servers.assigned(session, m) if session is not None else None


def _machine_fields(m: Machine, users: list[str]) -> dict[str, Any]:
    server = _server(m)
    return {
        "server": server.name if server else None,
        "name": m.name,
        "image": m.image_version.ref,
        "mode": m.mode,
        "hostname": m.hostname,
        "fqdn": m.fqdn,
        "domain": m.domain,
        "mac": m.mac,
        "identity_rev": m.identity_rev,
        "last_boot_at": m.last_boot_at,
        "users": users,
        "created_at": m.created_at,
    }


def machine(m: Machine, users: list[str]) -> s.MachinePublic:
    return s.MachinePublic(**_machine_fields(m, users))


def machine_detail(home: Home, m: Machine, users: list[str]) -> s.MachineDetail:
    """Everything about one machine: identity, and its delta as it is on disk now."""
    from lamina.delta.file import BLOCK, delta_usage
    from lamina.identity import identity_from_machine, instance_id

    blocks, stored = delta_usage(home.deltas_dir / m.name)
    server = _server(m)
    identity = identity_from_machine(m)
    return s.MachineDetail(
        **_machine_fields(m, users),
        delta_bytes=blocks * BLOCK,
        delta_stored_bytes=stored,
        machine_id=m.machine_id,
        instance_id=instance_id(identity),
        ssh_host_keys={k: v["public"] for k, v in identity.ssh_host_keys.items()},
        network=identity.network,
        extra_config=identity.extra_config,
        exports=[f"machine/{m.name}", f"machine/{m.name}/seed"],
        nbd_server=server.nbd_address if server else None,
        server_live=server.live if server else None,
    )


def image(row: Image, versions: list[VersionRow]) -> s.ImagePublic:
    return s.ImagePublic(
        name=row.name,
        created_at=row.created_at,
        versions=[
            s.ImageVersionPublic(
                version=v.version.version,
                ref=f"{row.name}@{v.version.version}",
                size=v.version.size,
                stored_bytes=v.version.stored_bytes,
                machines=v.machines,
                created_at=v.version.created_at,
            )
            for v in versions
        ],
    )


def layer(row: Layer, entitled: int) -> s.LayerPublic:
    return s.LayerPublic(
        name=row.name,
        kind=row.kind,
        entitlements=entitled,
        created_at=row.created_at,
        versions=[
            s.LayerVersionPublic(
                version=v.version,
                ref=f"{row.name}@{v.version}",
                files=v.files,
                size=v.size,
                stored_bytes=v.stored_bytes,
                policy=v.policy,
                created_at=v.created_at,
            )
            for v in row.versions
        ],
    )
