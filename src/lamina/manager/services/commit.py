"""``lamina delta commit``: a machine's delta becomes a new image version (the PVS merge).

Only chunks the delta touches are rebuilt: each is read from the machine's view (image
version + delta), stored (deduplicated like any import) and swapped into a copy of the
manifest. The delta is locked for the duration, so a connected machine is refused. A
view that some version of the image already is (an empty delta) gives that version back,
marked unchanged, instead of a copy of it.
"""

from __future__ import annotations

from lamina.delta.device import machine_device
from lamina.delta.file import BLOCK, discard
from lamina.home import Home
from lamina.image import Imported, ImportStats, Manifest
from lamina.manager.schemas import DeltaCommitted
from lamina.manager.services import images, machines
from lamina.names import MACHINE_PREFIX, check_name
from lamina.nbd import ExportInfo
from lamina.store import ChunkCache


def commit_delta(
    home: Home, *, machine: str, image: str | None = None, repin: bool = False
) -> DeltaCommitted:
    with home.session() as session:
        m = machines.get(session, machine)
        version = m.image_version
        base_id = bytes.fromhex(version.manifest_id)
        target = check_name(image, "image name") if image else version.image.name
        base_ref = version.ref
    manifest = Manifest.from_bytes(home.store.get(base_id))
    info = ExportInfo(MACHINE_PREFIX + machine, manifest.size, read_only=False)
    device = machine_device(home, machine, info, manifest, base_id, ChunkCache(16 << 20))
    delta = device.delta
    per_chunk = manifest.chunk_size // BLOCK
    try:

        def commit(imported: Imported) -> images.Recorded:
            with home.session() as session:
                recorded = images.add_version(
                    session,
                    name=target,
                    imported=imported,
                    source=f"delta of {machine} on {base_ref}",
                )
                if repin:
                    machines.pin(
                        session, machine=machines.get(session, machine), version=recorded.version
                    )
                return recorded

        with home.store.writer() as writer:
            changes: dict[int, bytes] = {}
            stored = new = 0
            for index in range(manifest.count):
                if delta.untouched(index * per_chunk, per_chunk):
                    continue
                data = b"".join(device.read(index * manifest.chunk_size, manifest.chunk_len(index)))
                put = writer.put(data)
                changes[index] = put.chunk_id
                stored += put.stored
                new += put.new
            result = manifest.replace(changes)
            put = writer.put(result.to_bytes())
            stats = ImportStats(
                result.size,
                len(changes) * manifest.chunk_size,
                len(changes),
                new,
                stored + put.stored,
                "delta",
            )
            writer.flush()
            recorded = commit(Imported(result, put.chunk_id, stats))
    finally:
        delta.close()
    if repin:
        discard(home.deltas_dir / machine)
    return DeltaCommitted(
        ref=recorded.ref,
        machine=machine,
        base=base_ref,
        changed_chunks=len(changes),
        stored_bytes=stats.stored_bytes if recorded.created else 0,
        repinned=repin,
        unchanged=not recorded.created,
    )
