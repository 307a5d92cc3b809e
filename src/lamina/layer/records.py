"""What the layer code needs of the database, as plain values and one narrow Protocol.

The layer code mounts, captures and imports on a host; the database that records layer
versions and mounted roots belongs to the manager (``lamina.manager.layer_records``
implements ``LayerRecords`` over it, on the manager's home or on an agent's own). Nothing
here holds a database row: versions and mounts cross as the values below, chunk ids as
bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

APP: Final = "app"
WRITABLE: Final = "writable"


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """A layer version as the layer code knows it outside any database transaction."""

    id: int
    ref: str  # NAME@V
    manifest_id: bytes
    layer_id: int


@dataclass(frozen=True, slots=True)
class NewVersion:
    """What an import, a capture, a rebase or an umount made, to be recorded as a version."""

    manifest_id: bytes
    files: int
    size: int
    stored_bytes: int
    source: str  # what made it


@dataclass(frozen=True, slots=True)
class MountRecord:
    """A root composed on a host: its read-only layers (first wins), its writable layer
    and the version beneath the root's changes, and how often its layers were switched."""

    id: int
    host: str
    root: str
    layers: list[VersionInfo]
    writable: str | None
    writable_version: VersionInfo | None
    policy: str
    generation: int


@dataclass(frozen=True, slots=True)
class WritableState:
    latest: VersionInfo | None  # the version a new mount continues from
    mounted_on: tuple[str, str] | None  # (host, root) of the mount holding it


class LayerRecords(Protocol):
    """Layer versions and mounted roots, each call one transaction."""

    def versions(self, refs: Sequence[str]) -> list[VersionInfo]:
        """Each ``NAME`` (its latest version) or ``NAME@V``; NotFound for an unknown one."""
        ...

    def writable(self, name: str) -> WritableState:
        """The writable layer ``name`` (created, with no versions, on first use)."""
        ...

    def base_ids(self, version_id: int) -> list[int | None]:
        """The ids of the versions ``version_id`` was made on, in order (None: removed)."""
        ...

    def base_refs(self, version_ids: Sequence[int]) -> list[list[str]]:
        """For each version, the NAME@V it was made on, in order (kept after a removal)."""
        ...

    def add_version(
        self,
        *,
        name: str,
        kind: str,
        new: NewVersion,
        bases: Sequence[VersionInfo] = (),
    ) -> str:
        """Record ``new`` as NAME@N+1 (a layer of ``kind``, made on ``bases``); its ref."""
        ...

    def find_mount(self, host: str, root: str) -> MountRecord | None: ...

    def mounts_on(self, host: str) -> list[MountRecord]: ...

    def add_mount(
        self,
        *,
        host: str,
        root: str,
        layers: Sequence[VersionInfo],
        writable: str | None,
        writable_version: VersionInfo | None,
        policy: str,
    ) -> MountRecord:
        """Claim ``root`` (and the writable layer: one root at a time); Conflict if taken."""
        ...

    def set_layers(
        self, mount_id: int, layers: Sequence[VersionInfo], switch: Callable[[], None]
    ) -> None:
        """Record a mount's new read-only layers and a generation more; ``switch`` runs
        inside the transaction, so a switch that fails records nothing."""
        ...

    def end_mount(
        self,
        mount_id: int,
        *,
        keep: NewVersion | None = None,
        bases: Sequence[VersionInfo] = (),
        parent: VersionInfo | None = None,
    ) -> str | None:
        """Drop a mount's record; with ``keep``, record it as the next version of the
        mount's writable layer (made on ``bases``, continuing ``parent``, under the
        mount's policy) in the same transaction, and return its ref."""
        ...
