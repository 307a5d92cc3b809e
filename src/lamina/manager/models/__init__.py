"""Database models (SQLAlchemy 2), one module per area; schema changes are Alembic
migrations under ``lamina/manager/migrations/versions``.

base.py       the declarative base
images.py     images, their versions, installation settings
machines.py   machines: identity, pinned image version, mode; MACs that asked to boot
layers.py     layers, their versions and bases, mounted roots
access.py     users, groups, entitlements, writable layers, user sessions
stream.py     boot profiles
credentials.py   TLS client credentials issued by the home's CA, by serial
roots.py      removed roots: the manifests of removed versions, which gc may collect
cluster.py    block servers and heartbeats, store leases, condemned packs
uploads.py    chunks machines uploaded that no saved layer version holds yet
admins.py     named admin accounts (role, token) and the audit log
"""

from lamina.manager.models.access import (
    Change,
    Entitlement,
    Group,
    Membership,
    User,
    UserSession,
    WritableLayer,
)
from lamina.manager.models.admins import AdminAccount, AuditEntry
from lamina.manager.models.base import Base, utcnow
from lamina.manager.models.cluster import BlockServer, CondemnedPack, StoreLease
from lamina.manager.models.credentials import Credential
from lamina.manager.models.images import Image, ImageVersion, Setting, VersionCounter
from lamina.manager.models.layers import (
    Layer,
    LayerMount,
    LayerMountLayer,
    LayerVersion,
    LayerVersionBase,
)
from lamina.manager.models.machines import Machine, NewDevice
from lamina.manager.models.roots import RemovedRoot
from lamina.manager.models.stream import BootProfile
from lamina.manager.models.uploads import StagedChunk

__all__ = [
    "AdminAccount",
    "AuditEntry",
    "Base",
    "BlockServer",
    "BootProfile",
    "Change",
    "CondemnedPack",
    "Credential",
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
    "NewDevice",
    "RemovedRoot",
    "Setting",
    "StagedChunk",
    "StoreLease",
    "User",
    "UserSession",
    "VersionCounter",
    "WritableLayer",
    "utcnow",
]
