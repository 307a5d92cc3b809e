"""What the web console shows that other services do not compute: machine rows with their
delta size and connection state, the dashboard's aggregates, per-version stored and unique
bytes, and the users' writable layers (sizes, sessions, pending rebases).

Every listing is one page of the database (server-side paging); per-machine facts come from
the home's delta directory with a ``stat`` each, never by reading a delta.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lamina.errors import LaminaError
from lamina.manager.models import (
    Entitlement,
    Group,
    Image,
    ImageVersion,
    Layer,
    LayerVersion,
    Machine,
    User,
    UserSession,
)
from lamina.manager.services import access, fleet, servers
from lamina.store import ChunkStore

# Logins counted for the dashboard's rate (sessions started this long ago or later).
RATE_WINDOW = timedelta(minutes=5)


# -- machines' deltas and connections ---------------------------------------------------------


def held_flocks() -> set[tuple[int, int]]:
    """(device, inode) of every file flock'ed on this host, from ``/proc/locks``.

    A machine's delta is flock'ed by whoever has it open: the block server while a client
    is connected (also a commit or a reset, for a moment). Reading the kernel's lock table
    tells which deltas are open without touching their locks, which could make a
    connecting client fail, and sees every ``lamina serve`` on the host, not just this one.
    """
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return set()
    held: set[tuple[int, int]] = set()
    for line in text.splitlines():
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2253879 0 EOF"; waiters show "->" after the index
        if len(parts) < 6 or parts[1] != "FLOCK":
            continue
        try:
            major, minor, inode = parts[5].split(":")
            held.add((os.makedev(int(major, 16), int(minor, 16)), int(inode)))
        except ValueError:
            continue
    return held


@dataclass(frozen=True, slots=True)
class DeltaState:
    connected: bool  # its disk is open on the block server (on this host)
    delta_bytes: int  # bytes in the delta's data file (0 after a reset)


def delta_state(deltas: Path, name: str, held: set[tuple[int, int]]) -> DeltaState:
    directory = deltas / name
    size = 0
    connected = False
    with contextlib.suppress(OSError):
        size = (directory / "delta.data").stat().st_size
    if held:
        with contextlib.suppress(OSError):
            st = (directory / "lock").stat()
            connected = (st.st_dev, st.st_ino) in held
    return DeltaState(connected, size)


@dataclass(frozen=True, slots=True)
class MachineRow:
    name: str
    mode: str
    image: str  # NAME@V
    image_name: str
    version: int
    # Its disk is open on the block server, or a user is logged in on it (a machine that
    # streams its image runs from a local endpoint: its sessions show it is up).
    online: bool
    delta_bytes: int
    last_boot_at: datetime | None
    users: list[str]
    fqdn: str
    mac: str = ""


def machine_rows(session: Session, *, deltas: Path, machines: list[Machine]) -> list[MachineRow]:
    users = fleet.users_on(session, [m.id for m in machines])
    held = held_flocks()
    rows = []
    for m in machines:
        state = delta_state(deltas, m.name, held)
        rows.append(
            MachineRow(
                name=m.name,
                mode=m.mode,
                image=m.image_version.ref,
                image_name=m.image_version.image.name,
                version=m.image_version.version,
                online=state.connected or m.id in users,
                delta_bytes=state.delta_bytes,
                last_boot_at=m.last_boot_at,
                users=users.get(m.id, []),
                fqdn=m.fqdn,
                mac=m.mac,
            )
        )
    return rows


def list_machines(
    session: Session,
    *,
    deltas: Path,
    offset: int = 0,
    limit: int = 50,
    q: str = "",
    image: str | None = None,
    mode: str | None = None,
    sort: str = "name",
    descending: bool = False,
) -> tuple[list[MachineRow], int]:
    machines, total = fleet.list_machines(
        session,
        offset=offset,
        limit=limit,
        q=q,
        image=image,
        mode=mode,
        sort=sort,
        descending=descending,
    )
    return machine_rows(session, deltas=deltas, machines=machines), total


def versions_of(session: Session, *, images: list[str]) -> dict[str, list[int]]:
    """The versions of each named image (for re-pin choices)."""
    out: dict[str, list[int]] = {}
    for name, version in session.execute(
        select(Image.name, ImageVersion.version)
        .join(ImageVersion, ImageVersion.image_id == Image.id)
        .where(Image.name.in_(set(images)))
        .order_by(Image.name, ImageVersion.version)
    ):
        out.setdefault(name, []).append(version)
    return out


def image_names(session: Session, *, limit: int = 500) -> list[str]:
    return list(session.scalars(select(Image.name).order_by(Image.name).limit(limit)))


@dataclass(frozen=True, slots=True)
class MachineDetail:
    row: MachineRow
    hostname: str
    domain: str | None
    mac: str
    machine_id: str
    identity_rev: int
    extra_config: str | None  # YAML, as the seed disk carries it
    network: str | None
    created_at: datetime
    entitlements: list[access.EntitlementRow]
    server: servers.Assigned | None = None  # its block server, in a cluster


def _yaml(text: str | None) -> str | None:
    if not text:
        return None
    import yaml

    try:
        return str(yaml.safe_dump(json.loads(text), sort_keys=False, allow_unicode=True))
    except ValueError:
        return text


def machine_detail(session: Session, *, deltas: Path, name: str) -> MachineDetail:
    from lamina.manager.services import machines

    m = machines.get(session, name)
    row = machine_rows(session, deltas=deltas, machines=[m])[0]
    ents, _n = access.list_entitlements(session, machine=m.name, limit=200)
    return MachineDetail(
        row=row,
        hostname=m.hostname,
        domain=m.domain,
        mac=m.mac,
        machine_id=m.machine_id,
        identity_rev=m.identity_rev,
        extra_config=_yaml(m.extra_config),
        network=_yaml(m.network),
        created_at=m.created_at,
        entitlements=ents,
        server=servers.assigned(session, m),
    )


# -- dashboard --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dashboard:
    machines: int
    online: int
    stateless: int
    sessions: int
    users_logged_in: int
    users: int
    groups: int
    layers: int
    entitlements: int
    logins_per_minute: float
    versions_in_use: list[tuple[str, int]]  # (NAME@V, machines), most used first
    image_versions: int
    delta_bytes: int
    store_bytes: int
    store_chunks: int
    # image versions' data (their chunks of zeros left out) + layer versions' file data:
    # a 64 GiB disk holding 3 GiB counts 3 GiB, so the dedup ratio is what sharing saved
    logical_bytes: int

    @property
    def offline(self) -> int:
        return self.machines - self.online

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.store_bytes if self.store_bytes else 0.0


_DATA_BYTES: dict[str, int] = {}  # manifest id -> its bytes that are not zeros (immutable)


def data_bytes(store: ChunkStore, manifest_id: str) -> int:
    """The bytes of an image version that are not zeros (its zero chunks are holes)."""
    found = _DATA_BYTES.get(manifest_id)
    if found is None:
        from lamina.image import Manifest
        from lamina.store.codec import ZERO_ID

        try:
            m = Manifest.from_bytes(store.get(bytes.fromhex(manifest_id)))
        except LaminaError:  # a missing manifest is `store verify`'s to report
            return 0
        found = sum(m.chunk_len(i) for i, cid in enumerate(m.ids()) if cid != ZERO_ID)
        if len(_DATA_BYTES) > 10_000:
            _DATA_BYTES.clear()
        _DATA_BYTES[manifest_id] = found
    return found


def _count(session: Session, model: type[Any]) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


def dashboard(session: Session, *, store: ChunkStore, deltas: Path) -> Dashboard:
    names = set(session.scalars(select(Machine.name)))
    online = set(
        session.scalars(
            select(Machine.name).join(UserSession, UserSession.machine_id == Machine.id)
        )
    )
    held = held_flocks()
    delta_bytes = 0
    with os.scandir(deltas) as entries:
        for entry in entries:
            if entry.name in names and entry.is_dir():
                state = delta_state(deltas, entry.name, held)
                if state.connected:
                    online.add(entry.name)
                delta_bytes += state.delta_bytes
    since = datetime.now(UTC) - RATE_WINDOW
    recent = (
        session.scalar(
            select(func.count()).select_from(UserSession).where(UserSession.started_at >= since)
        )
        or 0
    )
    in_use = [
        (f"{name}@{version}", n)
        for name, version, n in session.execute(
            select(Image.name, ImageVersion.version, func.count(Machine.id))
            .join(ImageVersion, ImageVersion.id == Machine.image_version_id)
            .join(Image, Image.id == ImageVersion.image_id)
            .group_by(Image.name, ImageVersion.version)
            .order_by(func.count(Machine.id).desc(), Image.name, ImageVersion.version)
            .limit(10)
        )
    ]
    manifests = session.scalars(select(ImageVersion.manifest_id))
    logical = sum(data_bytes(store, mid) for mid in manifests) + (
        session.scalar(select(func.coalesce(func.sum(LayerVersion.size), 0))) or 0
    )
    usage = store.usage()
    return Dashboard(
        machines=len(names),
        online=len(online),
        stateless=session.scalar(
            select(func.count()).select_from(Machine).where(Machine.mode == "stateless")
        )
        or 0,
        sessions=_count(session, UserSession),
        users_logged_in=session.scalar(select(func.count(func.distinct(UserSession.user_id)))) or 0,
        users=_count(session, User),
        groups=_count(session, Group),
        layers=session.scalar(select(func.count()).select_from(Layer).where(Layer.kind == "app"))
        or 0,
        entitlements=_count(session, Entitlement),
        logins_per_minute=recent / (RATE_WINDOW.total_seconds() / 60),
        versions_in_use=in_use,
        image_versions=_count(session, ImageVersion),
        delta_bytes=delta_bytes,
        store_bytes=usage.pack_bytes,
        store_chunks=usage.chunks,
        logical_bytes=int(logical),
    )


# -- images: stored and unique bytes per version -----------------------------------------------
