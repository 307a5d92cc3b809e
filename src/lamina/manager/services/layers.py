"""Layers, their versions and bases, and the roots they are mounted on; removing them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from lamina.errors import Conflict, NotFound, Unconfirmed, UsageError
from lamina.layer import prepare
from lamina.layer.records import WRITABLE, NewVersion
from lamina.manager.models import (
    Entitlement,
    Group,
    Layer,
    LayerMount,
    LayerMountLayer,
    LayerVersion,
    LayerVersionBase,
    Machine,
    User,
    UserSession,
    WritableLayer,
)
from lamina.manager.services import audit, versions
from lamina.manager.services.changes import touch
from lamina.names import Ref, check_name

if TYPE_CHECKING:
    from lamina.home import Home


def get_layer(session: Session, name: str) -> Layer:
    layer = session.scalars(select(Layer).where(Layer.name == name)).one_or_none()
    if layer is None:
        raise NotFound(f"no layer named {name!r}")
    return layer


def _layer(session: Session, name: str, kind: str) -> Layer:
    check_name(name, "layer name")
    layer = session.scalars(select(Layer).where(Layer.name == name)).one_or_none()
    if layer is None:
        layer = Layer(name=name, kind=kind)
        session.add(layer)
        session.flush()
    elif layer.kind != kind:
        raise UsageError(f"{name!r} is an {layer.kind} layer, not an {kind} layer")
    return layer


def ensure_writable(session: Session, name: str) -> Layer:
    """The writable layer ``name``, created (with no versions) on first use."""
    return _layer(session, name, WRITABLE)


def add_version(
    session: Session,
    *,
    name: str,
    kind: str,
    new: NewVersion,
    bases: Sequence[LayerVersion] = (),
    parent: LayerVersion | None = None,
    policy: str | None = None,
) -> LayerVersion:
    """Record NAME@N+1 (the unique (layer, version) pair settles concurrent imports)."""
    base_refs = [(b.id, b.ref) for b in bases]  # read before a pending version autoflushes

    def create(number: int) -> LayerVersion:
        version = LayerVersion(
            layer=_layer(session, name, kind),
            version=number,
            manifest_id=new.manifest_id.hex(),
            files=new.files,
            size=new.size,
            stored_bytes=new.stored_bytes,
            source=new.source[:1000],
            policy=policy,
            parent_id=parent.id if parent is not None else None,
        )
        version.bases = [
            LayerVersionBase(position=i, base_id=base_id, base_ref=base_ref)
            for i, (base_id, base_ref) in enumerate(base_refs)
        ]
        session.add(version)
        session.flush()
        return version

    def highest() -> int | None:
        return session.scalar(
            select(func.max(LayerVersion.version)).join(Layer).where(Layer.name == name)
        )

    return versions.next_version(session, "layer", name, create, highest)


def same_version(
    session: Session, *, name: str, manifest_id: str, bases: Sequence[LayerVersion]
) -> LayerVersion | None:
    """The newest version of NAME with this very tree made on these bases, if any: an
    identical import gives it back instead of a new version."""
    base_ids = [b.id for b in bases]
    found = session.scalars(
        select(LayerVersion)
        .join(Layer)
        .where(Layer.name == name, LayerVersion.manifest_id == manifest_id)
        .order_by(LayerVersion.version.desc())
    )
    return next((v for v in found if [b.base_id for b in v.bases] == base_ids), None)


def get_version(session: Session, ref: Ref) -> LayerVersion:
    """``NAME@V``, or the latest version of ``NAME``."""
    layer = get_layer(session, ref.name)
    query = select(LayerVersion).where(LayerVersion.layer_id == layer.id)
    found = versions.pick(session, query, LayerVersion.version, ref.version)
    if found is None:
        raise NotFound(
            f"no layer version {ref}" if ref.version else f"layer {ref.name!r} has no versions"
        )
    return found


def latest_version(session: Session, layer: Layer) -> LayerVersion | None:
    return session.scalars(
        select(LayerVersion)
        .where(LayerVersion.layer_id == layer.id)
        .order_by(LayerVersion.version.desc())
        .limit(1)
    ).first()


def list_layers(session: Session) -> list[Layer]:
    return list(
        session.scalars(select(Layer).options(selectinload(Layer.versions)).order_by(Layer.name))
    )


def list_versions(session: Session, *, name: str) -> list[LayerVersion]:
    return list(get_layer(session, name).versions)


def list_all_versions(session: Session) -> list[LayerVersion]:
    return list(session.scalars(select(LayerVersion)))


def based_on(session: Session, *, version: LayerVersion) -> list[LayerVersion]:
    """Versions made on ``version`` (what a bulk rebase from it would visit)."""
    return list(
        session.scalars(
            select(LayerVersion)
            .join(LayerVersionBase, LayerVersionBase.version_id == LayerVersion.id)
            .where(LayerVersionBase.base_id == version.id)
            .order_by(LayerVersion.id)
        )
    )


def _in_use(session: Session, versions: Sequence[LayerVersion]) -> str | None:
    ids = [v.id for v in versions]
    mount = session.scalars(
        select(LayerMount)
        .outerjoin(LayerMountLayer)
        .where(
            LayerMountLayer.version_id.in_(ids)
            | LayerMount.writable_version_id.in_(ids)
            | LayerMount.writable_layer_id.in_({v.layer_id for v in versions})
        )
        .limit(1)
    ).first()
    return f"mounted on {mount.host}:{mount.root}" if mount is not None else None


def remove(home: Home, *, ref: Ref, force: bool = False) -> list[str]:
    """Delete one version or a whole layer; returns the refs removed. The one place the
    rules of removing a layer live:

    - refused (Conflict) while a version is mounted, while a writable layer is held by a
      user's session, or while a writable layer's version was made on it (a rebase of
      that writable layer needs its base);
    - refused unless ``force`` (Unconfirmed) when it would delete a user's saved files (a
      writable layer's versions) or take entitlements away.

    A writable layer whose user still exists keeps its (now empty) row, so the user's next
    sessions save again. The layer images prepared for manifests no longer used go too.
    """
    with home.session() as session:
        gone, manifests = _remove(session, ref=ref, force=force)
        audit.record(session, "layer.remove", str(ref), versions=gone, force=force)
    for manifest in manifests:
        prepare.forget(home.root, bytes.fromhex(manifest))
    return gone


def _remove(session: Session, *, ref: Ref, force: bool) -> tuple[list[str], list[str]]:
    layer = get_layer(session, ref.name)
    doomed = list(layer.versions) if ref.version is None else [get_version(session, ref)]
    _refuse_in_use(session, layer, doomed, ref)
    owner = _writable_owner(session, layer)
    if not doomed and owner is not None:
        raise UsageError(f"{layer.name} has no versions: it stays {owner}'s writable layer")
    drops_layer = layer.kind != WRITABLE or owner is None
    drops_layer = drops_layer and len(doomed) == len(layer.versions)
    if not force:
        _refuse_unconfirmed(session, layer, doomed, owner, drops_layer)
    gone = [v.ref for v in doomed]
    manifests = {v.manifest_id for v in doomed}
    entitled = _entitlements(session, layer, doomed, whole=drops_layer)
    if drops_layer:
        session.delete(layer)
    else:
        for v in doomed:
            session.delete(v)
    session.flush()
    if entitled:
        touch(session, None)  # agents re-read what they are entitled to
    still = set(
        session.scalars(
            select(LayerVersion.manifest_id).where(LayerVersion.manifest_id.in_(manifests))
        )
    )
    return gone, sorted(manifests - still)


def _refuse_in_use(
    session: Session, layer: Layer, versions: Sequence[LayerVersion], ref: Ref
) -> None:
    why = _in_use(session, versions)
    if why is not None:
        raise Conflict(f"{ref} is {why}")
    if layer.kind == WRITABLE:
        held = session.execute(
            select(User.name, Machine.name)
            .join(WritableLayer, WritableLayer.user_id == User.id)
            .join(UserSession, UserSession.writable_id == WritableLayer.id)
            .join(Machine, Machine.id == UserSession.machine_id)
            .where(WritableLayer.layer_id == layer.id)
        ).first()
        if held is not None:
            raise Conflict(
                f"{layer.name} is in use by {held[0]}'s session on {held[1]}: "
                f"log {held[0]} out first"
            )
    doomed = {v.id for v in versions}
    for v in versions:
        for dependent in based_on(session, version=v):
            if dependent.id not in doomed and dependent.layer.kind == WRITABLE:
                raise Conflict(
                    f"{v.ref} is the base of writable layer version {dependent.ref} "
                    f"(remove or rebase that first)"
                )


def _writable_owner(session: Session, layer: Layer) -> str | None:
    return session.scalar(
        select(User.name)
        .join(WritableLayer, WritableLayer.user_id == User.id)
        .where(WritableLayer.layer_id == layer.id)
    )


def _entitlements(
    session: Session, layer: Layer, versions: Sequence[LayerVersion], *, whole: bool
) -> list[str]:
    """What the removal takes away: every entitlement of a layer that goes, those pinned
    to a removed version otherwise, each as "kind name"."""
    query = (
        select(Entitlement.target, User.name, Group.name, Machine.name, Entitlement.version)
        .outerjoin(User, User.id == Entitlement.user_id)
        .outerjoin(Group, Group.id == Entitlement.group_id)
        .outerjoin(Machine, Machine.id == Entitlement.machine_id)
        .where(Entitlement.layer_id == layer.id)
        .order_by(Entitlement.target)
    )
    if not whole:
        query = query.where(Entitlement.version.in_([v.version for v in versions]))
    rows = session.execute(query).all()
    return [f"{t.split(':')[0]} {u or g or m}" for t, u, g, m, _v in rows]


def _refuse_unconfirmed(
    session: Session,
    layer: Layer,
    versions: Sequence[LayerVersion],
    owner: str | None,
    whole: bool,
) -> None:
    if layer.kind == WRITABLE and versions:
        whose = f"{owner}'s" if owner else "its user's"
        count = f"{len(versions)} version{'s' if len(versions) > 1 else ''}"
        raise Unconfirmed(
            f"{layer.name} holds {whose} saved files ({count}: "
            f"{', '.join(v.ref for v in versions)}) that removing would delete: "
            f"confirm (--force)"
        )
    entitled = _entitlements(session, layer, versions, whole=whole)
    if entitled:
        raise Unconfirmed(
            f"{layer.name} is entitled to {', '.join(entitled)}: removing "
            f"{'it' if whole else ', '.join(v.ref for v in versions)} takes "
            f"{'that' if len(entitled) == 1 else 'those'} away: confirm (--force)"
        )


def manifest_ids(session: Session) -> list[str]:
    return list(session.scalars(select(LayerVersion.manifest_id).distinct()))


# -- mounts -----------------------------------------------------------------------------------


def _mount_options() -> list[Any]:
    """Load a mount with its layers and their names in 4 queries instead of one per row."""
    return [
        selectinload(LayerMount.layers)
        .selectinload(LayerMountLayer.version)
        .selectinload(LayerVersion.layer),
        selectinload(LayerMount.writable_layer),
        selectinload(LayerMount.writable_version).selectinload(LayerVersion.layer),
    ]


def find_mount(session: Session, *, host: str, root: str) -> LayerMount | None:
    return session.scalars(
        select(LayerMount)
        .where(LayerMount.host == host, LayerMount.root == root)
        .options(*_mount_options())
    ).one_or_none()


def writable_mount(session: Session, *, layer: Layer) -> LayerMount | None:
    return session.scalars(
        select(LayerMount).where(LayerMount.writable_layer_id == layer.id)
    ).one_or_none()


def add_mount(
    session: Session,
    *,
    host: str,
    root: str,
    layers: Sequence[LayerVersion],
    writable: Layer | None,
    writable_version: LayerVersion | None,
    policy: str,
) -> LayerMount:
    """Claim ``root`` (and the writable layer: one root at a time)."""
    mount = LayerMount(
        host=host,
        root=root,
        writable_layer_id=writable.id if writable is not None else None,
        writable_version_id=writable_version.id if writable_version is not None else None,
        policy=policy,
        generation=1,
    )
    mount.layers = [LayerMountLayer(position=i, version=v) for i, v in enumerate(layers)]
    try:
        with session.begin_nested():
            session.add(mount)
            session.flush()
    except IntegrityError:
        holder = writable_mount(session, layer=writable) if writable is not None else None
        if holder is not None and writable is not None:
            raise Conflict(
                f"writable layer {writable.name!r} is mounted on {holder.host}:{holder.root}"
            ) from None
        raise Conflict(f"{root} is already mounted") from None
    return mount


def set_mount_layers(
    session: Session, *, mount: LayerMount, layers: Sequence[LayerVersion]
) -> None:
    """Replace a mount's read-only layers (attach/detach) and bump its generation."""
    mount.layers.clear()
    session.flush()
    mount.layers = [LayerMountLayer(position=i, version=v) for i, v in enumerate(layers)]
    mount.generation += 1
    session.flush()


def mounts_on(session: Session, *, host: str) -> list[LayerMount]:
    return list(
        session.scalars(
            select(LayerMount).where(LayerMount.host == host).options(*_mount_options())
        )
    )


def delete_mount(session: Session, *, mount: LayerMount) -> None:
    session.delete(mount)
    session.flush()
