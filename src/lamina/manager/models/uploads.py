"""Chunks machines uploaded that no layer version they saved holds yet."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from lamina.manager.models.base import Base, utcnow


class StagedChunk(Base):
    """One chunk one machine uploaded (proving it holds the data: every upload is checked
    against its id). Its bytes count against the machine's upload quota until a
    writable-layer version the machine saves names the chunk; until then it is what that
    save may name besides what the machine may read."""

    __tablename__ = "staged_chunks"

    machine_id: Mapped[int] = mapped_column(
        ForeignKey("machines.id", ondelete="CASCADE"), primary_key=True
    )
    chunk_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    uploaded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
