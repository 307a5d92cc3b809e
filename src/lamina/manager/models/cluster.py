"""Several block servers over one database and one bucket: the servers and their
heartbeats, and the store's import leases and condemned packs (``lamina.store.leases``)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Float, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from lamina.manager.models.base import Base


class BlockServer(Base):
    """A ``lamina serve --server-name NAME``: where its NBD clients reach it, and when it
    last said it was alive (None once it stopped cleanly)."""

    __tablename__ = "block_servers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    nbd_address: Mapped[str] = mapped_column(String(300))  # HOST:PORT
    heartbeat_seconds: Mapped[float] = mapped_column(Float)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class StoreLease(Base):
    """A writer of the bucket store (``kind`` "import") or its one gc (id "gc")."""

    __tablename__ = "store_leases"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(10))
    holder: Mapped[str] = mapped_column(String(200))  # host:pid, for people
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class CondemnedPack(Base):
    """A pack gc found dead: deleted from the bucket once no lease older than its
    condemnation is live and the grace period has passed."""

    __tablename__ = "condemned_packs"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    condemned_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
