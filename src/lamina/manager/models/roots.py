"""Removed roots: what ``store gc`` may collect.

A manifest in the chunk store is a root (an image version's block table, a layer version's
file tree). gc removes a root the database does not know only when the database says it
removed it: every image or layer version deleted through the ORM leaves its manifest id
here (the listeners below, so no removal path can forget it). A root the database neither
knows nor removed (an import newer than a restored backup, a version of a lost database)
is kept, and ``lamina store reindex`` lists it as a version again.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, String, Table, event, select
from sqlalchemy.orm import Mapped, mapped_column

from lamina.manager.models.base import Base, utcnow
from lamina.manager.models.images import Image, ImageVersion
from lamina.manager.models.layers import Layer, LayerVersion


class RemovedRoot(Base):
    __tablename__ = "removed_roots"

    manifest_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    ref: Mapped[str] = mapped_column(String(220))  # what it was, for the record
    removed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def _removed(kind: str, name: str | None, version: int, manifest_id: str, connection: Any) -> None:
    table = RemovedRoot.__table__
    assert isinstance(table, Table)
    ref = f"{kind} {name or '?'}@{version}"
    present = connection.execute(
        select(table.c.manifest_id).where(table.c.manifest_id == manifest_id)
    ).first()
    if present is None:
        connection.execute(
            table.insert().values(manifest_id=manifest_id, ref=ref[:220], removed_at=utcnow())
        )


@event.listens_for(ImageVersion, "after_delete")
def _image_version_removed(_mapper: Any, connection: Any, target: ImageVersion) -> None:
    # Names through the connection: a lazy load of the relationship inside a flush is not
    # allowed to touch the session. Children are deleted before their parent row.
    name = connection.execute(select(Image.name).where(Image.id == target.image_id)).scalar()
    _removed("image", name, target.version, target.manifest_id, connection)


@event.listens_for(LayerVersion, "after_delete")
def _layer_version_removed(_mapper: Any, connection: Any, target: LayerVersion) -> None:
    name = connection.execute(select(Layer.name).where(Layer.id == target.layer_id)).scalar()
    _removed("layer", name, target.version, target.manifest_id, connection)
