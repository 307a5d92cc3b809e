"""Writers and gc of one bucket shared by several homes, kept apart by leases in the
database those homes share (the file lock of one home cannot reach the others).

- A writer (an import, a commit, a rebase) holds an *import lease*: a row with a heartbeat,
  refreshed every third of ``lease_seconds`` by a thread. A lease not refreshed for
  ``lease_seconds`` is dead (its process was killed); a writer whose lease died under it
  fails at ``flush`` instead of committing a manifest gc may have stopped protecting.
- gc holds the one *gc lease* (a second gc anywhere is refused with Conflict), and never
  deletes a pack at once: it *condemns* it (a row with the time), and deletes it at a later
  run once (1) ``grace`` has passed (longer than a lease), (2) no import lease is live that
  started before the condemnation had settled, and (3) a re-check against the live set
  finds no chunk still needed only there (else the pack is pardoned).
- Every writer reads the condemned packs when its lease starts and at each heartbeat, and
  treats a chunk found only in a condemned pack as absent: it uploads it again, so what it
  commits never depends on a pack about to go.

An import that started before a pack was condemned may have reused its chunks; (2) keeps
the pack until that import is over, and (3) keeps it for good if the import's manifest
needs it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Final, Protocol

from lamina.errors import StoreError

# A writer killed without a word stops gc's deletions for at most this long.
LEASE_SECONDS: Final = 60.0
# The time a condemnation takes to be seen by writers starting after it: a lease that
# started more than this after a pack was condemned read the condemned set.
SETTLE_SECONDS: Final = 10.0
IMPORT: Final = "import"
GC: Final = "gc"


def holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Leases(Protocol):
    """The database's side (``lamina.manager.store_leases``)."""

    lease_seconds: float
    grace: float  # condemned packs wait at least this long (> lease_seconds)

    def begin(self, kind: str) -> str:
        """A new live lease's id (``kind`` gc: Conflict while another gc's is live)."""
        ...

    def beat(self, lease: str) -> bool:
        """Refresh a lease; False when it is gone (it died: expired and cleared)."""
        ...

    def end(self, lease: str) -> None: ...

    def condemned(self) -> set[str]: ...

    def condemn(self, names: Iterable[str]) -> None: ...

    def deletable(self) -> list[str]:
        """Condemned packs past the grace period with no live import lease older than
        their condemnation (plus SETTLE_SECONDS)."""
        ...

    def pardon(self, names: Iterable[str]) -> None:
        """Forget condemnations: packs deleted, or found still needed."""
        ...


class HeldLease:
    """A lease and the thread that keeps it alive; ``lost`` once a beat found it gone."""

    def __init__(
        self, leases: Leases, kind: str, on_beat: Iterable[Callable[[], None]] = ()
    ) -> None:
        self.leases = leases
        self.id = leases.begin(kind)
        self.lost = False
        self._stop = threading.Event()
        self._callbacks = list(on_beat)
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.leases.lease_seconds / 3):
            try:
                alive = self.leases.beat(self.id)
            except Exception:  # the database away for a moment: try again next beat
                continue
            if not alive:
                self.lost = True
                return
            for callback in self._callbacks:
                callback()

    def check(self) -> None:
        if self.lost:
            raise StoreError(
                "this writer's store lease expired (its heartbeats stopped for "
                f"{self.leases.lease_seconds:.0f} s): nothing was committed, run it again"
            )

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):  # it expires on its own
            self.leases.end(self.id)


@contextmanager
def held(leases: Leases, kind: str, *on_beat: Callable[[], None]) -> Iterator[HeldLease]:
    lease = HeldLease(leases, kind, on_beat)
    try:
        yield lease
    finally:
        lease.release()
