"""The store's leases and condemned packs (``lamina.store.leases``) as database rows, for
the homes that share one bucket and one database."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from lamina.errors import Conflict
from lamina.home import Home
from lamina.manager.models import CondemnedPack, StoreLease, utcnow
from lamina.store.leases import GC, IMPORT, LEASE_SECONDS, SETTLE_SECONDS, holder


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)  # SQLite: naive


def lease_seconds() -> float:
    """``LAMINA_STORE_LEASE`` (``store_lease``) seconds, else the default; the same on every
    home."""
    from lamina.settings import load

    value = load().store_lease
    return LEASE_SECONDS if value is None else value


class DatabaseLeases:
    def __init__(
        self, home: Home, lease: float | None = None, settle: float = SETTLE_SECONDS
    ) -> None:
        self.home = home
        self.lease_seconds = lease if lease is not None else lease_seconds()
        self.settle = settle
        # Longer than a lease, so a writer's last beat before it died is long past.
        self.grace = 2 * self.lease_seconds + settle

    def _expiry(self) -> datetime:
        return utcnow() - timedelta(seconds=self.lease_seconds)

    def begin(self, kind: str) -> str:
        lease = GC if kind == GC else uuid.uuid4().hex
        now = utcnow()
        with self.home.session() as session:
            session.execute(delete(StoreLease).where(StoreLease.heartbeat_at < self._expiry()))
        try:
            with self.home.session() as session:
                session.add(
                    StoreLease(
                        id=lease, kind=kind, holder=holder(), started_at=now, heartbeat_at=now
                    )
                )
        except IntegrityError:
            with self.home.session(read_only=True) as session:
                other = session.get(StoreLease, GC)
            who = other.holder if other is not None else "another process"
            raise Conflict(f"another `lamina store gc` is running on this bucket ({who})") from None
        return lease

    def beat(self, lease: str) -> bool:
        with self.home.session() as session:
            done = session.execute(
                update(StoreLease)
                .where(StoreLease.id == lease, StoreLease.heartbeat_at >= self._expiry())
                .values(heartbeat_at=utcnow())
            )
            return bool(getattr(done, "rowcount", 0))

    def end(self, lease: str) -> None:
        with self.home.session() as session:
            session.execute(delete(StoreLease).where(StoreLease.id == lease))

    def condemned(self) -> set[str]:
        with self.home.session(read_only=True) as session:
            return set(session.scalars(select(CondemnedPack.name)))

    def condemn(self, names: Iterable[str]) -> None:
        now = utcnow()
        with self.home.session() as session:
            known = set(session.scalars(select(CondemnedPack.name)))
            for name in set(names) - known:
                session.add(CondemnedPack(name=name, condemned_at=now))

    def deletable(self) -> list[str]:
        now = utcnow()
        with self.home.session(read_only=True) as session:
            oldest = session.scalar(
                select(func.min(StoreLease.started_at)).where(
                    StoreLease.kind == IMPORT, StoreLease.heartbeat_at >= self._expiry()
                )
            )
            rows = list(session.execute(select(CondemnedPack.name, CondemnedPack.condemned_at)))
        settle = timedelta(seconds=self.settle)
        ready = []
        for name, condemned_at in rows:
            when = _aware(condemned_at)
            if when + timedelta(seconds=self.grace) > now:
                continue
            if oldest is not None and _aware(oldest) <= when + settle:
                continue  # an import that may have reused its chunks is still running
            ready.append(name)
        return sorted(ready)

    def pardon(self, names: Iterable[str]) -> None:
        with self.home.session() as session:
            session.execute(delete(CondemnedPack).where(CondemnedPack.name.in_(list(names))))
