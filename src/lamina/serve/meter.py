"""What one serving process counts for ``/metrics`` (see manager.metrics).

Connections keep their own counters (``stats``: requests, bytes read and written,
errors), bumped on the loop's thread with no lock; the meter adds a connection's to its
export's total when it ends, and a snapshot adds the live ones. Errors are counted by
kind from the log itself: every warning (or worse) event of the ``lamina`` logger, and
every ``request-error``, counts once under its event name (``refused``, ``tls-refused``,
``hang-up``, ...), so a new refusal is counted the day it is logged. Events below the
log level are not seen (the default level, info, sees them all).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, MutableMapping

from lamina.manager.nbdtotals import NbdTotals
from lamina.names import MACHINE_PREFIX

COUNTED = frozenset({"request-error"})  # below warning, counted all the same


class Meter:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # errors are logged from I/O threads too
        self.ended = NbdTotals()

    def record(self, export: str, stats: MutableMapping[str, int]) -> None:
        """A connection ended (on the loop's thread)."""
        self.ended.count(export, stats)

    def opened(self, export: str) -> None:
        """A machine's export was opened (on the loop's thread); its disk counts a boot."""
        if "/" not in export.removeprefix(MACHINE_PREFIX):  # not machine/NAME/seed
            self.ended.boots += 1

    def error(self, kind: str) -> None:
        with self._lock:
            self.ended.errors[kind] = self.ended.errors.get(kind, 0) + 1

    def snapshot(self, live: Iterable[tuple[str, MutableMapping[str, int], str]]) -> NbdTotals:
        """The counters so far, with the live connections' (export, stats, peer) added."""
        with self._lock:
            out = self.ended.ended()
        for export, stats, peer in live:
            out.count(export, stats)
            out.connections += 1
            if export.startswith(MACHINE_PREFIX):
                out.machines[export] = peer
        return out

    def filter(self) -> logging.Filter:
        """A filter for the ``lamina`` logger counting its error events into this meter."""
        return _Counting(self)


class _Counting(logging.Filter):
    def __init__(self, meter: Meter) -> None:
        super().__init__()
        self.meter = meter

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or record.msg in COUNTED:
            self.meter.error(str(record.msg))
        return True
