"""What a rebase needs of the database, as plain values and one narrow Protocol.

A job names one writable layer's latest version and the stack of read-only versions it
moves to; planning and recording happen in the manager's database
(``lamina.manager.services.rebase``, reached through ``lamina.manager.rebase_records``),
merging and storing here. Values cross process boundaries (a bulk rebase's workers), so
nothing here holds a database row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from lamina.errors import Conflict
from lamina.layer.records import NewVersion, VersionInfo
from lamina.rebase.rules import RuleTable


class InUse(Conflict):
    """The writable layer is mounted or held by a session: it is not rebased under a user."""


@dataclass(frozen=True, slots=True)
class Job:
    """One writable layer's latest version and the stack it moves to."""

    name: str
    layer_id: int
    version_id: int
    ref: str
    manifest_id: bytes
    policy: str | None
    old: tuple[VersionInfo, ...]
    new: tuple[VersionInfo, ...]


@dataclass(frozen=True, slots=True)
class Skipped:
    name: str
    ref: str
    why: str  # "already" (on the new version), "in-use", "elsewhere" (moved to another)
    detail: str


class RebaseRecords(Protocol):
    """Plans and records of rebases, each call one transaction. A bulk rebase hands the
    object to its worker processes, so it must pickle (the database's pickles as its
    home's folder and database URL)."""

    def rules(self) -> RuleTable:
        """The rule table conflicts are settled by."""
        ...

    def plan_one(self, writable: str, onto: str) -> Job | Skipped:
        """The job for one writable layer; InUse while it is in use."""
        ...

    def plan_all(
        self, source: str, onto: str
    ) -> tuple[VersionInfo, VersionInfo, list[Job], list[Skipped]]:
        """(source, target, jobs, skipped) for every writable layer made on ``source``."""
        ...

    def record(self, job: Job, new: NewVersion) -> str:
        """The rebased version as the layer's next one; InUse while the layer is in use,
        Conflict when it moved past the job's version meanwhile."""
        ...
