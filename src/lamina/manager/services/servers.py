"""Block servers of a cluster: registered with a heartbeat, machines assigned to them.

Every ``lamina serve --server-name NAME`` writes its row (name, the NBD address its
clients dial, its heartbeat interval) and refreshes ``heartbeat_at`` every interval. A
server is *live* while its last heartbeat is younger than ``LOST_BEATS`` intervals (its
own interval, from its row: servers need not agree on one); one that stopped cleanly
clears its heartbeat and is not live at once.

A machine is assigned to one server (``machines.server_id``): a new machine to the least
loaded live server, counting the machines assigned to each. A stateless machine whose
server is no longer live is moved to the least loaded live one by whoever looks first (a
live server's heartbeat sweeps them, and naming a machine's server moves it too), so it
boots from another server at its next boot without an admin. A stateful machine stays
where its delta is, lost server or not, until ``move`` (``lamina machine move``).

Clocks: heartbeats are compared with the reader's clock; hosts kept within a second or two
by NTP are far inside the default 3 x 5 s.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from lamina.errors import Conflict, NotFound, Unconfirmed, UsageError
from lamina.manager.models import BlockServer, Machine, utcnow
from lamina.names import check_name

if TYPE_CHECKING:
    from lamina.home import Home

# 5 s between heartbeats is one small UPDATE per server: 100 servers write 20 rows/s.
HEARTBEAT: Final = 5.0
# A server missing this many heartbeats in a row is lost (15 s with the default).
LOST_BEATS: Final = 3


@dataclass(frozen=True, slots=True)
class Assigned:
    name: str
    nbd_address: str  # HOST:PORT
    live: bool


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)  # SQLite: naive


def is_live(server: BlockServer, now: datetime | None = None) -> bool:
    if server.heartbeat_at is None:
        return False
    limit = timedelta(seconds=server.heartbeat_seconds * LOST_BEATS)
    return _aware(server.heartbeat_at) + limit > (now or utcnow())


def register(
    session: Session, *, name: str, nbd_address: str, heartbeat: float = HEARTBEAT
) -> BlockServer:
    """Add or update this server's row and mark it live."""
    check_name(name, "server name")
    if heartbeat <= 0:
        raise UsageError("the heartbeat interval must be positive")
    now = utcnow()
    row = session.scalars(select(BlockServer).where(BlockServer.name == name)).one_or_none()
    if row is None:
        row = BlockServer(name=name, nbd_address=nbd_address, heartbeat_seconds=heartbeat)
        session.add(row)
    row.nbd_address, row.heartbeat_seconds = nbd_address, heartbeat
    row.started_at = row.heartbeat_at = now
    session.flush()
    return row


def beat(session: Session, *, name: str) -> bool:
    """Refresh a server's heartbeat; False when its row is gone (register again)."""
    done = session.execute(
        update(BlockServer).where(BlockServer.name == name).values(heartbeat_at=utcnow())
    )
    return bool(getattr(done, "rowcount", 0))


def stop(session: Session, *, name: str) -> None:
    """A clean stop: the server is not live from now on, its stateless machines move."""
    session.execute(update(BlockServer).where(BlockServer.name == name).values(heartbeat_at=None))
    sweep(session)


def all_servers(session: Session) -> list[BlockServer]:
    return list(session.scalars(select(BlockServer).order_by(BlockServer.name)))


def loads(session: Session) -> Counter[int]:
    """Machines assigned to each server, by server id."""
    rows = session.execute(
        select(Machine.server_id, func.count())
        .where(Machine.server_id.is_not(None))
        .group_by(Machine.server_id)
    )
    return Counter({sid: n for sid, n in rows if sid is not None})


def _least_loaded(live: list[BlockServer], load: Counter[int]) -> BlockServer:
    return min(live, key=lambda s: (load[s.id], s.name))


def sweep(session: Session) -> int:
    """Move every stateless machine of a server that is not live (or of none yet) to the
    least loaded live ones; returns how many moved (none while no server is live)."""
    now = utcnow()
    servers = all_servers(session)
    live = [s for s in servers if is_live(s, now)]
    dead = [s.id for s in servers if not is_live(s, now)]
    if not live:
        return 0
    orphans = list(
        session.scalars(
            select(Machine)
            .where(
                or_(Machine.server_id.in_(dead), Machine.server_id.is_(None)),
                Machine.mode == "stateless",
            )
            .order_by(Machine.id)
            .with_for_update(skip_locked=True)
        )
    )
    if not orphans:
        return 0  # the usual beat: two indexed SELECTs, no count of every machine
    load = loads(session)
    for machine in orphans:
        target = _least_loaded(live, load)
        if machine.server_id is not None:
            load[machine.server_id] -= 1
        machine.server_id = target.id
        load[target.id] += 1
    session.flush()
    return len(orphans)


def assign(session: Session, machine: Machine) -> Assigned | None:
    """The machine's server, assigning one first when it has none (or, stateless, when
    its server is lost). None outside a cluster (no server registered)."""
    servers = {s.id: s for s in all_servers(session)}
    if not servers:
        return None
    now = utcnow()
    current = servers.get(machine.server_id) if machine.server_id is not None else None
    if current is not None and (is_live(current, now) or machine.mode == "stateful"):
        return Assigned(current.name, current.nbd_address, is_live(current, now))
    live = [s for s in servers.values() if is_live(s, now)]
    if not live:
        if current is None:
            return None
        return Assigned(current.name, current.nbd_address, False)
    target = _least_loaded(live, loads(session))
    machine.server_id = target.id
    session.flush()
    return Assigned(target.name, target.nbd_address, True)


def assigned(session: Session, machine: Machine) -> Assigned | None:
    """The machine's current server as recorded, without moving it (None: unassigned)."""
    if machine.server_id is None:
        return None
    row = session.get(BlockServer, machine.server_id)
    if row is None:
        return None
    return Assigned(row.name, row.nbd_address, is_live(row))


def get(session: Session, name: str) -> BlockServer:
    row = session.scalars(select(BlockServer).where(BlockServer.name == name)).one_or_none()
    if row is None:
        raise NotFound(f"no block server named {name!r}")
    return row


def server_for(session: Session, machine_name: str) -> Assigned | None:
    """The server a machine's client should dial now (its NBD address), assigning or
    moving it as ``assign`` does: what a boot script or a VM definition names. None
    outside a cluster."""
    from lamina.manager.services import machines

    return assign(session, machines.get(session, machine_name))


# -- moving a machine ------------------------------------------------------------------------

# The block server a home serves as, written by ``lamina serve --server-name`` (a stateful
# machine's delta is on its server's home: it is moved from there).
HOME_FILE: Final = "server-name"


def remember_home(home: Home, name: str) -> None:
    (home.root / HOME_FILE).write_text(name + "\n")


def home_server(home: Home) -> str | None:
    try:
        return (home.root / HOME_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


@dataclass(frozen=True, slots=True)
class Moved:
    server: Assigned
    committed: str | None  # the image version a stateful machine's delta became


def move(home: Home, *, name: str, to: str, force: bool = False) -> Moved:
    """Serve ``name`` from server ``to`` from its next boot. A stateful machine's delta
    goes through the bucket: committed as a version of image NAME.state, the machine
    re-pinned to it with an empty delta (run on its server's home, while the machine is
    off). A stateful machine whose server is lost moves only with ``force``, and then
    without the delta that stayed on that server."""
    from lamina.manager.services import audit, commit, machines

    with home.session(read_only=True) as session:
        machine = machines.get(session, name)
        target = get(session, to)
        if not is_live(target):
            raise Conflict(f"block server {to} is not live (no heartbeat)")
        current = assigned(session, machine)
        stateful = machine.mode == machines.STATEFUL
    if current is not None and current.name == to:
        raise UsageError(f"{name} is served by {to} already")
    committed = None
    if stateful and current is not None and not force:
        if not current.live:
            raise Unconfirmed(
                f"{name} is stateful and its server {current.name} is lost: its delta "
                "stays there; move it without (--force)"
            )
        if home_server(home) != current.name:
            raise UsageError(
                f"{name}'s delta is on the home of server {current.name}: run the move there"
            )
    if stateful and not force and machines.delta_blocks(home, name):
        committed = commit.commit_delta(home, machine=name, image=f"{name}.state", repin=True).ref
    with home.session() as session:
        machine = machines.get(session, name)
        machine.server_id = get(session, to).id
        found = assigned(session, machine)
        audit.record(session, "machine.move", name, to=to, committed=committed, force=force)
    assert found is not None
    return Moved(found, committed)
