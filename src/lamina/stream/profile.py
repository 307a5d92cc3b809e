"""Boot profiles, recorded by the block server, served to stream endpoints.

When a machine export opens (its first connection: a machine booting), the server notes
the order in which the image's chunks are first read during the next ``WINDOW`` seconds,
or until the export closes (the demo VM powers off ~3 s after its first read). The order
is merged into the image version's profile: chunks a previous boot already named keep
their place, new ones go to the end. After ``MAX_BOOTS`` boots the profile is settled
and exports open without a recorder.

Cost on the read path while recording: one integer division and a bytearray lookup per
read (about 0.3 us); afterwards one attribute test. The database write happens once per
boot, on its own thread.
"""

from __future__ import annotations

import array
import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

from lamina.nbd.device import BlockDevice, Extent
from lamina.nbd.events import Buffer

if TYPE_CHECKING:
    from lamina.home import Home
    from lamina.image import Manifest

# Desktop boots reach a login screen in 20-60 s; the demo VM is done in ~3 s.
WINDOW: Final = 60.0
MAX_BOOTS: Final = 8


def encode(order: Iterable[int]) -> bytes:
    data = array.array("I", order)
    if sys.byteorder != "little":
        data.byteswap()
    return data.tobytes()


def decode(blob: bytes) -> list[int]:
    data = array.array("I")
    data.frombytes(blob[: len(blob) - len(blob) % 4])
    if sys.byteorder != "little":
        data.byteswap()
    return data.tolist()


def merge(old: list[int], new: list[int]) -> list[int]:
    """The profile after one more boot: known chunks keep their rank, new ones follow."""
    known = set(old)
    out = list(old)
    for i in new:
        if i not in known:
            known.add(i)
            out.append(i)
    return out


class BootRecorder:
    """First reads of chunks, in order (pure)."""

    def __init__(self, chunk_size: int, count: int) -> None:
        self.chunk_size = chunk_size
        self.seen = bytearray(count)
        self.order: list[int] = []

    def note(self, offset: int, length: int) -> None:
        cs = self.chunk_size
        for i in range(offset // cs, min((offset + max(length, 1) - 1) // cs + 1, len(self.seen))):
            if not self.seen[i]:
                self.seen[i] = 1
                self.order.append(i)


class RecordingDevice:
    """A BlockDevice that notes first reads for ``window`` seconds, then only forwards."""

    def __init__(
        self,
        inner: BlockDevice,
        recorder: BootRecorder,
        done: Callable[[list[int]], None],
        window: float = WINDOW,
    ) -> None:
        self.info = inner.info
        self.inner = inner
        self.recorder: BootRecorder | None = recorder
        self._done = done
        self._deadline = time.monotonic() + window
        self._finished = threading.Lock()
        self._timer = threading.Timer(window, self.finish)
        self._timer.daemon = True
        self._timer.start()

    def finish(self) -> None:
        """Stop recording and hand the order over (once; from any thread)."""
        if not self._finished.acquire(blocking=False):
            return
        self._timer.cancel()
        recorder, self.recorder = self.recorder, None
        if recorder is not None and recorder.order:
            threading.Thread(
                target=self._done, args=(list(recorder.order),), name="profile", daemon=True
            ).start()

    def read(self, offset: int, length: int) -> list[memoryview]:
        recorder = self.recorder
        if recorder is not None:
            if time.monotonic() < self._deadline:
                recorder.note(offset, length)
            else:
                self.finish()
        return self.inner.read(offset, length)

    def would_block(self, offset: int, length: int) -> bool:
        return self.inner.would_block(offset, length)

    def prefetch(self, offset: int, length: int) -> None:
        self.inner.prefetch(offset, length)

    def write(self, offset: int, data: Buffer, fua: bool) -> None:
        self.inner.write(offset, data, fua)

    def write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        self.inner.write_zeroes(offset, length, fua)

    def flush(self) -> None:
        self.inner.flush()

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self.inner.extents(offset, length)

    def close(self) -> None:
        self.finish()
        self.inner.close()


# -- storage ----------------------------------------------------------------------------------


def load(home: Home, manifest_id: str) -> tuple[list[int], int]:
    """(chunk indices in first-read order, boots recorded) of an image version."""
    from lamina.manager.models.stream import BootProfile

    with home.session() as session:
        row = session.get(BootProfile, manifest_id)
        return (decode(row.chunks), row.boots) if row is not None else ([], 0)


def boots(home: Home, manifest_id: str) -> int:
    """How many boots an image version's profile has seen (the order is not decoded)."""
    from sqlalchemy import select

    from lamina.manager.models.stream import BootProfile

    with home.session(read_only=True) as session:
        query = select(BootProfile.boots).where(BootProfile.manifest_id == manifest_id)
        return session.scalar(query) or 0


def save(home: Home, manifest_id: str, order: list[int]) -> None:
    from lamina.manager.models.base import utcnow
    from lamina.manager.models.stream import BootProfile

    with home.session() as session:
        row = session.get(BootProfile, manifest_id)
        if row is None:
            session.add(BootProfile(manifest_id=manifest_id, chunks=encode(order), boots=1))
        else:
            row.chunks = encode(merge(decode(row.chunks), order))
            row.boots += 1
            row.updated_at = utcnow()


def record_boot(
    home: Home, device: BlockDevice, manifest: Manifest, manifest_id: bytes
) -> BlockDevice:
    """``device`` (a machine's image, just opened) wrapped in a recorder, unless this
    version's profile has seen ``MAX_BOOTS`` boots already."""
    mid = manifest_id.hex()
    try:
        seen = boots(home, mid)
    except Exception:  # a profile is an optimization: never fail an export over it
        return device
    if seen >= MAX_BOOTS:
        return device

    def done(order: list[int]) -> None:
        with contextlib.suppress(Exception):  # the next boot records again
            save(home, mid, order)

    return RecordingDevice(device, BootRecorder(manifest.chunk_size, manifest.count), done)
