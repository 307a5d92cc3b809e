"""Desired state vs mounted state -> actions (pure: no I/O).

A user's session is a composed root: read-only layers (first wins, the last is the base)
and the user's writable layer. While a user is logged in, layers whose entitlement appears
are attached and layers whose entitlement goes are detached, live; a layer whose version
changed is detached and attached again. Attach puts a layer on top, so new layers are
attached lowest priority first and end up in the desired order among themselves. The base
and the writable layer of a live session cannot change under it: such a difference waits
for the next login (``Pending``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Want:
    user: str
    layers: tuple[str, ...]  # NAME@V, first wins, last is the base
    writable: str | None = None


@dataclass(frozen=True, slots=True)
class Have:
    user: str
    layers: tuple[str, ...]
    writable: str | None = None


@dataclass(frozen=True, slots=True)
class Attach:
    user: str
    ref: str


@dataclass(frozen=True, slots=True)
class Detach:
    user: str
    name: str


@dataclass(frozen=True, slots=True)
class Pending:
    """A difference that only a new login can apply."""

    user: str
    why: str


@dataclass(frozen=True, slots=True)
class Stale:
    """Mounted, but the manager has no session for it any more."""

    user: str


Action = Attach | Detach | Pending | Stale


def name_of(ref: str) -> str:
    return ref.rpartition("@")[0] or ref


def plan_session(want: Want, have: Have) -> list[Action]:
    """Live changes that bring one mounted session to what is wanted."""
    if not want.layers:
        return [Pending(want.user, "no layers are entitled")]
    if not have.layers:
        return [Pending(want.user, "nothing is mounted")]
    out: list[Action] = []
    if want.layers[-1] != have.layers[-1]:
        out.append(Pending(want.user, f"base {have.layers[-1]} -> {want.layers[-1]}"))
    if want.writable != have.writable:
        out.append(Pending(want.user, f"writable layer {have.writable} -> {want.writable}"))
    bases = {name_of(want.layers[-1]), name_of(have.layers[-1])}
    wanted = {name_of(r): r for r in want.layers[:-1]}
    mounted = {name_of(r): r for r in have.layers[:-1]}
    for name, ref in mounted.items():
        if name not in bases and wanted.get(name) != ref:
            out.append(Detach(want.user, name))
    for ref in reversed(want.layers[:-1]):
        name = name_of(ref)
        if name not in bases and mounted.get(name) != ref:
            out.append(Attach(want.user, ref))
    return out


def plan(wants: Mapping[str, Want], haves: Mapping[str, Have]) -> list[Action]:
    """Actions for every mounted session (sessions are mounted by logins, not here)."""
    out: list[Action] = []
    for user in sorted(haves):
        if user in wants:
            out += plan_session(wants[user], haves[user])
        else:
            out.append(Stale(user))
    return out
