"""File-tree layers, their versions, what each version was made on, and live mounts."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from lamina.manager.models.base import Base, utcnow


class Layer(Base):
    __tablename__ = "layers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(20))  # app | writable
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    versions: Mapped[list[LayerVersion]] = relationship(
        back_populates="layer", order_by="LayerVersion.version", cascade="all, delete-orphan"
    )


class LayerVersion(Base):
    __tablename__ = "layer_versions"
    __table_args__ = (UniqueConstraint("layer_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    layer_id: Mapped[int] = mapped_column(ForeignKey("layers.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    manifest_id: Mapped[str] = mapped_column(String(64), index=True)
    files: Mapped[int] = mapped_column(Integer, default=0)
    size: Mapped[int] = mapped_column(BigInteger, default=0)  # bytes of file data
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # added by this version
    source: Mapped[str] = mapped_column(String(1000), default="")
    # Writable layers: the policy the version was kept under, and the version it continues.
    policy: Mapped[str | None] = mapped_column(String(20), nullable=True)
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("layer_versions.id", ondelete="SET NULL"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The version's EROFS image, built once on first demand (``lamina.layer.erofs``), and
    # its read-ahead profile: image chunk indices in first-read order, u32 little-endian,
    # merged from the first ``image_profile_runs`` sessions (``lamina.image.profile``).
    image_manifest_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    image_profile: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    image_profile_runs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    layer: Mapped[Layer] = relationship(back_populates="versions")
    bases: Mapped[list[LayerVersionBase]] = relationship(
        foreign_keys="LayerVersionBase.version_id",
        order_by="LayerVersionBase.position",
        cascade="all, delete-orphan",
    )

    @property
    def ref(self) -> str:
        return f"{self.layer.name}@{self.version}"


class LayerVersionBase(Base):
    """The read-only layer versions a version was made on (captured or kept on), in order:
    what a 3-way rebase of a writable layer starts from. ``base_ref`` survives the base's
    removal (only app layers' bases may be removed; a writable version pins its bases)."""

    __tablename__ = "layer_version_bases"

    version_id: Mapped[int] = mapped_column(
        ForeignKey("layer_versions.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    base_id: Mapped[int | None] = mapped_column(
        ForeignKey("layer_versions.id", ondelete="SET NULL"), nullable=True, index=True
    )
    base_ref: Mapped[str] = mapped_column(String(220))

    base: Mapped[LayerVersion | None] = relationship(foreign_keys=[base_id])


class LayerMount(Base):
    """A root composed on a host; holds its writable layer (one root at a time)."""

    __tablename__ = "layer_mounts"
    __table_args__ = (UniqueConstraint("host", "root"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host: Mapped[str] = mapped_column(String(253))
    root: Mapped[str] = mapped_column(String(4096))
    writable_layer_id: Mapped[int | None] = mapped_column(
        ForeignKey("layers.id"), nullable=True, unique=True
    )
    # The writable layer's version mounted beneath the session's upper directory.
    writable_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("layer_versions.id"), nullable=True
    )
    policy: Mapped[str] = mapped_column(String(20), default="all")
    generation: Mapped[int] = mapped_column(Integer, default=1)  # +1 per attach/detach
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    writable_layer: Mapped[Layer | None] = relationship()
    writable_version: Mapped[LayerVersion | None] = relationship()
    layers: Mapped[list[LayerMountLayer]] = relationship(
        order_by="LayerMountLayer.position", cascade="all, delete-orphan"
    )


class LayerMountLayer(Base):
    __tablename__ = "layer_mount_layers"

    mount_id: Mapped[int] = mapped_column(
        ForeignKey("layer_mounts.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0 wins
    version_id: Mapped[int] = mapped_column(ForeignKey("layer_versions.id"), index=True)

    version: Mapped[LayerVersion] = relationship()
