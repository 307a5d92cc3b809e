"""Rebase in the database: the rule table, which writable layers to rebase, and recording
a rebased version (atomically, after checking nobody is using the layer).

Everything leaves here as plain values (``Job``, ``VersionInfo``: ``lamina.rebase.jobs``),
so the merge and the worker processes of a bulk rebase never hold an ORM object across
sessions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from lamina.errors import Conflict, NotFound, UsageError
from lamina.layer.records import APP, WRITABLE, NewVersion, VersionInfo
from lamina.manager.models import (
    Layer,
    LayerMount,
    LayerVersion,
    LayerVersionBase,
    Machine,
    Setting,
    UserSession,
    WritableLayer,
)
from lamina.manager.services import layers as svc
from lamina.names import Ref
from lamina.rebase.jobs import InUse, Job, Skipped
from lamina.rebase.rules import RuleTable

RULES_KEY = "rebase.policy"


# -- the rule table ---------------------------------------------------------------------------


def get_rules(session: Session) -> RuleTable:
    row = session.get(Setting, RULES_KEY)
    return RuleTable.from_json(row.value) if row is not None else RuleTable()


def set_rules(session: Session, table: RuleTable | None) -> None:
    """Store ``table`` (None: back to the defaults)."""
    row = session.get(Setting, RULES_KEY)
    if table is None or table == RuleTable():
        if row is not None:
            session.delete(row)
        return
    text = table.to_json()
    if len(text) > Setting.value.type.length:
        raise UsageError(f"the rebase policy would take {len(text)} characters (at most 4000)")
    if row is None:
        session.add(Setting(key=RULES_KEY, value=text))
    else:
        row.value = text


# -- who is using a writable layer ------------------------------------------------------------


def in_use(session: Session, layer_ids: Sequence[int]) -> dict[int, str]:
    """Writable layers mounted by ``lamina mount`` or held by a user's session on a machine."""
    found: dict[int, str] = {}
    for layer_id, host, root in session.execute(
        select(LayerMount.writable_layer_id, LayerMount.host, LayerMount.root).where(
            LayerMount.writable_layer_id.in_(layer_ids)
        )
    ):
        if layer_id is not None:
            found[layer_id] = f"mounted on {host}:{root}"
    for layer_id, machine in session.execute(
        select(WritableLayer.layer_id, Machine.name)
        .join(UserSession, UserSession.writable_id == WritableLayer.id)
        .join(Machine, Machine.id == UserSession.machine_id)
        .where(WritableLayer.layer_id.in_(layer_ids))
    ):
        found.setdefault(layer_id, f"in a session on machine {machine}")
    return found


# -- what to rebase ---------------------------------------------------------------------------


def _bases(session: Session, version_ids: Sequence[int]) -> dict[int, list[VersionInfo]]:
    b = aliased(LayerVersion)
    rows = session.execute(
        select(
            LayerVersionBase.version_id,
            LayerVersionBase.base_ref,
            b.id,
            b.manifest_id,
            b.layer_id,
        )
        .outerjoin(b, b.id == LayerVersionBase.base_id)
        .where(LayerVersionBase.version_id.in_(version_ids))
        .order_by(LayerVersionBase.version_id, LayerVersionBase.position)
    )
    out: dict[int, list[VersionInfo]] = {}
    for version_id, ref, base_id, manifest, layer_id in rows:
        if base_id is None:
            raise NotFound(f"base {ref} of a writable layer version was removed")
        out.setdefault(version_id, []).append(
            VersionInfo(base_id, ref, bytes.fromhex(manifest), layer_id)
        )
    return out


def base_of(session: Session, ref: Ref) -> VersionInfo:
    v = svc.get_version(session, ref)
    if v.layer.kind != APP:
        raise UsageError(f"{v.ref} is a writable layer: rebase onto a read-only layer version")
    return VersionInfo(v.id, v.ref, bytes.fromhex(v.manifest_id), v.layer_id)


def _job(name: str, v: LayerVersion, bases: list[VersionInfo], onto: VersionInfo) -> Job | Skipped:
    at = [i for i, b in enumerate(bases) if b.layer_id == onto.layer_id]
    if not at:
        raise UsageError(
            f"{v.ref} was not made on {onto.ref.rpartition('@')[0]} (it was on {_on(bases)})"
        )
    if bases[at[0]].id == onto.id:
        return Skipped(name, v.ref, "already", f"{v.ref} is on {onto.ref}")
    new = list(bases)
    new[at[0]] = onto
    mid = bytes.fromhex(v.manifest_id)
    return Job(name, v.layer_id, v.id, v.ref, mid, v.policy, tuple(bases), tuple(new))


def plan_one(session: Session, writable: Ref, onto: Ref) -> Job | Skipped:
    """The job for one writable layer; Conflict while it is in use."""
    layer = svc.get_layer(session, writable.name)
    if layer.kind != WRITABLE:
        raise UsageError(f"{layer.name!r} is an app layer: only writable layers are rebased")
    latest = svc.latest_version(session, layer)
    if latest is None:
        raise NotFound(f"writable layer {layer.name!r} has no versions yet")
    if writable.version is not None and writable.version != latest.version:
        raise UsageError(f"{writable} is not the latest version of {layer.name} ({latest.ref})")
    busy = in_use(session, [layer.id]).get(layer.id)
    if busy is not None:
        raise InUse(f"writable layer {layer.name} is {busy}: rebase it after its session ends")
    target = base_of(session, onto)
    return _job(layer.name, latest, _bases(session, [latest.id]).get(latest.id, []), target)


def plan_all(
    session: Session, source: VersionInfo, target: VersionInfo
) -> tuple[list[Job], list[Skipped]]:
    """Jobs for every writable layer whose latest version was made on ``source``, and
    those skipped: already on ``target`` (after an earlier run), in use, moved elsewhere."""
    if source.layer_id != target.layer_id:
        raise UsageError(f"--from {source.ref} and --onto {target.ref} are not one layer")
    ever = (
        select(LayerVersion.layer_id)
        .join(LayerVersionBase, LayerVersionBase.version_id == LayerVersion.id)
        .where(LayerVersionBase.base_id.in_([source.id, target.id]))
        .distinct()
    )
    newest = (
        select(LayerVersion.layer_id, func.max(LayerVersion.version).label("top"))
        .group_by(LayerVersion.layer_id)
        .subquery()
    )
    rows = session.execute(
        select(LayerVersion, Layer.name)
        .join(Layer, Layer.id == LayerVersion.layer_id)
        .join(
            newest,
            (newest.c.layer_id == LayerVersion.layer_id) & (newest.c.top == LayerVersion.version),
        )
        .where(Layer.kind == WRITABLE, LayerVersion.layer_id.in_(ever))
        .order_by(Layer.name)
    ).all()
    bases = _bases(session, [v.id for v, _ in rows])
    busy = in_use(session, [v.layer_id for v, _ in rows])
    jobs: list[Job] = []
    skipped: list[Skipped] = []
    for v, name in rows:
        mine = bases.get(v.id, [])
        ref = f"{name}@{v.version}"
        if not any(b.id in (source.id, target.id) for b in mine):
            skipped.append(Skipped(name, ref, "elsewhere", f"{ref} is on {_on(mine)}"))
            continue
        planned = _job(name, v, mine, target)
        if isinstance(planned, Skipped):
            skipped.append(replace(planned, ref=ref))
        elif v.layer_id in busy:
            skipped.append(Skipped(name, ref, "in-use", busy[v.layer_id]))
        else:
            jobs.append(planned)
    return jobs, skipped


def _on(bases: Sequence[VersionInfo]) -> str:
    return ", ".join(b.ref for b in bases) or "nothing"


# -- recording --------------------------------------------------------------------------------


def record(session: Session, job: Job, new: NewVersion) -> str:
    """The rebased version as the layer's next one, if the layer is still free and still
    at the version the merge started from (else Conflict: nothing is recorded)."""
    busy = in_use(session, [job.layer_id]).get(job.layer_id)
    if busy is not None:
        raise InUse(f"writable layer {job.name} is {busy}: rebase it after its session ends")
    layer = session.get_one(Layer, job.layer_id)
    latest = svc.latest_version(session, layer)
    if latest is None or latest.id != job.version_id:
        now = latest.ref if latest is not None else "nothing"
        raise Conflict(f"writable layer {job.name} moved from {job.ref} to {now} meanwhile")
    version = svc.add_version(
        session,
        name=job.name,
        kind=WRITABLE,
        new=new,
        bases=[session.get_one(LayerVersion, b.id) for b in job.new],
        parent=latest,
        policy=job.policy,
    )
    return version.ref
