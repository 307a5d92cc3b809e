"""API schemas (pydantic): Create/Update bodies and Public views, FastAPI-template style."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from lamina.names import NAME_PATTERN, REF_PATTERN, USER_PATTERN

# User and group names.
Name = Annotated[str, StringConstraints(pattern=USER_PATTERN)]
# Image, layer and machine names, and NAME[@VERSION] references to them.
ObjName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Ref = Annotated[str, StringConstraints(pattern=REF_PATTERN)]
Policy = Literal["all", "profile", "apps"]
HexId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    offset: int
    limit: int


# -- users and groups -------------------------------------------------------------------------


class UserCreate(BaseModel):
    name: Name
    groups: list[Name] = Field(default_factory=list, max_length=100)
    policy: Policy = "all"


class UserUpdate(BaseModel):
    policy: Policy | None = None
    groups: list[Name] | None = Field(default=None, max_length=100)


class UserPublic(BaseModel):
    name: str
    groups: list[str]
    writable: str | None
    policy: str | None
    writable_version: int | None
    in_use_on: str | None  # machine holding the writable layer
    created_at: datetime


class GroupCreate(BaseModel):
    name: Name


class GroupPublic(BaseModel):
    name: str
    members: int
    created_at: datetime


class MemberCreate(BaseModel):
    user: Name


# -- entitlements -----------------------------------------------------------------------------


class EntitlementCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layer: Ref
    user: Name | None = None
    group: Name | None = None
    machine: ObjName | None = None
    priority: int = Field(default=100, ge=0, le=1_000_000)

    @model_validator(mode="after")
    def _one_target(self) -> EntitlementCreate:
        if sum(x is not None for x in (self.user, self.group, self.machine)) != 1:
            raise ValueError("give exactly one of user, group, machine")
        return self


class EntitlementPublic(BaseModel):
    id: int
    layer: str
    version: int | None  # pinned version; None follows the latest
    kind: Literal["user", "group", "machine"]
    target: str
    priority: int
    created_at: datetime


class Removed(BaseModel):
    removed: int


# -- machines, images, layers, sessions -------------------------------------------------------


class MachineCreate(BaseModel):
    name: ObjName
    image: Ref
    mode: Literal["stateless", "stateful"] = "stateless"
    hostname: (
        Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")]
        | None
    ) = None


class MachineUpdate(BaseModel):
    mode: Literal["stateless", "stateful"] | None = None


class MachinePublic(BaseModel):
    name: str
    image: str
    mode: str
    hostname: str
    fqdn: str
    mac: str
    identity_rev: int
    last_boot_at: datetime | None
    users: list[str]
    created_at: datetime


class MachineCreated(MachinePublic):
    token: str  # shown once


class ImageVersionPublic(BaseModel):
    version: int
    ref: str
    size: int
    stored_bytes: int
    machines: int
    created_at: datetime


class ImagePublic(BaseModel):
    name: str
    versions: list[ImageVersionPublic]
    created_at: datetime


class LayerVersionPublic(BaseModel):
    version: int
    ref: str
    files: int
    size: int
    stored_bytes: int
    policy: str | None
    created_at: datetime


class LayerPublic(BaseModel):
    name: str
    kind: str
    versions: list[LayerVersionPublic]
    entitlements: int
    created_at: datetime


class SessionPublic(BaseModel):
    id: int
    user: str
    machine: str
    writable: str | None
    base_version: int | None
    started_at: datetime


# -- agent API --------------------------------------------------------------------------------


class LoginRequest(BaseModel):
    user: Name


class WritableSaved(BaseModel):
    """A writable-layer version an agent stored (its chunks uploaded first)."""

    manifest: HexId
    files: int = Field(ge=0, le=(1 << 31) - 1)
    size: int = Field(ge=0, le=(1 << 63) - 1)
    stored_bytes: int = Field(default=0, ge=0, le=(1 << 63) - 1)
    bases: list[Annotated[str, StringConstraints(max_length=220)]] = Field(
        default_factory=list, max_length=1000
    )


class LogoutRequest(BaseModel):
    user: Name
    writable: WritableSaved | None = None


class LayerRef(BaseModel):
    name: str
    version: int
    ref: str
    manifest: str
    via: Literal["user", "group", "machine"]


class WritableRef(BaseModel):
    name: str
    version: int | None
    manifest: str | None
    policy: str


class SessionState(BaseModel):
    user: str
    layers: list[LayerRef]  # first wins; the last one is the base
    writable: WritableRef | None


class Desired(BaseModel):
    rev: str
    machine: str
    identity_rev: int
    sessions: list[SessionState]


class LogoutResult(BaseModel):
    user: str
    ended: bool
    saved: str | None  # the writable layer version recorded, NAME@N


class BootResult(BaseModel):
    machine: str
    mode: str
    image: str
    image_manifest: str
    identity: dict[str, object]


class Missing(BaseModel):
    # 10,000 a request, as agents send them (670 KB: the request body cap is 1 MiB).
    ids: list[HexId] = Field(max_length=15_000)
