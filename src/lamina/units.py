"""Sizes as people read them (the CLI, the console and the messages of refusals alike),
and the one timestamp format (UTC ISO 8601 with its zone: 2026-01-31T09:15:00Z)."""

from __future__ import annotations

from datetime import UTC, datetime


def timestamp(when: datetime) -> str:
    """UTC, to the second, with its zone. A naive value is UTC already (SQLite gives back
    the UTC datetimes it was given without their zone)."""
    aware = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    return aware.strftime("%Y-%m-%dT%H:%M:%SZ")


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``; bytes stay whole (``512 B``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
