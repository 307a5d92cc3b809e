"""TLS client credentials issued by the home's CA: one row per certificate, by serial.

A certificate is good while its row exists and is not revoked (``--rotate`` revokes the
holder's earlier ones) and, for a machine, while the machine it was issued to exists:
``holder_id`` is that machine's machine-id, so a machine removed and added again under
the same name does not inherit the old one's credentials.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, String
from sqlalchemy.orm import Mapped, mapped_column

from lamina.manager.models.base import Base, utcnow


class Credential(Base):
    __tablename__ = "credentials"

    serial: Mapped[str] = mapped_column(String(40), primary_key=True)  # lower-case hex
    kind: Mapped[str] = mapped_column(String(20))  # machine | admin
    name: Mapped[str] = mapped_column(String(100), index=True)
    holder_id: Mapped[str] = mapped_column(String(32), default="")  # the machine-id
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
