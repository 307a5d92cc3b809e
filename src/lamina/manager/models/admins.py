"""Named administrator accounts and the audit log of what was done, by whom, from where.

An account has a role (``admin``: everything; ``helpdesk``: reads only) and one token at
a time, kept as its SHA-256 (shown once, when made). The installation's first token, the
one ``lamina admin token`` prints, stays in ``settings`` and stands for the built-in
account ``admin``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from lamina.manager.models.base import Base, utcnow


class AdminAccount(Base):
    __tablename__ = "admin_accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(20))  # admin | helpdesk
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(100))  # account, or the local user of the CLI
    via: Mapped[str] = mapped_column(String(20))  # cli | api | console
    address: Mapped[str] = mapped_column(String(100))  # the client's address, or "local"
    action: Mapped[str] = mapped_column(String(60), index=True)  # machine.add, ...
    target: Mapped[str] = mapped_column(String(300))
    detail: Mapped[str] = mapped_column(Text, default="{}")  # JSON object
