"""The exports a server offers, resolved against the database at each handshake:

    IMAGE, IMAGE@VERSION      read-only image versions
    machine/NAME              the machine's pinned version plus its delta, writable
    machine/NAME/seed         its NoCloud identity seed, read-only

Devices are opened on a client's first connection and shared by every connection to the
same export (one delta, one chunk cache), then closed with the last one. A machine export
opened as a boot records its boot profile (``serve.profile``): on a server without TLS
every client counts (the network is trusted), with TLS only the machine's own credential
(``serve.access``), so no other client rewrites the order a machine boots in.

A machine's disk has one writer: the first connection to open it writes; any other that
opens it meanwhile gets it read-only (a ``ReadOnlyView``, its export flagged read-only in
the GO reply) and the server logs ``second-writer``. NBD_OPT_INFO describes it alike: in a
worker process that does not hold the machine, from what the parent tells of the
siblings' open machines (``held_elsewhere``); the GO reply, answered where the disk is
open, is what counts if the two ever differ. When the writer leaves with
NBD_CMD_DISC (a power-off) the machine's boot has ended (``delta.file.mark_ended``); the
first connection after that starts a new boot, and a stateless machine's delta goes
(``delta.file.begin_boot``, logged ``new-boot``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from lamina import logs
from lamina.delta import uploads
from lamina.delta.device import machine_device
from lamina.delta.file import begin_boot, exclusive, mark_ended
from lamina.errors import Conflict, LaminaError, UsageError
from lamina.home import Home
from lamina.image import ImageReader, Manifest
from lamina.image.device import ImageDevice
from lamina.names import MACHINE_PREFIX
from lamina.nbd import ExportInfo
from lamina.nbd.device import BlockDevice, MemoryDevice, ReadOnlyView
from lamina.nbd.negotiate import Unknown
from lamina.serve import profile
from lamina.serve.records import DatabaseRecords, Record, Records
from lamina.store import ChunkCache

if TYPE_CHECKING:
    from lamina.identity import AgentSeed, Identity


# How long a lookup's answer serves the open after it: a client sends GO right after INFO
# (or GO looks up and opens at once); a change to the machine meanwhile is a race anyway.
_LOOKUP_FRESH: Final = 2.0


@dataclass(frozen=True, slots=True)
class Resolved(Record):
    """An export as the database describes it, a seed with its disk built (to learn its
    size)."""

    disk: bytes = b""

    @classmethod
    def of(cls, record: Record, **changes: Any) -> Resolved:
        return cls(**({f.name: getattr(record, f.name) for f in fields(record)} | changes))


class ExportCatalog:
    def __init__(self, home: Home, cache: ChunkCache, records: Records | None = None) -> None:
        """``records``: where the database's answers come from (else the home's)."""
        self.home = home
        self.cache = cache
        self.records = records or DatabaseRecords(home)
        self._manifests: dict[bytes, Manifest] = {}
        self._open: dict[str, tuple[BlockDevice, int]] = {}
        self._seeds: dict[str, tuple[object, bytes]] = {}
        self._writers: dict[str, str] = {}  # machine export -> the client writing it
        self._copying: set[str] = set()  # machine exports a backup is copying
        self._elsewhere: set[str] = set()  # machine exports a sibling process has open
        self._lock = threading.Lock()
        # What NBD_OPT_INFO/GO's lookup found, for the open of GO that follows it: one
        # database query instead of two per connection (in a 128-machine storm the two
        # were 20% of a worker's GIL samples, beside the event loop's).
        self._looked_up: dict[str, tuple[float, Resolved]] = {}
        # Devices are opened on the handshake threads: one opening per export at a time
        # (a second Delta on one machine would find its lock taken).
        self._opening: dict[str, threading.Lock] = {}
        # This block server's name in a cluster: a stateful machine assigned to another
        # server is not served here (its delta is on that server's home).
        self.server: str | None = None
        self.log = logging.getLogger(logs.LOGGER)

    # -- Catalog protocol (negotiation) ----------------------------------------------

    def lookup(self, name: str) -> ExportInfo | Unknown | None:
        try:
            resolved = self.resolve(name)
        except UsageError as exc:  # a malformed name, a version out of range
            return Unknown(str(exc))
        except LaminaError:
            return None
        if resolved is None:
            return None
        with self._lock:
            self._looked_up[name] = (time.monotonic() + _LOOKUP_FRESH, resolved)
        if not resolved.info.read_only and (name in self._writers or name in self._elsewhere):
            return replace(resolved.info, read_only=True)  # what GO would give this client
        return resolved.info

    def held_elsewhere(self, name: str, held: bool) -> None:
        """Another serving process has machine export ``name`` open (``held``) or no more:
        its writer is there, so an NBD_OPT_INFO here describes the disk read-only."""
        with self._lock:
            if held:
                self._elsewhere.add(name)
            else:
                self._elsewhere.discard(name)

    def names(self) -> list[str]:
        return self.records.names()

    def resolve(self, name: str) -> Resolved | None:
        r = self.records.resolve(name, self.server)
        if r.seed is not None:
            data = self._seed(*r.seed)
            return Resolved.of(r, info=replace(r.info, size=len(data)), seed=None, disk=data)
        return Resolved.of(r)

    def _seed(self, identity: Identity, agent: AgentSeed | None) -> bytes:
        # (imported here: building a seed takes pycdlib, YAML and the SSH key code, about
        # 10 MiB a worker process that serves no seed need not hold)
        from lamina.identity import seed_image

        # The machine-id tells a re-created machine from the removed one of the same name
        # (both start at identity revision 1); one seed is kept per machine name.
        key = (identity.machine_id, identity.identity_rev, agent)
        cached = self._seeds.get(identity.name)
        if cached is None or cached[0] != key:
            cached = self._seeds[identity.name] = (key, seed_image(identity, agent))
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

    def open(self, name: str, client: str = "-", *, boot: bool = True) -> BlockDevice:
        """The device behind export ``name`` for ``client``: the shared device, or a
        read-only view of it while another client writes that machine's disk (from any
        thread). ``boot``: a machine export opened now records a boot profile."""
        device = self._open_shared(name, boot)
        if device.info.read_only:
            return device
        with self._lock:
            writer = self._writers.get(name)
            copying = writer is None and name in self._copying
            if writer is None and not copying:
                self._writers[name] = client
        if copying:
            self.release(name, device)
            raise Conflict(f"{name} is being copied by a backup: connect again in a moment")
        if writer is None:
            # The writer of a disk some reader kept open: its new boot starts here.
            begin_boot(self._delta_dir(name), stateless=False)
            return device
        logs.event(
            self.log, "second-writer", logging.WARNING, export=name, client=client, writer=writer
        )
        return ReadOnlyView(device)

    def opened(self, name: str) -> BlockDevice | None:
        """The shared device of export ``name`` when some connection has it open."""
        with self._lock:
            found = self._open.get(name)
        return found[0] if found is not None else None

    @contextmanager
    def copying(self, name: str) -> Iterator[None]:
        """While a backup copies machine export ``name``'s disk, no client may start
        writing it (one that would is refused; readers and the current writer, whose
        requests the caller holds, go on)."""
        with self._lock:
            self._copying.add(name)
        try:
            yield
        finally:
            with self._lock:
                self._copying.discard(name)

    def _delta_dir(self, name: str) -> Path:
        return self.home.deltas_dir / name.removeprefix(MACHINE_PREFIX)

    def _open_shared(self, name: str, boot: bool) -> BlockDevice:
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
            resolved = self._just_looked_up(name) or self.resolve(name)
            if resolved is None:
                raise LaminaError(f"no export {name!r}")
            device = self._build(resolved, boot)
            with self._lock:
                self._open[name] = (device, 1)
            return device

    def _just_looked_up(self, name: str) -> Resolved | None:
        """A lookup's answer of the last ``_LOOKUP_FRESH`` seconds, used once."""
        with self._lock:
            until, resolved = self._looked_up.pop(name, (0.0, None))
        return resolved if until > time.monotonic() else None

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
            return MemoryDevice(r.info, r.disk)
        uploads.recover(self.home, r.machine)  # finish a synced upload a crash interrupted
        self._begin_boot(r)
        manifest = self._manifest(r.manifest_id)
        machine = machine_device(self.home, r.machine, r.info, manifest, r.manifest_id, self.cache)
        if not boot:
            return machine
        # A machine export opening is a boot: note the order of its first reads.
        return profile.record_boot(self.records, machine, manifest, r.manifest_id)

    def _begin_boot(self, r: Resolved) -> None:
        """The machine's disk opens: a new boot when its last one ended (see the module
        docstring); a stateless machine's delta is dropped then."""
        assert r.machine is not None
        directory = self.home.deltas_dir / r.machine
        with exclusive(directory):
            if begin_boot(directory, stateless=r.stateless):
                logs.event(self.log, "new-boot", machine=r.machine, delta="dropped")

    def release(self, name: str, device: BlockDevice, *, ended: bool = False) -> None:
        with self._lock:
            if name not in self._open:  # already closed by close_all at shutdown
                return
            shared, refs = self._open[name]
            writer_left = device is shared and name in self._writers
            if writer_left:
                del self._writers[name]
            last = refs == 1
            if last:
                del self._open[name]
            else:
                self._open[name] = (shared, refs - 1)
        if writer_left and ended:
            mark_ended(self._delta_dir(name))  # its writes were flushed at NBD_CMD_DISC
        if last:
            shared.close()

    def close_all(self) -> None:
        """Close every open device (after their connections are gone)."""
        with self._lock:
            devices = [d for d, _ in self._open.values()]
            self._open.clear()
        for device in devices:
            device.close()
