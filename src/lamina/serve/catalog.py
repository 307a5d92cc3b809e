"""The exports a server offers, resolved against the database at each handshake:

    IMAGE, IMAGE@VERSION      read-only image versions
    machine/NAME              the machine's pinned version plus its delta, writable
    machine/NAME/seed         its NoCloud identity seed, read-only

Devices are opened on a client's first connection and shared by every connection to the
same export (one delta, one chunk cache), then closed with the last one. A machine export
opened as a boot records its boot profile (``serve.profile``): on a server without TLS
every client counts (the network is trusted), with TLS only the machine's own credential
(``serve.access``), so no other client rewrites the order a machine boots in.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from lamina.delta import uploads
from lamina.delta.device import machine_device
from lamina.errors import LaminaError, UsageError
from lamina.home import Home
from lamina.identity import MachineRow, identity_from_machine, seed_image
from lamina.image import ImageReader, Manifest
from lamina.image.device import ImageDevice
from lamina.manager.services import images, machines
from lamina.names import MACHINE_PREFIX, SEED_SUFFIX, parse_ref
from lamina.nbd import ExportInfo
from lamina.nbd.device import BlockDevice, MemoryDevice
from lamina.nbd.negotiate import Unknown
from lamina.serve import profile
from lamina.store import ChunkCache


@dataclass(frozen=True, slots=True)
class Resolved:
    info: ExportInfo
    kind: str  # image | machine | seed
    manifest_id: bytes
    machine: str | None = None
    seed: bytes = b""  # the seed disk, built to learn its size


class ExportCatalog:
    def __init__(self, home: Home, cache: ChunkCache) -> None:
        self.home = home
        self.cache = cache
        self._manifests: dict[bytes, Manifest] = {}
        self._open: dict[str, tuple[BlockDevice, int]] = {}
        self._seeds: dict[str, tuple[tuple[str, int], bytes]] = {}
        self._lock = threading.Lock()
        # Devices are opened on the handshake threads: one opening per export at a time
        # (a second Delta on one machine would find its lock taken).
        self._opening: dict[str, threading.Lock] = {}

    # -- Catalog protocol (negotiation) ----------------------------------------------

    def lookup(self, name: str) -> ExportInfo | Unknown | None:
        try:
            resolved = self.resolve(name)
        except UsageError as exc:  # a malformed name, a version out of range
            return Unknown(str(exc))
        except LaminaError:
            return None
        return resolved.info if resolved else None

    def names(self) -> list[str]:
        out: list[str] = []
        with self.home.session() as session:
            for image in images.list_images(session):
                out.append(image.name)
                out += [v.ref for v in image.versions]
            for machine in machines.list_all(session):
                out += [MACHINE_PREFIX + machine.name, MACHINE_PREFIX + machine.name + SEED_SUFFIX]
        return out

    def resolve(self, name: str) -> Resolved | None:
        with self.home.session() as session:
            if name.startswith(MACHINE_PREFIX):
                rest = name[len(MACHINE_PREFIX) :]
                seed = rest.endswith(SEED_SUFFIX)
                machine = machines.get(session, rest.removesuffix(SEED_SUFFIX))
                version = machine.image_version
                if seed:
                    data = self._seed(machine)
                    info = ExportInfo(name, len(data), read_only=True, description="identity seed")
                    return Resolved(info, "seed", b"", machine.name, data)
                info = ExportInfo(
                    name, version.size, read_only=False, description=f"{version.ref} + delta"
                )
                return Resolved(info, "machine", bytes.fromhex(version.manifest_id), machine.name)
            version = images.get_version(session, parse_ref(name, "image name"))
            info = ExportInfo(name, version.size, read_only=True, description=version.ref)
            return Resolved(info, "image", bytes.fromhex(version.manifest_id))

    def _seed(self, machine: MachineRow) -> bytes:
        identity = identity_from_machine(machine)
        # The machine-id tells a re-created machine from the removed one of the same name
        # (both start at identity revision 1); one seed is kept per machine name.
        key = (identity.machine_id, identity.identity_rev)
        cached = self._seeds.get(identity.name)
        if cached is None or cached[0] != key:
            cached = self._seeds[identity.name] = (key, seed_image(identity))
        return cached[1]

    # -- devices ----------------------------------------------------------------------

    def _manifest(self, manifest_id: bytes) -> Manifest:
        m = self._manifests.get(manifest_id)
        if m is None:
            m = self._manifests[manifest_id] = Manifest.from_bytes(self.home.store.get(manifest_id))
        return m

    def _image_device(self, info: ExportInfo, manifest_id: bytes) -> ImageDevice:
        return ImageDevice(
            info, ImageReader(self.home.store, self._manifest(manifest_id), self.cache)
        )

    def open(self, name: str, *, boot: bool = True) -> BlockDevice:
        """The shared device behind export ``name`` (opened on first use; from any
        thread). ``boot``: a machine export opened now records a boot profile."""
        with self._lock:
            shared = self._acquire(name)
            if shared is not None:
                return shared
            opening = self._opening.setdefault(name, threading.Lock())
        with opening:
            with self._lock:
                shared = self._acquire(name)  # opened while this one waited
            if shared is not None:
                return shared
            resolved = self.resolve(name)
            if resolved is None:
                raise LaminaError(f"no export {name!r}")
            device = self._build(resolved, boot)
            with self._lock:
                self._open[name] = (device, 1)
            return device

    def _acquire(self, name: str) -> BlockDevice | None:
        """One more user of the open device ``name``, if it is open (lock held)."""
        if name not in self._open:
            return None
        device, refs = self._open[name]
        self._open[name] = (device, refs + 1)
        return device

    def _build(self, r: Resolved, boot: bool) -> BlockDevice:
        if r.kind == "image":
            return self._image_device(r.info, r.manifest_id)
        assert r.machine is not None
        if r.kind == "seed":
            return MemoryDevice(r.info, r.seed)
        uploads.recover(self.home, r.machine)  # finish a synced upload a crash interrupted
        manifest = self._manifest(r.manifest_id)
        machine = machine_device(self.home, r.machine, r.info, manifest, r.manifest_id, self.cache)
        if not boot:
            return machine
        # A machine export opening is a boot: note the order of its first reads.
        return profile.record_boot(self.home, machine, manifest, r.manifest_id)

    def release(self, name: str) -> None:
        with self._lock:
            if name not in self._open:  # already closed by close_all at shutdown
                return
            device, refs = self._open[name]
            if refs > 1:
                self._open[name] = (device, refs - 1)
                return
            del self._open[name]
        device.close()

    def close_all(self) -> None:
        """Close every open device (after their connections are gone)."""
        with self._lock:
            devices = [d for d, _ in self._open.values()]
            self._open.clear()
        for device in devices:
            device.close()
