"""Machines: identity (from the database, not the image), pinned image version, mode."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from lamina.manager.models.base import Base, utcnow
from lamina.manager.models.images import ImageVersion


class Machine(Base):
    __tablename__ = "machines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    image_version_id: Mapped[int] = mapped_column(ForeignKey("image_versions.id"), index=True)
    mode: Mapped[str] = mapped_column(String(20), default="stateless")  # stateless | stateful
    # identity
    hostname: Mapped[str] = mapped_column(String(63))
    domain: Mapped[str | None] = mapped_column(String(253), nullable=True)
    machine_id: Mapped[str] = mapped_column(String(32))  # systemd machine-id, 32 hex
    mac: Mapped[str] = mapped_column(String(17), index=True)  # found by it at network boot
    ssh_host_keys: Mapped[str] = mapped_column(Text, default="{}")  # JSON {type: {private, public}}
    network: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON, netplan v2 ethernets
    extra_config: Mapped[str | None] = mapped_column(Text, nullable=True)  # #cloud-config YAML
    identity_rev: Mapped[int] = mapped_column(Integer, default=1)  # bumped on every change
    # access and state
    token_hash: Mapped[str] = mapped_column(String(64), index=True)  # SHA-256 of agent token
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_boot_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # the block server that serves it (``services.servers``); None outside a cluster
    server_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)

    image_version: Mapped[ImageVersion] = relationship()

    @property
    def fqdn(self) -> str:
        return f"{self.hostname}.{self.domain}" if self.domain else self.hostname


class NewDevice(Base):
    """A MAC that asked for a network boot and is no machine (yet): what its firmware
    reported, for the administrator who adds it (``lamina machine list --new``)."""

    __tablename__ = "new_devices"

    mac: Mapped[str] = mapped_column(String(17), primary_key=True)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    requests: Mapped[int] = mapped_column(Integer, default=1)
    address: Mapped[str | None] = mapped_column(String(45), nullable=True)  # as seen by HTTP
    platform: Mapped[str | None] = mapped_column(String(16), nullable=True)  # pcbios | efi
    arch: Mapped[str | None] = mapped_column(String(16), nullable=True)  # i386 | x86_64 ...
    manufacturer: Mapped[str | None] = mapped_column(String(64), nullable=True)  # SMBIOS
    product: Mapped[str | None] = mapped_column(String(64), nullable=True)
    serial: Mapped[str | None] = mapped_column(String(64), nullable=True)
    uuid: Mapped[str | None] = mapped_column(String(36), nullable=True)
