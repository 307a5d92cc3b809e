"""Database models (SQLAlchemy 2), one module per area; schema changes are Alembic
migrations under ``lamina/manager/migrations/versions``."""

from lamina.manager.models.access import (
    Change,
    Entitlement,
    Group,
    Membership,
    User,
    UserSession,
    WritableLayer,
)
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
    "Change",
    "Entitlement",
    "Group",
    "Image",
    "ImageVersion",
    "Layer",
    "LayerMount",
    "LayerMountLayer",
    "LayerVersion",
    "LayerVersionBase",
    "Machine",
    "Membership",
    "Setting",
    "User",
    "UserSession",
    "WritableLayer",
    "utcnow",
]
