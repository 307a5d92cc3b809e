"""Images, their versions, and installation settings."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from lamina.manager.models.base import Base, utcnow


class Image(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    versions: Mapped[list[ImageVersion]] = relationship(
        back_populates="image", order_by="ImageVersion.version", cascade="all, delete-orphan"
    )


class ImageVersion(Base):
    __tablename__ = "image_versions"
    __table_args__ = (UniqueConstraint("image_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(BigInteger)
    chunk_size: Mapped[int] = mapped_column(Integer)
    manifest_id: Mapped[str] = mapped_column(String(64))
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    source: Mapped[str] = mapped_column(String(1000), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    image: Mapped[Image] = relationship(back_populates="versions")

    @property
    def ref(self) -> str:
        return f"{self.image.name}@{self.version}"


class Setting(Base):
    """Small key/value facts of an installation (admin token hash, schema notes)."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(String(4000))


class VersionCounter(Base):
    """The last number handed out per image or layer name. It outlives the versions (and
    the image or layer row): NAME@N names one content forever, which is what lets its
    manifest and its stream caches be trusted by number."""

    __tablename__ = "version_counters"

    kind: Mapped[str] = mapped_column(String(10), primary_key=True)  # image | layer
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    last: Mapped[int] = mapped_column(Integer)
