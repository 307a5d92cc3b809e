"""Making an image version's boot set ready before its machines ask for it.

A version's boot profile (``lamina.image.profile``) names its chunks in the order boots
first read them. When a server process opens a version that has one, a thread of its own
makes those chunks ready in that order (``ImageFiles.hydrate``: checked, decompressed into
the shared file, pages in the page cache), so in a storm most first reads find their chunk
done instead of waiting on a pack read, a hash and a decompression in the request's path.

The processes of one server split the work: process ``index`` of ``count`` takes every
``count``-th chunk of the order from its own index on, so each chunk is decompressed once
(the state bytes are shared; a chunk a reader made ready meanwhile is skipped). A process
that never opens the version leaves its share to the readers, as without a profile.

A chunk that fails (missing, corrupt) is left to the reader that meets it: that reader
gets the error reply and the log line, as it would without the warm-up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final

from lamina import logs
from lamina.errors import LaminaError
from lamina.serve.imagefiles import ImageFiles

# At most this many chunks of a profile are warmed: 3 GiB of 256 KiB chunks, more than a
# desktop's boot reads, and the encoded order (4 bytes a chunk, 48 KiB) fits one message
# between a worker and its parent (64 KiB).
WARM_MAX: Final = 12288


def share(order: Sequence[int], index: int, count: int) -> Sequence[int]:
    """Process ``index`` of ``count``'s part of a profile's order."""
    return order[:WARM_MAX][index :: max(1, count)]


class Warmer:
    """One thread per image version and process; ``stop`` ends them all."""

    def __init__(
        self,
        profile: Callable[[bytes], Sequence[int]],
        index: int = 0,
        count: int = 1,
        log: logging.Logger | None = None,
    ) -> None:
        """``profile``: a version's chunk order (empty when it has none; it may block)."""
        self._profile = profile
        self.index, self.count = index, count
        self._log = log or logging.getLogger(logs.LOGGER)
        self._stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, files: ImageFiles) -> None:
        thread = threading.Thread(target=self._run, args=(files,), name="warm", daemon=True)
        self.threads.append(thread)
        thread.start()

    def stop(self) -> None:
        """End the threads, each after its current chunk (before the files close)."""
        self._stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def _run(self, files: ImageFiles) -> None:
        try:
            order = self._profile(files.manifest_id)
        except Exception:  # a profile is an optimization: readers do without it
            return
        mine = [i for i in share(order, self.index, self.count) if 0 <= i < files.manifest.count]
        if not mine:
            return
        started = time.monotonic()
        made = warm(files, mine, self._stop)
        logs.event(
            self._log,
            "warmed",
            version=files.manifest_id.hex()[:16],
            chunks=made,
            of=len(mine),
            seconds=round(time.monotonic() - started, 2),
        )


def warm(files: ImageFiles, order: Sequence[int], stop: threading.Event) -> int:
    """Make the chunks ready in this order until ``stop``; returns how many it could."""
    made = 0
    for index in order:
        if stop.is_set():
            break
        try:
            files.hydrate((index,))
        except (LaminaError, OSError):
            continue  # the reader meets it and gets its error
        made += 1
    return made
