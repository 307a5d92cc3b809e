"""Block devices whose every byte is a range of a file (or zeros), so the event loop can
answer a read with ``preadv`` and no copy through a cache of its own.

    FileImageDevice    an image version through ``ImageFiles`` (packs, the hydrated file)
    FileMachineDevice  a machine: its version under its delta (``delta.data`` slots)
    FileCatalog        the exports of a home, built from the two above

Both keep the ``BlockDevice`` interface (blocking reads on worker threads, for the writes'
read-modify-write and for clients served by ``NbdServerProtocol``) and add ``locate``:
where a range lives, without touching the disk, or False when a chunk must be made ready
first.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from lamina.delta import uploads
from lamina.delta.device import MachineDevice
from lamina.delta.file import BLOCK, Delta
from lamina.home import Home
from lamina.image import Manifest
from lamina.image.device import manifest_extents
from lamina.image.profile import MAX_BOOTS, WINDOW, decode
from lamina.nbd import ExportInfo
from lamina.nbd.device import BlockDevice, Extent, ReadOnly
from lamina.serve.catalog import ExportCatalog, Resolved
from lamina.serve.imagefiles import ImageFiles, Segment, hydrated_dir
from lamina.serve.profile import BootRecorder
from lamina.serve.records import Records
from lamina.serve.warmup import Warmer
from lamina.store import ChunkCache


class BootNotes:
    """A machine's first reads during its boot window, handed to ``done`` once (the
    image version's boot profile; see ``serve.profile``)."""

    def __init__(self, chunk_size: int, count: int, done: Callable[[list[int]], None]) -> None:
        self.recorder: BootRecorder | None = BootRecorder(chunk_size, count)
        self._deadline = time.monotonic() + WINDOW
        self._done = done
        self._once = threading.Lock()

    def note(self, offset: int, length: int) -> None:
        recorder = self.recorder
        if recorder is None:
            return
        if time.monotonic() < self._deadline:
            recorder.note(offset, length)
        else:
            self.finish()

    def finish(self) -> None:
        if not self._once.acquire(blocking=False):
            return
        recorder, self.recorder = self.recorder, None
        if recorder is not None and recorder.order:
            threading.Thread(
                target=self._done, args=(list(recorder.order),), name="profile", daemon=True
            ).start()


class FileImageDevice(ReadOnly):
    def __init__(self, info: ExportInfo, files: ImageFiles) -> None:
        self.info = info
        self.files = files

    def locate(self, offset: int, length: int, out: list[Segment]) -> bool:
        return self.files.segments(offset, length, out)

    def read(self, offset: int, length: int) -> list[memoryview]:
        return [memoryview(b) for b in self.files.read(offset, length)]

    def would_block(self, offset: int, length: int) -> bool:
        return not self.files.segments(offset, length, [])

    def prefetch(self, offset: int, length: int) -> None:
        self.files.hydrate(self.files.chunks(offset, length))

    def extents(self, offset: int, length: int) -> list[Extent]:
        return manifest_extents(self.files.manifest, offset, length)


class FileMachineDevice(MachineDevice):
    """Reads of delta blocks come from ``delta.data`` through a descriptor of its own, so
    the delta (written on a worker thread) is never read through its writer's state."""

    base: FileImageDevice

    def __init__(self, info: ExportInfo, base: FileImageDevice, delta: Delta) -> None:
        super().__init__(info, base, delta)
        self._data_fd = os.open(delta.directory / "delta.data", os.O_RDONLY | os.O_CLOEXEC)
        self.notes: BootNotes | None = None

    def locate(self, offset: int, length: int, out: list[Segment]) -> bool:
        if self.notes is not None:
            self.notes.note(offset, length)
        first = offset // BLOCK
        count = -(-(offset + length) // BLOCK) - first
        delta = self.delta
        if delta.untouched(first, count):
            return self.base.locate(offset, length, out)
        end = offset + length
        for run in delta.runs(first, count):
            start = max(offset, run.first * BLOCK)
            stop = min(end, (run.first + run.count) * BLOCK, self.info.size)
            if run.kind == "base":
                if not self.base.locate(start, stop - start, out):
                    return False
            elif run.kind == "zero":
                out.append((None, 0, stop - start))
            else:
                out.append(
                    (self._data_fd, run.slot * BLOCK + start - run.first * BLOCK, stop - start)
                )
        return True

    def read(self, offset: int, length: int) -> list[memoryview]:
        if self.notes is not None:
            self.notes.note(offset, length)
        return super().read(offset, length)

    def close(self) -> None:
        if self.notes is not None:
            self.notes.finish()
        try:
            super().close()
        finally:
            os.close(self._data_fd)


class FileCatalog(ExportCatalog):
    """The exports of a home with file-backed devices; one ``ImageFiles`` per image
    version in this process, shared by all its machines."""

    def __init__(
        self,
        home: Home,
        on_close: Callable[[str], None] | None = None,
        records: Records | None = None,
        share: tuple[int, int] = (0, 1),
    ) -> None:
        """``share``: this process's index among the server's processes, and their
        count (they split the warm-up of a version's boot set: ``serve.warmup``)."""
        super().__init__(home, ChunkCache(0), records)  # (the base's cache is not used here)
        self.warmer = Warmer(
            lambda manifest_id: decode(self.records.profile(manifest_id)), *share, log=self.log
        )
        self._files: dict[bytes, ImageFiles] = {}
        self._files_lock = threading.Lock()
        self._on_close = on_close
        self._hydrated = 0
        self._settled_ids: set[bytes] = set()  # versions whose boot profile is settled
        self._recording: Counter[bytes] = Counter()  # boots recorded here, per version
        self.directory: Path = hydrated_dir(home.cache_dir)

    def open_count(self) -> int:
        return len(self._open)

    def hydrations(self) -> int:
        """Chunks this process made ready (checked, or decompressed into a cache file)."""
        with self._files_lock:
            return self._hydrated + sum(f.hydrations for f in self._files.values())

    def release(self, name: str, device: BlockDevice, *, ended: bool = False) -> None:
        """One user fewer; the last one closes the device (and says so to ``on_close``)."""
        super().release(name, device, ended=ended)
        if self._on_close is not None and name not in self._open:
            self._on_close(name)

    def image_files(self, manifest_id: bytes) -> ImageFiles:
        with self._files_lock:
            files = self._files.get(manifest_id)
            if files is None:
                manifest = self._manifest(manifest_id)
                files = ImageFiles(self.home.store, manifest, manifest_id, self.directory)
                self._files[manifest_id] = files
                self.warmer.start(files)
            return files

    def _build(self, r: Resolved, boot: bool) -> BlockDevice:
        if r.kind != "machine":
            if r.kind == "image":
                return FileImageDevice(r.info, self.image_files(r.manifest_id))
            return super()._build(r, boot)
        assert r.machine is not None
        uploads.recover(self.home, r.machine)  # finish a synced upload a crash interrupted
        self._begin_boot(r)
        base = FileImageDevice(r.info, self.image_files(r.manifest_id))
        delta = Delta(self.home.deltas_dir / r.machine, size=base.files.size, base_id=r.manifest_id)
        try:
            device = FileMachineDevice(r.info, base, delta)
        except BaseException:
            delta.close()
            raise
        if boot and not self._settled(r.manifest_id):  # (see ExportCatalog.open)
            device.notes = _boot_notes(self.records, base.files.manifest, r.manifest_id)
            with self._files_lock:
                self._recording[r.manifest_id] += 1
        return device

    def _settled(self, manifest_id: bytes) -> bool:
        """Whether the version's boot profile has, or will have once the boots this
        process records are saved, enough boots. Once it has, the machines opened after
        need no query (one per open was 7% of a worker's GIL samples in a 128-machine
        storm); and a storm of a new version records ``MAX_BOOTS`` boots, not one per
        machine (each notes every read for a minute, then merges into the profile)."""
        with self._files_lock:
            if manifest_id in self._settled_ids:
                return True
            recording = self._recording[manifest_id]
        try:
            settled = self.records.boots(manifest_id) + recording >= MAX_BOOTS
        except Exception:  # a profile is an optimization: never fail an export over it
            return True
        if settled:
            with self._files_lock:
                self._settled_ids.add(manifest_id)
        return settled

    def close_all(self) -> None:
        self.warmer.stop()
        super().close_all()
        with self._files_lock:
            files, self._files = list(self._files.values()), {}
            self._hydrated += sum(f.hydrations for f in files)
        for f in files:
            f.close()


def _boot_notes(records: Records, manifest: Manifest, manifest_id: bytes) -> BootNotes:
    """A recorder for this boot (its profile has not seen enough boots yet)."""

    def done(order: list[int]) -> None:
        with contextlib.suppress(Exception):  # the next boot records again
            records.save_profile(manifest_id, order)

    return BootNotes(manifest.chunk_size, manifest.count, done)
