"""Whether a buffered write would only copy into the page cache.

A write into a delta file is a copy into page-cache pages (ext4 allocates the blocks at
writeback, not at ``pwrite``) until the kernel finds too much memory dirty: past the
"free run" level, half-way between ``vm.dirty_background_*`` (where writeback starts)
and ``vm.dirty_*``, it makes writers sleep in ``balance_dirty_pages`` until writeback
catches up. Below the background level it throttles nobody, with a margin of half the
distance between the two (5% of memory by default), so the block server may apply such
writes on its event loop: one turn of the loop for a write rather than three (the
hand-over to the writer thread and back cost 5-8 ms a write in a 128-machine storm,
measured). Half the background level was tried first: a 128-machine storm leaves up to
1.9 GiB dirty (this host's level is 2.3 GiB), and past 1.2 GiB its writes went back to
the thread.

The level is read from ``/proc/meminfo`` at most every ``EVERY`` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

EVERY: Final = 0.1  # seconds between reads of /proc/meminfo (~20 us each)
_VM: Final = Path("/proc/sys/vm")


def calm(meminfo: dict[str, int], background_bytes: int, background_ratio: int) -> bool:
    """True when dirty and writeback pages are below the background level.

    ``meminfo``: /proc/meminfo's figures in bytes; the background level is
    ``background_bytes`` when set, else ``background_ratio`` percent of the memory the
    kernel could fill with dirty pages (MemAvailable stands for it)."""
    level = background_bytes or meminfo.get("MemAvailable", 0) * background_ratio // 100
    return meminfo.get("Dirty", 0) + meminfo.get("Writeback", 0) < level


def read_meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (its figures are KiB)."""
    out: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[name] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return out


def _vm(name: str) -> int:
    try:
        return int((_VM / name).read_text())
    except (OSError, ValueError):
        return 0


class DirtyGauge:
    """``calm()`` for this host, re-read at most every ``EVERY`` seconds."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        meminfo: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        """``meminfo``: what reads /proc/meminfo (``read_meminfo``)."""
        self._clock, self._meminfo = clock, meminfo
        self._background = (_vm("dirty_background_bytes"), _vm("dirty_background_ratio") or 10)
        self._at = -EVERY
        self._calm = False

    def calm(self) -> bool:
        now = self._clock()
        if now - self._at >= EVERY:
            self._at = now
            try:
                info = (self._meminfo or read_meminfo)()  # looked up now: tests replace it
                self._calm = calm(info, *self._background)
            except OSError:
                self._calm = False  # no /proc: every write goes to the writer thread
        return self._calm
