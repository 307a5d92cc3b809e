"""Layer versions as EROFS images: built once on first demand, kept chunked in the store
(``lamina.layer.erofs``), recorded on the version; and their read-ahead profiles.

Versions with the same tree manifest share one image (the build is deterministic, so it
would be the same bytes anyway). Two managers building at once produce the same manifest
id; a file lock in the home keeps one process from building twice. The caller's
transaction records it (the request's session commits when the answer is made).
"""

from __future__ import annotations

import shutil
import uuid

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from lamina.home import Home
from lamina.image import Manifest
from lamina.image import profile as profiles
from lamina.layer import erofs
from lamina.layer.importer import load_tree
from lamina.locks import locked
from lamina.manager.models import LayerVersion
from lamina.manager.services import layers
from lamina.names import Ref


def _shared(session: Session, manifest_id: str) -> str | None:
    return session.scalars(
        select(LayerVersion.image_manifest_id)
        .where(LayerVersion.manifest_id == manifest_id)
        .where(LayerVersion.image_manifest_id.is_not(None))
        .limit(1)
    ).first()


def ensure_image(session: Session, home: Home, ref: Ref) -> tuple[LayerVersion, Manifest]:
    """The version (its ``image_manifest_id`` set) and its image's manifest."""
    lv = layers.get_version(session, ref)
    if lv.image_manifest_id is None:
        with locked(home.tmp_dir / f"layer-image-{lv.manifest_id[:32]}.lock"):
            session.expire_all()
            lv = layers.get_version(session, ref)
            found = lv.image_manifest_id or _shared(session, lv.manifest_id)
            if found is None:
                found = _build(session, home, lv.manifest_id)
            _record(session, lv.manifest_id, found)
            session.flush()
            lv = layers.get_version(session, ref)
    assert lv.image_manifest_id is not None
    return lv, Manifest.from_bytes(home.store.get(bytes.fromhex(lv.image_manifest_id)))


def _record(session: Session, manifest_id: str, image_id: str) -> None:
    session.execute(
        update(LayerVersion)
        .where(LayerVersion.manifest_id == manifest_id)
        .values(image_manifest_id=image_id)
    )


def _build(session: Session, home: Home, manifest_id: str) -> str:
    mid = bytes.fromhex(manifest_id)
    tree = load_tree(home.store, mid)
    work = home.tmp_dir / f"layer-image-{manifest_id[:16]}-{uuid.uuid4().hex[:8]}"
    try:
        image = erofs.build(home.store, tree, mid, work)

        def commit(image_id: bytes, _manifest: Manifest) -> None:
            _record(session, manifest_id, image_id.hex())
            session.flush()

        image_id, _manifest = erofs.store_image(home.store, image, commit)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return image_id.hex()


def profile(lv: LayerVersion) -> list[int]:
    return profiles.decode(lv.image_profile or b"")


def add_profile(session: Session, lv: LayerVersion, order: list[int], count: int) -> bool:
    """Merge one session's first-read order into the version's profile (until it is
    settled after ``MAX_BOOTS`` sessions); False when it was settled already."""
    if lv.image_profile_runs >= profiles.MAX_BOOTS:
        return False
    order = [i for i in order if 0 <= i < count]
    lv.image_profile = profiles.encode(profiles.merge(profile(lv), order))
    lv.image_profile_runs += 1
    session.flush()
    return True
