"""Getting chunks into the cache: reads that miss, and background hydration (asyncio).

Every fetch, whichever asked for it, is one entry in ``inflight`` (chunk id -> future):
a read waiting for a chunk hydration is already fetching waits for that fetch, and
hydration skips chunks a read is fetching. Each envelope is checked against the chunk
id it was asked for (BLAKE3 of the plaintext) on a worker thread before a byte of it is
written; a mismatch counts as ``corrupt`` and the chunk is fetched again, bypassing HTTP
caches. Nothing here touches the index from another thread: the event loop owns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass

from lamina.errors import CorruptObject, LaminaError
from lamina.logs import event
from lamina.store import codec
from lamina.stream.cache import ChunkFiles
from lamina.stream.rate import Backoff, RateMeter, TokenBucket
from lamina.stream.remote import Remote, Unreachable
from lamina.stream.schedule import Hydration

# 16 chunks of 256 KiB per hydration request: one request per 4 MiB keeps the manager's
# per-request cost (token check, routing) under 5% of the transfer.
BATCH = 16
# Persist marks every 200 ms: a crash refetches at most that much of the transfer, and the
# fdatasync it costs stays under 1% of the time.
PERSIST_EVERY = 0.2


@dataclass
class Counters:
    fetched_chunks: int = 0
    demand_chunks: int = 0
    corrupt: int = 0
    retries: int = 0


class Fetcher:
    def __init__(
        self,
        remote: Remote,
        files: ChunkFiles,
        pool: Executor,
        log: logging.Logger,
        *,
        bucket: TokenBucket | None = None,
        workers: int = 4,
    ) -> None:
        self.remote = remote
        self.files = files
        self.index = files.index
        self.pool = pool
        self.log = log
        self.bucket = bucket or TokenBucket(None)
        self.workers = workers
        # With a limit, requests of about a quarter second's worth keep the pace smooth.
        chunk = files.manifest.chunk_size
        rate = self.bucket.rate
        self.batch = BATCH if rate is None else max(1, min(BATCH, int(rate / 4 / chunk)))
        self.inflight: dict[bytes, asyncio.Future[None]] = {}
        self.meter = RateMeter()
        self.counters = Counters()
        self.online: bool | None = None
        self.last_error = ""
        self.hydration: Hydration | None = None
        self.hydrated_at: float | None = None
        self._changed = asyncio.Event()

    # -- bookkeeping -----------------------------------------------------------------

    def _state(self, online: bool, error: str = "") -> None:
        if online != self.online:
            event(
                self.log,
                "online" if online else "offline",
                logging.INFO if online else logging.WARNING,
                error=error or None,
            )
        self.online = online
        self.last_error = error

    def _register(self, cid: bytes) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # no warnings
        self.inflight[cid] = future
        return future

    def _settle(self, cid: bytes, error: BaseException | None) -> None:
        future = self.inflight.pop(cid, None)
        if future is not None and not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
        self._changed.set()

    async def _store(self, items: list[tuple[bytes, memoryview]]) -> list[Exception | None]:
        """Verify and write envelopes on a worker thread; mark the good ones cached."""

        def work() -> list[Exception | None]:
            results: list[Exception | None] = []
            for cid, envelope in items:
                try:
                    self.files.store(cid, envelope)
                    results.append(None)
                except (CorruptObject, OSError) as exc:
                    results.append(exc)
            return results

        results = await asyncio.get_running_loop().run_in_executor(self.pool, work)
        for (cid, _), error in zip(items, results, strict=True):
            if error is None:
                self.index.add(cid)
                self.counters.fetched_chunks += 1
            elif isinstance(error, CorruptObject):
                self.counters.corrupt += 1
                event(self.log, "corrupt-chunk", logging.WARNING, chunk=cid.hex(), error=str(error))
        return results

    def _received(self, nbytes: int, reserved: int = 0) -> None:
        now = time.monotonic()
        self.bucket.charge(nbytes - reserved, now)
        self.meter.add(nbytes, now)

    # -- reads that miss the cache ------------------------------------------------------

    async def ensure_range(self, offset: int, length: int, timeout: float) -> None:
        """Return once ``[offset, offset+length)`` reads from the cache; OSError(EIO)
        when that takes longer than ``timeout`` or the manager refuses."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            missing = self.index.missing(offset, length)
            if not missing:
                return
            waits = [self.inflight.get(cid) or self._demand(cid, deadline) for cid in missing]
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise OSError(errno.EIO, self._timeout_message(timeout))
            done, pending = await asyncio.wait(waits, timeout=remaining)
            if pending:
                raise OSError(errno.EIO, self._timeout_message(timeout))
            for future in done:
                error = future.exception()
                if isinstance(error, LaminaError) and not isinstance(error, Unreachable):
                    raise OSError(errno.EIO, str(error))

    def _timeout_message(self, timeout: float) -> str:
        why = f" ({self.last_error})" if self.last_error else ""
        return f"chunk not cached and not fetched within {timeout:g} s{why}"

    def _demand(self, cid: bytes, deadline: float) -> asyncio.Future[None]:
        future = self._register(cid)
        self.counters.demand_chunks += 1
        asyncio.get_running_loop().create_task(self._fetch_one(cid, deadline))
        return future

    async def _fetch_one(self, cid: bytes, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff()
        fresh = False
        while True:
            try:
                envelope = await self.remote.chunk(cid, fresh=fresh)
                self._received(len(envelope))
                self._state(True)
                (error,) = await self._store([(cid, memoryview(envelope))])
                if error is None:
                    self._settle(cid, None)
                    return
                fresh = True
            except Unreachable as exc:
                self._state(False, str(exc))
            except LaminaError as exc:  # refused, not found: retrying will not help
                self._settle(cid, exc)
                return
            delay = backoff.next()
            if loop.time() + delay > deadline:
                self._settle(cid, Unreachable(self.last_error or "gave up"))
                return
            self.counters.retries += 1
            await asyncio.sleep(delay)

    # -- background hydration ------------------------------------------------------------

    async def hydrate(self, hydration: Hydration) -> None:
        """Fetch every missing chunk, boot profile first; returns when all are cached."""
        self.hydration = hydration
        started = time.monotonic()
        await asyncio.gather(*(self._worker(hydration) for _ in range(self.workers)))
        self.hydrated_at = time.monotonic()
        event(
            self.log,
            "hydrated",
            seconds=round(self.hydrated_at - started, 3),
            bytes=self.index.data_bytes,
            corrupt=self.counters.corrupt,
        )

    async def _worker(self, hydration: Hydration) -> None:
        backoff = Backoff(cap=5.0)
        fresh: set[bytes] = set()
        while not hydration.done:
            wait = self.bucket.delay(time.monotonic())
            if wait > 0:
                await asyncio.sleep(wait)
                continue  # another worker may have taken the tokens meanwhile
            ids = hydration.take(self.batch, busy=self.inflight)
            if not ids:
                # What is left is on its way elsewhere: wait for news, then look again.
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 1.0)
                continue
            for cid in ids:
                self._register(cid)
            # Reserve the plaintext size up front so that parallel workers pace each other;
            # ``_received`` settles the difference with what actually came.
            reserved = sum(self.files.manifest.chunk_len(self.index.positions[c][0]) for c in ids)
            self.bucket.charge(reserved, time.monotonic())
            try:
                failed = await self._fetch_batch(
                    ids, fresh=bool(fresh & set(ids)), reserved=reserved
                )
                backoff.reset()
            except Unreachable as exc:
                self._state(False, str(exc))
                self.bucket.charge(-reserved, time.monotonic())
                failed = {cid: exc for cid in ids}
            except LaminaError as exc:
                event(self.log, "hydration-error", logging.WARNING, error=str(exc))
                self.bucket.charge(-reserved, time.monotonic())
                failed = {cid: exc for cid in ids}
            for cid in ids:
                self._settle(cid, failed.get(cid))
            fresh = (fresh - set(ids)) | {
                c for c, e in failed.items() if isinstance(e, CorruptObject)
            }
            if failed:
                self.counters.retries += 1
                await asyncio.sleep(backoff.next())

    async def _fetch_batch(
        self, ids: list[bytes], *, fresh: bool, reserved: int
    ) -> dict[bytes, Exception]:
        """Fetch ``ids`` in one request; returns the ones that failed, with why."""
        if len(ids) == 1:
            body = await self.remote.chunk(ids[0], fresh=fresh)
        else:
            body = await self.remote.chunks(ids, fresh=fresh)
        self._received(len(body), reserved)
        self._state(True)
        view = memoryview(body)
        items: list[tuple[bytes, memoryview]] = []
        failed: dict[bytes, Exception] = {}
        pos = 0
        for cid in ids:
            try:
                head = codec.parse_header(view[pos:], "chunk batch")
            except CorruptObject as exc:
                # Framing is lost: the rest of the body cannot be trusted either.
                self.counters.corrupt += 1
                failed |= {c: exc for c in ids if c not in {i for i, _ in items}}
                break
            items.append((cid, view[pos : pos + head.size]))
            pos += head.size
        results = await self._store(items)
        for (cid, _), error in zip(items, results, strict=True):
            if error is not None:
                failed[cid] = error
        return failed

    # -- durability ----------------------------------------------------------------------

    async def persist(self) -> None:
        positions = self.index.take_pending()
        if positions:
            await asyncio.get_running_loop().run_in_executor(
                self.pool, self.files.persist, positions
            )

    async def persist_loop(self) -> None:
        while True:
            await asyncio.sleep(PERSIST_EVERY)
            await self.persist()
