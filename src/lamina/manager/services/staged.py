"""Chunks a machine uploaded that no layer version it saved holds yet (``staged_chunks``):
its upload quota, and what its next writable-layer save may name besides what it may
read.

An upload is refused when the machine's staged bytes would pass its quota
(``LAMINA_UPLOAD_QUOTA_BYTES``, 8 GiB by default: a session's new files, uploaded at
logout); a save takes the chunks it names off the machine's account. Chunks staged more
than ``STALE_AFTER`` ago count for nothing (an agent uploads right before its logout)
and are dropped at the machine's next upload.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Table, bindparam, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite

from lamina import settings as config
from lamina.errors import LimitExceeded
from lamina.manager.models import StagedChunk

QUOTA = 8 << 30
STALE_AFTER = timedelta(hours=24)
_BATCH = 500  # ids per IN list

_T = StagedChunk.__table__
assert isinstance(_T, Table)
_SUM = select(func.coalesce(func.sum(_T.c.bytes), 0)).where(
    _T.c.machine_id == bindparam("mid"), _T.c.uploaded_at >= bindparam("since")
)
_STALE = delete(_T).where(
    _T.c.machine_id == bindparam("mid"), _T.c.uploaded_at < bindparam("since")
)
_HELD = select(_T.c.chunk_id).where(
    _T.c.machine_id == bindparam("mid"),
    _T.c.uploaded_at >= bindparam("since"),
    _T.c.chunk_id.in_(bindparam("ids", expanding=True)),
)
_CLAIM = delete(_T).where(
    _T.c.machine_id == bindparam("mid"), _T.c.chunk_id.in_(bindparam("ids", expanding=True))
)
_UPSERT = {}
for _name, _dialect in (("postgresql", postgresql), ("sqlite", sqlite)):
    _insert = _dialect.insert(_T)
    _UPSERT[_name] = _insert.on_conflict_do_update(
        index_elements=[_T.c.machine_id, _T.c.chunk_id],
        set_={"bytes": _insert.excluded.bytes, "uploaded_at": _insert.excluded.uploaded_at},
    )


def quota() -> int:
    return config.load().upload_quota_bytes or QUOTA


def _since() -> datetime:
    return datetime.now(UTC) - STALE_AFTER


def staged_bytes(conn: Connection, machine_id: int) -> int:
    return int(conn.execute(_SUM, {"mid": machine_id, "since": _since()}).scalar_one())


def admit(conn: Connection, machine_id: int, incoming: int, limit: int) -> None:
    """LimitExceeded when ``incoming`` more bytes would take the machine past ``limit``."""
    staged = staged_bytes(conn, machine_id)
    if staged + incoming > limit:
        raise LimitExceeded(
            f"upload quota of {limit >> 20} MiB reached: {staged >> 20} MiB uploaded and not"
            f" yet saved in a layer, {incoming >> 20} MiB more sent (a logout that saves the"
            " writable layer frees it)"
        )


def record(conn: Connection, machine_id: int, chunks: Iterable[tuple[bytes, int]]) -> None:
    """Note chunks (id, bytes received) the machine uploaded."""
    now = datetime.now(UTC)
    conn.execute(_STALE, {"mid": machine_id, "since": now - STALE_AFTER})
    rows = [
        {"machine_id": machine_id, "chunk_id": cid.hex(), "bytes": size, "uploaded_at": now}
        for cid, size in chunks
    ]
    if rows:
        conn.execute(_UPSERT[conn.dialect.name], rows)


def held(conn: Connection, machine_id: int, ids: Iterable[bytes]) -> set[bytes]:
    """Which of ``ids`` the machine uploaded (and has not saved yet)."""
    wanted = [c.hex() for c in ids]
    found: set[bytes] = set()
    since = _since()
    for start in range(0, len(wanted), _BATCH):
        part = wanted[start : start + _BATCH]
        for (cid,) in conn.execute(_HELD, {"mid": machine_id, "since": since, "ids": part}):
            found.add(bytes.fromhex(cid))
    return found


def claim(conn: Connection, machine_id: int, ids: Iterable[bytes]) -> None:
    """A saved version holds these chunks now: off the machine's account."""
    wanted = [c.hex() for c in ids]
    for start in range(0, len(wanted), _BATCH):
        conn.execute(_CLAIM, {"mid": machine_id, "ids": wanted[start : start + _BATCH]})
