"""Who gets what: users, groups, memberships, entitlements, writable layers, sessions.

Invariants the database itself enforces (so racing managers cannot break them):

- a writable layer belongs to one user (``writable_layers.user_id`` unique) and is in use
  on at most one machine at a time (``sessions.writable_id`` unique);
- a user has at most one session per machine (``sessions (user_id, machine_id)`` unique);
- an entitlement names exactly one target (check constraint) and appears once per layer
  (``entitlements (layer_id, target)`` unique).

``changes`` is an append-only log of what altered some machine's desired state; managers
poll its highest id (one indexed read) to wake their long-polling agents.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from lamina.manager.models.base import Base, utcnow


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Group(Base):
    __tablename__ = "groups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Membership(Base):
    __tablename__ = "memberships"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    group_id: Mapped[int] = mapped_column(
        ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class Entitlement(Base):
    """A layer for a user, a group or a machine; ``version`` pins one, NULL follows the
    latest. Layers attach in ``priority`` order (lower first: first wins)."""

    __tablename__ = "entitlements"
    __table_args__ = (
        UniqueConstraint("layer_id", "target"),
        CheckConstraint(
            "(CASE WHEN user_id IS NULL THEN 0 ELSE 1 END"
            " + CASE WHEN group_id IS NULL THEN 0 ELSE 1 END"
            " + CASE WHEN machine_id IS NULL THEN 0 ELSE 1 END) = 1",
            name="ck_entitlements_one_target",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    layer_id: Mapped[int] = mapped_column(ForeignKey("layers.id", ondelete="CASCADE"), index=True)
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=True, index=True
    )
    group_id: Mapped[int | None] = mapped_column(
        ForeignKey("groups.id", ondelete="CASCADE"), nullable=True, index=True
    )
    machine_id: Mapped[int | None] = mapped_column(
        ForeignKey("machines.id", ondelete="CASCADE"), nullable=True, index=True
    )
    target: Mapped[str] = mapped_column(String(40))  # "user:ID", "group:ID", "machine:ID"
    priority: Mapped[int] = mapped_column(Integer, default=100)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WritableLayer(Base):
    """A user's writable layer (a ``layers`` row of kind writable) and its policy."""

    __tablename__ = "writable_layers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), unique=True)
    layer_id: Mapped[int] = mapped_column(ForeignKey("layers.id", ondelete="CASCADE"), unique=True)
    policy: Mapped[str] = mapped_column(String(20), default="all")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class UserSession(Base):
    """A user logged in on a machine; holds the user's writable layer while it lasts."""

    __tablename__ = "sessions"
    __table_args__ = (UniqueConstraint("user_id", "machine_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    machine_id: Mapped[int] = mapped_column(
        ForeignKey("machines.id", ondelete="CASCADE"), index=True
    )
    writable_id: Mapped[int | None] = mapped_column(
        ForeignKey("writable_layers.id", ondelete="CASCADE"), nullable=True, unique=True
    )
    # The writable layer's version this session started from (its changes go on top).
    base_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Change(Base):
    """Something changed some machine's desired state (NULL machine: maybe every one)."""

    __tablename__ = "changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    machine_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
