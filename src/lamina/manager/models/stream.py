"""Streaming: boot profiles, the order in which boots first read an image version's chunks."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from lamina.manager.models.base import Base, utcnow


class BootProfile(Base):
    """Keyed by manifest id: versions with the same content boot the same way.

    ``chunks`` holds little-endian u32 chunk indices in first-read order (see
    ``lamina.serve.profile``); ``boots`` counts the boots merged into it."""

    __tablename__ = "boot_profiles"

    manifest_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    chunks: Mapped[bytes] = mapped_column(LargeBinary)
    boots: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
