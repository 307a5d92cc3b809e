"""The rebase code's ``RebaseRecords`` over a home's database (``services.rebase``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lamina.home import Home
from lamina.layer.records import NewVersion, VersionInfo
from lamina.manager.home import open_home
from lamina.manager.services import rebase as svc
from lamina.names import parse_ref
from lamina.rebase.jobs import Job, Skipped
from lamina.rebase.rules import RuleTable


class DatabaseRebase:
    """Implements ``lamina.rebase.jobs.RebaseRecords``; pickles as (folder, database URL),
    so a bulk rebase's worker processes open the same database."""

    def __init__(self, home: Home) -> None:
        self.home = home

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return _reopen, (str(self.home.root), self.home.database_url)

    def rules(self) -> RuleTable:
        with self.home.session(read_only=True) as session:
            return svc.get_rules(session)

    def plan_one(self, writable: str, onto: str) -> Job | Skipped:
        with self.home.session() as session:
            return svc.plan_one(
                session, parse_ref(writable, "layer name"), parse_ref(onto, "layer name")
            )

    def plan_all(
        self, source: str, onto: str
    ) -> tuple[VersionInfo, VersionInfo, list[Job], list[Skipped]]:
        with self.home.session() as session:
            old = svc.base_of(session, parse_ref(source, "layer name"))
            new = svc.base_of(session, parse_ref(onto, "layer name"))
            todo, skipped = svc.plan_all(session, old, new)
            return old, new, todo, skipped

    def record(self, job: Job, new: NewVersion) -> str:
        with self.home.session() as session:
            return svc.record(session, job, new)


def _reopen(root: str, database_url: str) -> DatabaseRebase:
    return DatabaseRebase(open_home(Path(root), database_url))
