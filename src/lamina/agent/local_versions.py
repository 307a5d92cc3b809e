"""An agent's local copy of manager-side layer versions (its own home's database).

The layer code (``lamina.layer.roots``) mounts versions it finds in the local
database by ``NAME@V``; an agent records the versions it fetched from the manager under
the manager's numbers, so both sides speak of the same ``NAME@V``.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from lamina.errors import Conflict
from lamina.manager.models import Layer, LayerMount, LayerVersion
from lamina.manager.services import layers as layer_svc
from lamina.names import parse_ref


def has_version(session: Session, *, name: str, version: int, manifest: str) -> bool:
    return (
        session.scalar(
            select(LayerVersion.id)
            .join(Layer, Layer.id == LayerVersion.layer_id)
            .where(
                Layer.name == name,
                LayerVersion.version == version,
                LayerVersion.manifest_id == manifest,
            )
        )
        is not None
    )


def record(
    session: Session,
    *,
    name: str,
    kind: str,
    version: int,
    manifest: str,
    files: int,
    size: int,
    policy: str | None = None,
) -> LayerVersion:
    """``NAME@version`` with this manifest, replacing a local version of that number that
    differs (a writable version this host made but the manager numbered otherwise)."""
    layer = session.scalars(select(Layer).where(Layer.name == name)).one_or_none()
    if layer is None:
        layer = Layer(name=name, kind=kind)
        session.add(layer)
        session.flush()
    found = session.scalars(
        select(LayerVersion).where(
            LayerVersion.layer_id == layer.id, LayerVersion.version == version
        )
    ).one_or_none()
    if found is not None:
        if found.manifest_id == manifest:
            return found
        used = session.scalar(
            select(LayerMount.id).where(LayerMount.writable_version_id == found.id).limit(1)
        )
        if used is not None:
            raise Conflict(f"{name}@{version} is mounted here with other content")
        session.delete(found)
        session.flush()
    row = LayerVersion(
        layer_id=layer.id,
        version=version,
        manifest_id=manifest,
        files=files,
        size=size,
        stored_bytes=0,
        source="manager",
        policy=policy,
    )
    session.add(row)
    session.flush()
    return row


def version_facts(session: Session, *, ref: str) -> tuple[str, int, int, list[str], str | None]:
    """(manifest, files, size, base refs, policy) of a local version, for its upload."""
    v = layer_svc.get_version(session, parse_ref(ref, "layer name"))
    return v.manifest_id, v.files, v.size, [b.base_ref for b in v.bases], v.policy


def trim_after(session: Session, *, name: str, version: int) -> list[str]:
    """Forget local versions of ``name`` newer than ``version`` (the manager's latest): a
    writable layer continues from the manager's version, never from a local leftover."""
    layer = session.scalars(select(Layer).where(Layer.name == name)).one_or_none()
    if layer is None:
        return []
    gone = []
    for v in session.scalars(
        select(LayerVersion).where(
            LayerVersion.layer_id == layer.id, LayerVersion.version > version
        )
    ):
        if session.scalar(select(LayerMount.id).where(LayerMount.writable_version_id == v.id)):
            continue
        gone.append(f"{name}@{v.version}")
        session.delete(v)
    session.flush()
    return gone
