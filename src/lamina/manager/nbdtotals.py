"""The block server's counters (``NbdTotals``), apart from ``GET /metrics`` that shows
them: NBD worker processes keep and send them, and a worker does not import the HTTP
framework (FastAPI and pydantic: about 19 MiB of each worker's resident set)."""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

STATS = ("requests", "bytes_read", "bytes_written", "errors")  # a connection's counters


@dataclass
class NbdTotals:
    """What NBD serving did: per export, the ``STATS`` of its connections (ended ones
    and live ones); errors by kind (the log event that reported them); live connections
    and the machine exports they hold, with the client's address (HOST:PORT). Travels
    between processes as ``to_wire()``."""

    exports: dict[str, list[int]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    connections: int = 0
    machines: dict[str, str] = field(default_factory=dict)
    boots: int = 0  # machine disks opened (a VM starting, or reconnecting)

    def count(self, export: str, stats: MutableMapping[str, int]) -> None:
        row = self.exports.setdefault(export, [0] * len(STATS))
        for i, key in enumerate(STATS):
            row[i] += stats.get(key, 0)

    def add(self, other: NbdTotals) -> None:
        for export, row in other.exports.items():
            mine = self.exports.setdefault(export, [0] * len(STATS))
            for i, value in enumerate(row):
                mine[i] += value
        for kind, n in other.errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + n
        self.connections += other.connections
        self.machines.update(other.machines)
        self.boots += other.boots

    def ended(self) -> NbdTotals:
        """The counters only (what is left of a process that has gone)."""
        out = NbdTotals({k: list(v) for k, v in self.exports.items()}, dict(self.errors))
        out.boots = self.boots
        return out

    def read_bytes(self) -> int:
        return sum(row[1] for row in self.exports.values())

    def to_wire(self) -> dict[str, Any]:
        return {
            "exports": self.exports,
            "errors": self.errors,
            "connections": self.connections,
            "machines": self.machines,
            "boots": self.boots,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> NbdTotals:
        return cls(
            {str(k): [int(x) for x in v] for k, v in data["exports"].items()},
            {str(k): int(v) for k, v in data["errors"].items()},
            int(data["connections"]),
            {str(k): str(v) for k, v in data["machines"].items()},
            int(data.get("boots", 0)),
        )
