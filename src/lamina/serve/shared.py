"""What the fast connections of one serving process share: the event loop, the thread
pool, the one writer thread, the scratch buffer read data goes through, and whether a
write may be applied on the loop (``may_write_now``)."""

from __future__ import annotations

import asyncio
import logging
import mmap
import queue
import resource
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from lamina.nbd.limits import Budget
from lamina.serve.meter import Meter
from lamina.serve.pagecache import DirtyGauge

if TYPE_CHECKING:
    from lamina.serve.fastpath import FastConnection

ARENA = 4 << 20  # read data of one batch, reused once the batch is sent
# A write applied on the loop that slept (a voluntary context switch: it waited for a
# page, a lock, writeback) and took longer than SLOW sends the process's writes back to
# the writer thread for QUIET seconds. A copy into the page cache takes 10-60 us; time
# alone would not do: on cores the clients share, a worker is often preempted in a write
# (wall time, not waiting), and counting that sent writes back to the thread needlessly.
SLOW = 0.002
QUIET = 1.0


def _sleeps() -> int:
    """Voluntary context switches of this thread so far: each one a wait."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


Done = Callable[[BaseException | None], None]
Results = list[tuple[Done, BaseException | None]]
Job = tuple[bool, Callable[[], object], Done]  # (on the pool?, what, then on the loop)


class Writer:
    """The one thread of a process that applies writes, every device's in the order they
    came (a delta has one writer); what waits for the disk (fdatasync, closing a device)
    goes on to the pool once the writes before it are done, so a flush never holds up
    other machines' writes. Completions come back to the loop in batches.

    One thread instead of a pool, handed the jobs of a whole turn of the event loop at
    once: with a pool, each write woke a thread and the threads fought over the GIL
    (futex waits were 9% of a storm's samples, 10 us more CPU a write). The batch goes
    through a ``SimpleQueue`` (a C lock): with a ``threading.Condition``, the notify and
    its lock took 10% of a worker's GIL-holding samples in a 32-machine storm."""

    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        self._batch: list[Job] = []  # given during this turn of the loop
        self._queue: queue.SimpleQueue[list[Job] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.writes = 0  # given to the thread and not done yet

    def write(self, job: Callable[[], object], done: Done) -> None:
        """Run ``job`` on the writer thread, after every job given before it."""
        self.writes += 1

        def written(error: BaseException | None) -> None:
            self.writes -= 1
            done(error)

        self._submit(False, job, written)

    def after(self, job: Callable[[], object], done: Done) -> None:
        """Run ``job`` on the pool once the writes given before it are done."""
        self._submit(True, job, done)

    def _submit(self, pooled: bool, job: Callable[[], object], done: Done) -> None:
        if not self._batch:
            self._shared.loop.call_soon(self._kick)
        self._batch.append((pooled, job, done))

    def _kick(self) -> None:
        batch, self._batch = self._batch, []
        self._queue.put(batch)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        get, empty = self._queue.get, self._queue.empty
        while True:
            jobs = get()
            if jobs is None:
                return
            stop = False
            while not empty():  # batches that came meanwhile: applied together, in order
                more = get()
                if more is None:
                    stop = True
                    break
                jobs += more
            self._apply(jobs)
            if stop:
                return

    def _apply(self, jobs: list[Job]) -> None:
        results: Results = []
        for pooled, job, done in jobs:
            if pooled:
                self._shared.pool.submit(self._pooled, job, done)
                continue
            error: BaseException | None = None
            try:
                job()
            except Exception as exc:
                error = exc
            results.append((done, error))
        if results:
            self._shared.post(results)

    def _pooled(self, job: Callable[[], object], done: Done) -> None:
        error: BaseException | None = None
        try:
            job()
        except Exception as exc:
            error = exc
        self._shared.post([(done, error)])

    def stop(self) -> None:
        """Finish what was given, then end the thread (from a thread: the loop waits)."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()


class Shared:
    """What the fast connections of one process share: the loop, the thread pool, the
    writer thread, the scratch buffer for read data, the budget of unsent replies."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pool: Executor,
        log: logging.Logger,
        budget: Budget | None = None,
    ) -> None:
        self.loop = loop
        self.pool = pool
        self.log = log
        self.budget = budget or Budget()
        # (a private anonymous mapping: only the pages reads have used count in the RSS)
        self.arena = memoryview(mmap.mmap(-1, ARENA, flags=mmap.MAP_PRIVATE))
        self.connections: set[FastConnection] = set()
        self.on_close: Callable[[], None] | None = None  # a connection ended
        self.meter = Meter()  # what the connections of this process did (/metrics)
        self.writer = Writer(self)
        self._dirty: set[FastConnection] = set()
        self.gauge = DirtyGauge(loop.time)
        self._quiet_until = 0.0

    def may_write_now(self) -> bool:
        """Whether a write may be applied on the loop: it would only copy into the page
        cache (``pagecache``), no write waits for the writer thread (a delta has one
        writer, and the thread may hold its lock), and no recent one was slow."""
        return (
            not self.writer.writes and self.loop.time() >= self._quiet_until and self.gauge.calm()
        )

    def writing_now(self) -> tuple[float, int]:
        """A write starts on the loop: what ``wrote_now`` is given when it ends."""
        return time.perf_counter(), _sleeps()

    def wrote_now(self, started: tuple[float, int]) -> None:
        """A write applied on the loop ended."""
        if time.perf_counter() - started[0] > SLOW and _sleeps() > started[1]:
            self._quiet_until = self.loop.time() + QUIET

    def retire(self, conn: FastConnection) -> None:
        """A connection ended: its counters go to the meter."""
        if conn in self.connections:
            self.connections.discard(conn)
            self.meter.record(conn.export.name, conn.stats)

    def post(self, results: Results) -> None:
        """From a thread: run these completions on the loop, then send their replies."""
        self.loop.call_soon_threadsafe(self._deliver, results)

    def _deliver(self, results: Results) -> None:
        for done, error in results:
            done(error)
        self.flush_dirty()

    def mark(self, conn: FastConnection) -> None:
        self._dirty.add(conn)

    def flush_dirty(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for conn in dirty:
            conn.flush()
