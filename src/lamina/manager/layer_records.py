"""The layer code's ``LayerRecords`` over a home's database (the manager's, or an agent's
own copy): each call one transaction, rows turned into plain values at the edge."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lamina.home import Home
from lamina.layer.records import APP, WRITABLE, MountRecord, NewVersion, VersionInfo, WritableState
from lamina.manager.models import LayerMount, LayerVersion
from lamina.manager.services import layers as svc
from lamina.names import parse_ref


def version_info(v: LayerVersion) -> VersionInfo:
    return VersionInfo(v.id, v.ref, bytes.fromhex(v.manifest_id), v.layer_id)


def mount_record(m: LayerMount) -> MountRecord:
    return MountRecord(
        m.id,
        m.host,
        m.root,
        [version_info(ml.version) for ml in m.layers],
        m.writable_layer.name if m.writable_layer else None,
        version_info(m.writable_version) if m.writable_version else None,
        m.policy,
        m.generation,
    )


class DatabaseRecords:
    """Implements ``lamina.layer.records.LayerRecords`` with ``lamina.manager.services.layers``."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.unchanged: list[str] = []  # refs add_version gave back instead of making new

    def versions(self, refs: Sequence[str]) -> list[VersionInfo]:
        with self.home.session() as session:
            return [
                version_info(svc.get_version(session, parse_ref(r, "layer name"))) for r in refs
            ]

    def writable(self, name: str) -> WritableState:
        with self.home.session() as session:
            layer = svc.ensure_writable(session, name)
            latest = svc.latest_version(session, layer)
            holder = svc.writable_mount(session, layer=layer)
            return WritableState(
                version_info(latest) if latest is not None else None,
                (holder.host, holder.root) if holder is not None else None,
            )

    def base_ids(self, version_id: int) -> list[int | None]:
        with self.home.session(read_only=True) as session:
            version = session.get(LayerVersion, version_id)
            return [b.base_id for b in version.bases] if version is not None else []

    def base_refs(self, version_ids: Sequence[int]) -> list[list[str]]:
        with self.home.session(read_only=True) as session:
            found = [session.get(LayerVersion, i) for i in version_ids]
            return [[b.base_ref for b in v.bases] if v is not None else [] for v in found]

    def add_version(
        self, *, name: str, kind: str, new: NewVersion, bases: Sequence[VersionInfo] = ()
    ) -> str:
        """A new version; an app layer's identical tree on the same bases gives back the
        version that has it (its ref is then kept in ``unchanged``)."""
        with self.home.session() as session:
            rows = [session.get_one(LayerVersion, b.id) for b in bases]
            if kind == APP:
                same = svc.same_version(
                    session, name=name, manifest_id=new.manifest_id.hex(), bases=rows
                )
                if same is not None:
                    self.unchanged.append(same.ref)
                    return same.ref
            return svc.add_version(session, name=name, kind=kind, new=new, bases=rows).ref

    def find_mount(self, host: str, root: str) -> MountRecord | None:
        with self.home.session() as session:
            found = svc.find_mount(session, host=host, root=root)
            return mount_record(found) if found is not None else None

    def mounts_on(self, host: str) -> list[MountRecord]:
        with self.home.session() as session:
            return [mount_record(m) for m in svc.mounts_on(session, host=host)]

    def add_mount(
        self,
        *,
        host: str,
        root: str,
        layers: Sequence[VersionInfo],
        writable: str | None,
        writable_version: VersionInfo | None,
        policy: str,
    ) -> MountRecord:
        with self.home.session() as session:
            record = svc.add_mount(
                session,
                host=host,
                root=root,
                layers=[session.get_one(LayerVersion, v.id) for v in layers],
                writable=svc.ensure_writable(session, writable) if writable else None,
                writable_version=(
                    session.get_one(LayerVersion, writable_version.id)
                    if writable_version is not None
                    else None
                ),
                policy=policy,
            )
            return mount_record(record)

    def set_layers(
        self, mount_id: int, layers: Sequence[VersionInfo], switch: Callable[[], None]
    ) -> None:
        with self.home.session() as session:
            record = session.get_one(LayerMount, mount_id)
            rows = [session.get_one(LayerVersion, v.id) for v in layers]
            svc.set_mount_layers(session, mount=record, layers=rows)
            switch()

    def end_mount(
        self,
        mount_id: int,
        *,
        keep: NewVersion | None = None,
        bases: Sequence[VersionInfo] = (),
        parent: VersionInfo | None = None,
    ) -> str | None:
        with self.home.session() as session:
            mount = session.get_one(LayerMount, mount_id)
            ref = None
            if keep is not None and mount.writable_layer is not None:
                ref = svc.add_version(
                    session,
                    name=mount.writable_layer.name,
                    kind=WRITABLE,
                    new=keep,
                    bases=[session.get_one(LayerVersion, b.id) for b in bases],
                    parent=session.get(LayerVersion, parent.id) if parent else None,
                    policy=mount.policy,
                ).ref
            svc.delete_mount(session, mount=mount)
            return ref
