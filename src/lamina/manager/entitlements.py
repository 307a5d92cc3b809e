"""Entitlement resolution (pure): which layers a user gets on a machine, in which order.

A user's layers on a machine are those entitled to the user, to any of the user's groups
and to the machine. They attach in order of priority (lower first; the first layer wins a
path, the last is the base), then user before group before machine entitlements (machine
layers are typically the OS base), then by name. A layer entitled twice (say to the user
and to a group) appears once, where its first entitlement puts it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Via = Literal["user", "group", "machine"]
_RANK: dict[str, int] = {"user": 0, "group": 1, "machine": 2}


@dataclass(frozen=True, slots=True)
class Grant:
    """One entitlement as it applies: for ``user_id`` (None: everyone on the machine)."""

    user_id: int | None
    via: Via
    layer: str
    version: int
    manifest: str
    priority: int


def layers_for(user_id: int, grants: Iterable[Grant]) -> list[Grant]:
    """The grants that apply to ``user_id``, ordered, one per layer."""
    mine = sorted(
        (g for g in grants if g.user_id is None or g.user_id == user_id),
        key=lambda g: (g.priority, _RANK[g.via], g.layer),
    )
    seen: set[str] = set()
    out: list[Grant] = []
    for g in mine:
        if g.layer not in seen:
            seen.add(g.layer)
            out.append(g)
    return out
