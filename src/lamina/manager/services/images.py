"""Images and their versions: import (identical content gives back the version that has
it), remove (refused while a machine is pinned to it), who may read one, usage."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from lamina.errors import Conflict, NotFound, Refused
from lamina.image import Imported, Manifest
from lamina.image.importer import import_and_commit
from lamina.manager.models import Image, ImageVersion
from lamina.manager.services import audit, versions
from lamina.names import Ref, check_name
from lamina.store import ChunkStore


def _image(session: Session, name: str, *, create: bool = False) -> Image:
    image = session.scalars(select(Image).where(Image.name == name)).one_or_none()
    if image is None:
        if not create:
            raise NotFound(f"no image named {name!r}")
        image = Image(name=name)
        session.add(image)
        session.flush()
    return image


@dataclass(frozen=True, slots=True)
class Recorded:
    version: ImageVersion
    ref: str  # NAME@N
    created: bool  # False: a version of the image had this content already


def add_version(session: Session, *, name: str, imported: Imported, source: str) -> Recorded:
    """Record an imported manifest as NAME@N+1, or give back the newest version of NAME
    with that very manifest (importing the same disk twice, committing an empty delta).

    Two imports of one name may race for N+1: the unique (image, version) constraint
    decides, and the loser retries with the next number.
    """
    check_name(name, "image name")
    same = session.scalars(
        select(ImageVersion)
        .join(Image)
        .where(Image.name == name, ImageVersion.manifest_id == imported.manifest_id.hex())
        .order_by(ImageVersion.version.desc())
        .limit(1)
    ).first()
    if same is not None:
        return Recorded(same, same.ref, created=False)

    def create(number: int) -> ImageVersion:
        version = ImageVersion(
            image=_image(session, name, create=True),
            version=number,
            size=imported.manifest.size,
            chunk_size=imported.manifest.chunk_size,
            manifest_id=imported.manifest_id.hex(),
            stored_bytes=imported.stats.stored_bytes,
            source=source,
        )
        session.add(version)
        session.flush()
        return version

    def highest() -> int | None:
        return session.scalar(
            select(func.max(ImageVersion.version)).join(Image).where(Image.name == name)
        )

    version = versions.next_version(session, "image", name, create, highest)
    audit.record(session, "image.version", version.ref, source=source)
    return Recorded(version, version.ref, created=True)


@dataclass(frozen=True, slots=True)
class ImageImported:
    ref: str
    imported: Imported
    unchanged: bool  # the image had a version with this content: no new one was made


def import_image(
    *,
    store: ChunkStore,
    session: Callable[[], AbstractContextManager[Session]],
    name: str,
    path: Path,
    fmt: str | None = None,
    tmp_dir: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> ImageImported:
    """Import a file as the next version of ``name`` (or find the version it already is)."""
    check_name(name, "image name")
    created = True

    def commit(imported: Imported) -> str:
        nonlocal created
        with session() as db:
            recorded = add_version(db, name=name, imported=imported, source=str(path))
            created = recorded.created
            return recorded.ref

    ref, imported = import_and_commit(
        store, path, commit, fmt=fmt, tmp_dir=tmp_dir, progress=progress
    )
    return ImageImported(ref, imported, unchanged=not created)


def get_version(session: Session, ref: Ref) -> ImageVersion:
    """``NAME@V``, or the latest version of ``NAME``."""
    image = _image(session, ref.name)
    query = select(ImageVersion).where(ImageVersion.image_id == image.id)
    found = versions.pick(session, query, ImageVersion.version, ref.version)
    if found is None:
        raise NotFound(
            f"no image version {ref}" if ref.version else f"image {ref.name!r} has no versions"
        )
    return found


def list_images(session: Session) -> list[Image]:
    return list(
        session.scalars(select(Image).options(selectinload(Image.versions)).order_by(Image.name))
    )


def list_versions(session: Session, *, name: str) -> list[ImageVersion]:
    return list(_image(session, name).versions)


def remove(session: Session, *, ref: Ref) -> list[str]:
    """Delete one version, or the image with all its versions; returns what went.

    Versions that machines are pinned to stay: re-pin or remove those machines first.
    """
    image = _image(session, ref.name)
    doomed = list(image.versions) if ref.version is None else [get_version(session, ref)]
    _refuse_pinned(session, doomed)
    if ref.version is None:
        gone = [v.ref for v in image.versions]
        session.delete(image)
        audit.record(session, "image.remove", ref.name, versions=gone)
        return gone
    version = doomed[0]
    gone = [version.ref]
    audit.record(session, "image.remove", version.ref, versions=gone)
    session.delete(version)
    session.flush()
    if not session.scalar(
        select(func.count()).select_from(ImageVersion).where(ImageVersion.image_id == image.id)
    ):
        session.delete(image)
    return gone


def _refuse_pinned(session: Session, versions: list[ImageVersion]) -> None:
    """The one rule for removing image versions: none a machine is pinned to."""
    from lamina.manager.models import Machine

    ids = {v.id: v.ref for v in versions}
    rows = session.execute(
        select(Machine.name, Machine.image_version_id).where(Machine.image_version_id.in_(ids))
    ).all()
    if rows:
        pinned = ", ".join(f"{name} ({ids[vid]})" for name, vid in rows)
        raise Conflict(f"machines are pinned to what you want to remove: {pinned}")


def check_readable(version: ImageVersion, *, admin: bool, pinned_image_id: int | None) -> None:
    """A machine's token reads the image its machine is pinned to (any version of it: a
    re-pin to a newer one streams what changed); the admin token reads every image."""
    if not admin and pinned_image_id != version.image_id:
        raise Refused("this machine is not pinned to that image")


def load_manifest(store: ChunkStore, version: ImageVersion) -> Manifest:
    return Manifest.from_bytes(store.get(bytes.fromhex(version.manifest_id)))


@dataclass(frozen=True, slots=True)
class VersionUsage:
    ref: str
    size: int
    stored: int  # envelope bytes of every chunk this version references
    unique: int  # of those, bytes no other image version references


def usage(session: Session, *, store: ChunkStore, name: str) -> list[VersionUsage]:
    """Per-version stored and unique bytes, counted against every image in the store."""
    image = _image(session, name)
    found = version_bytes(session, store=store)
    return [
        VersionUsage(v.ref, v.size, found[v.id].stored, found[v.id].unique) for v in image.versions
    ]


@dataclass(frozen=True, slots=True)
class VersionBytes:
    stored: int  # stored bytes of every chunk the version references
    unique: int  # of those, bytes no other image version references


_usage_lock = threading.Lock()
# The last answer, by the (version id, manifest id) pairs it was computed for.
_usage_cache: dict[frozenset[tuple[int, str]], dict[int, VersionBytes]] = {}


def version_bytes(session: Session, *, store: ChunkStore) -> dict[int, VersionBytes]:
    """Stored and unique bytes of every image version, by version id.

    Needs every manifest (unique bytes are relative to all the others), so the answer is
    kept until the set of versions changes: manifests are immutable.
    """
    key = frozenset(
        (vid, mid)
        for vid, mid in session.execute(select(ImageVersion.id, ImageVersion.manifest_id))
    )
    with _usage_lock:
        if key in _usage_cache:
            return _usage_cache[key]
        refs: dict[int, set[bytes]] = {}
        counts: Counter[bytes] = Counter()
        for vid, mid in key:
            ids = Manifest.from_bytes(store.get(bytes.fromhex(mid))).referenced()
            refs[vid] = ids
            counts.update(ids)
        sizes = store.index.sizes(counts)
        out = {
            vid: VersionBytes(
                sum(sizes.get(c, 0) for c in ids),
                sum(sizes.get(c, 0) for c in ids if counts[c] == 1),
            )
            for vid, ids in refs.items()
        }
        _usage_cache.clear()
        _usage_cache[key] = out
        return out


def list_all_versions(session: Session) -> list[ImageVersion]:
    return list(session.scalars(select(ImageVersion)))
