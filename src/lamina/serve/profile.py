"""Boot profiles recorded by the block server (the format: ``lamina.image.profile``).

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

import contextlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from lamina.image.profile import MAX_BOOTS, WINDOW
from lamina.nbd.device import BlockDevice, Extent
from lamina.nbd.events import Buffer

if TYPE_CHECKING:
    from lamina.image import Manifest
    from lamina.serve.records import Records


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


def record_boot(
    records: Records, device: BlockDevice, manifest: Manifest, manifest_id: bytes
) -> BlockDevice:
    """``device`` (a machine's image, just opened) wrapped in a recorder, unless this
    version's profile has seen ``MAX_BOOTS`` boots already."""
    try:
        seen = records.boots(manifest_id)
    except Exception:  # a profile is an optimization: never fail an export over it
        return device
    if seen >= MAX_BOOTS:
        return device

    def done(order: list[int]) -> None:
        with contextlib.suppress(Exception):  # the next boot records again
            records.save_profile(manifest_id, order)

    return RecordingDevice(device, BootRecorder(manifest.chunk_size, manifest.count), done)
