"""Database models (SQLAlchemy 2), one module per area; schema changes are Alembic
migrations under ``lamina/manager/migrations/versions``."""

from lamina.manager.models.base import Base, utcnow
from lamina.manager.models.images import Image, ImageVersion, Setting
from lamina.manager.models.layers import (
    Layer,
    LayerMount,
    LayerMountLayer,
    LayerVersion,
    LayerVersionBase,
)
from lamina.manager.models.machines import Machine

__all__ = [
    "Base",
    "Image",
    "ImageVersion",
    "Layer",
    "LayerMount",
    "LayerMountLayer",
    "LayerVersion",
    "LayerVersionBase",
    "Machine",
    "Setting",
    "utcnow",
]
