"""Boot profiles in the database, one per image version (keyed by its manifest id, hex)."""

from __future__ import annotations

from sqlalchemy import select

from lamina.home import Home
from lamina.image.profile import decode, encode, merge
from lamina.manager.models.base import utcnow
from lamina.manager.models.stream import BootProfile


def load(home: Home, manifest_id: bytes) -> tuple[list[int], int]:
    """(chunk indices in first-read order, boots recorded) of an image version."""
    with home.session() as session:
        row = session.get(BootProfile, manifest_id.hex())
        return (decode(row.chunks), row.boots) if row is not None else ([], 0)


def boots(home: Home, manifest_id: bytes) -> int:
    """How many boots an image version's profile has seen (the order is not decoded)."""
    with home.session(read_only=True) as session:
        query = select(BootProfile.boots).where(BootProfile.manifest_id == manifest_id.hex())
        return session.scalar(query) or 0


def save(home: Home, manifest_id: bytes, order: list[int]) -> None:
    with home.session() as session:
        row = session.get(BootProfile, manifest_id.hex())
        if row is None:
            session.add(BootProfile(manifest_id=manifest_id.hex(), chunks=encode(order), boots=1))
        else:
            row.chunks = encode(merge(decode(row.chunks), order))
            row.boots += 1
            row.updated_at = utcnow()
