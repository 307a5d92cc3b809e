"""API schemas (pydantic): Create/Update bodies and Public views, FastAPI-template style.

The same bodies carry an operation from every front end: the API receives them, the CLI
(on a home or through ``--manager``) and the console build them with ``build``, so a bad
field is refused with the same words everywhere. Results that a person reads have a
``summary()``: the line the CLI prints and the console shows.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    ValidationError,
    model_validator,
)

from lamina.errors import UsageError
from lamina.names import NAME_PATTERN, REF_PATTERN, USER_PATTERN
from lamina.units import human_bytes, timestamp

# User and group names.
Name = Annotated[str, StringConstraints(pattern=USER_PATTERN)]
# Image, layer and machine names, and NAME[@VERSION] references to them.
ObjName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Ref = Annotated[str, StringConstraints(pattern=REF_PATTERN)]
Policy = Literal["all", "profile", "apps"]
Mode = Literal["stateless", "stateful"]
HexId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
# Identity fields are checked by lamina.identity (its messages say what is expected).
Short = Annotated[str, StringConstraints(max_length=253)]

# Every time in one format: UTC ISO 8601 with its zone, to the second (2026-01-31T09:15:00Z).
Timestamp = Annotated[
    datetime,
    AfterValidator(lambda when: when if when.tzinfo else when.replace(tzinfo=UTC)),
    PlainSerializer(timestamp, return_type=str, when_used="json"),
]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


def build(model: type[M], **fields: Any) -> M:
    """``model(**fields)``, refused as the API refuses a bad body: a UsageError naming each
    field and what is wrong with it."""
    try:
        return model(**fields)
    except ValidationError as exc:
        raise UsageError(
            "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"]
                for e in exc.errors()
            )
        ) from None


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
    created_at: Timestamp

    def summary(self, verb: str = "added") -> str:
        groups = f", groups {', '.join(self.groups)}" if self.groups else ""
        return f"{verb} user {self.name}{groups}, writable layer {self.writable}"


class GroupCreate(BaseModel):
    name: Name


class GroupPublic(BaseModel):
    name: str
    members: int
    created_at: Timestamp


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
    created_at: Timestamp

    def summary(self) -> str:
        ref = self.layer if self.version is None else f"{self.layer}@{self.version}"
        return f"entitled {ref} to {self.kind} {self.target}"


class Unentitled(BaseModel):
    layer: str
    kind: Literal["user", "group", "machine"]
    target: str
    removed: int

    def summary(self) -> str:
        return f"unentitled {self.layer} from {self.kind} {self.target}"


# -- machines ---------------------------------------------------------------------------------


class MachineCreate(BaseModel):
    name: ObjName
    image: Ref
    mode: Mode = "stateless"
    hostname: Short | None = None  # defaults to the name
    mac: Short | None = None  # generated when omitted
    domain: Short | None = None
    extra_config: dict[str, Any] | None = None  # #cloud-config keys, as machine set takes


class MachineUpdate(BaseModel):
    """What ``machine set`` changes; fields left out stay as they are."""

    model_config = ConfigDict(extra="forbid")

    image: Ref | None = None  # re-pin: the delta was made on the old version and goes
    mode: Mode | None = None
    hostname: Short | None = None  # "" gives back the default (the name)
    domain: Short | None = None  # "" clears it
    mac: Short | None = None  # "" generates a new one
    extra_config: dict[str, Any] | None = None  # #cloud-config keys; {} clears them
    new_machine_id: bool = False
    new_host_keys: bool = False


class MachinePublic(BaseModel):
    name: str
    image: str
    mode: str
    hostname: str
    fqdn: str
    domain: str | None
    mac: str
    identity_rev: int
    last_boot_at: Timestamp | None
    users: list[str]
    created_at: Timestamp
    server: str | None = None  # the block server assigned to it (in a cluster)

    def summary(self) -> str:
        served = f", served by {self.server}" if self.server else ""
        return (
            f"{self.name}: {self.image}, {self.mode}, hostname {self.fqdn}, "
            f"identity rev {self.identity_rev}{served}"
        )


class MachineDetail(MachinePublic):
    delta_bytes: int  # blocks the delta holds, in bytes
    delta_stored_bytes: int  # size of its data file
    machine_id: str
    instance_id: str
    ssh_host_keys: dict[str, str]  # type -> public key
    network: dict[str, Any] | None
    extra_config: dict[str, Any] | None
    exports: list[str]
    nbd_server: str | None = None  # HOST:PORT of its block server
    server_live: bool | None = None  # False: its server missed its heartbeats


class MachineCreated(MachineDetail):
    token: str  # shown once

    def summary(self) -> str:
        return f"{self.name}: {self.image}, {self.mode}, hostname {self.fqdn}, mac {self.mac}"


class MachineReset(BaseModel):
    name: str
    freed_bytes: int

    def summary(self) -> str:
        return f"{self.name}: delta discarded ({human_bytes(self.freed_bytes)})"


class MachineRemoved(BaseModel):
    removed: str
    freed_bytes: int  # its delta's data

    def summary(self) -> str:
        delta = f" and its delta ({human_bytes(self.freed_bytes)})" if self.freed_bytes else ""
        return f"removed {self.removed}{delta}"


class MachineMove(BaseModel):
    to: ObjName  # the block server to serve the machine from its next boot


class MachineMoved(BaseModel):
    name: str
    server: str
    nbd_server: str  # HOST:PORT
    committed: str | None  # NAME.state@N: the stateful machine's delta, through the store

    def summary(self) -> str:
        via = f" (its delta is {self.committed})" if self.committed else ""
        return f"{self.name}: served by {self.server} at {self.nbd_server}{via}"


class DeltaCommit(BaseModel):
    image: ObjName | None = None  # the image to add the version to (default: the machine's)
    repin: bool = False  # pin the machine to the new version, with an empty delta


class DeltaCommitted(BaseModel):
    ref: str  # NAME@N, new or (unchanged) the existing version with this content
    machine: str
    base: str
    changed_chunks: int
    stored_bytes: int
    repinned: bool
    unchanged: bool

    def summary(self) -> str:
        return f"unchanged, {self.ref}" if self.unchanged else self.ref


# -- images, layers, sessions -----------------------------------------------------------------


class VersionsRemoved(BaseModel):
    removed: list[str]  # NAME@V, each

    def summary(self) -> str:
        return "removed " + ", ".join(self.removed)


class ImageVersionPublic(BaseModel):
    version: int
    ref: str
    size: int
    stored_bytes: int
    machines: int
    created_at: Timestamp


class ImagePublic(BaseModel):
    name: str
    versions: list[ImageVersionPublic]
    created_at: Timestamp


class LayerVersionPublic(BaseModel):
    version: int
    ref: str
    files: int
    size: int
    stored_bytes: int
    policy: str | None
    created_at: Timestamp


class LayerPublic(BaseModel):
    name: str
    kind: str
    versions: list[LayerVersionPublic]
    entitlements: int
    created_at: Timestamp


class SessionPublic(BaseModel):
    id: int
    user: str
    machine: str
    writable: str | None
    base_version: int | None
    started_at: Timestamp


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
