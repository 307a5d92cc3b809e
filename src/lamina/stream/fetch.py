"""Getting chunks into the cache, on the event loop: reads that miss, and the loop's side
of background hydration (its transfers run on threads, see hydrate.py).

Every fetch, whichever asked for it, is one entry in ``inflight`` (chunk id -> future):
a read waiting for a chunk hydration is already fetching waits for that fetch, and
hydration skips chunks a read is fetching. Each envelope is checked against the chunk
id it was asked for (BLAKE3 of the plaintext) on a worker thread before a byte of it is
written; a mismatch counts as ``corrupt`` and the chunk is fetched again, bypassing HTTP
caches. Nothing here touches the index from another thread: the event loop owns it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

from lamina.errors import CorruptObject, LaminaError, Unreachable
from lamina.image.profile import WINDOW
from lamina.logs import event
from lamina.stream.cache import ChunkFiles
from lamina.stream.rate import Backoff, RateMeter, TokenBucket
from lamina.stream.remote import Remote
from lamina.stream.schedule import Hydration

# While a machine boots (its first connection, for as long as the server records boot
# profiles), hydration fetches only the boot profile; the rest waits for the boot to end
# (the connection closes or the window passes). Measured on the demo VM (TCG, 2 cores,
# a 1 GiB golden image): hydrating the rest during the boot stretched it 2.1x, since the
# VM computes for 3 s without a read once its kernel is loaded.
BOOT_WINDOW = WINDOW
# Persist marks every 200 ms: a crash refetches at most that much of the transfer, and the
# fdatasync it costs stays under 1% of the time.
PERSIST_EVERY = 0.2


@dataclass(frozen=True)
class Claim:
    """What a hydration worker is to do next: fetch ``ids``, or wait, or stop."""

    ids: list[bytes] = field(default_factory=list)
    reserved: int = 0
    wait: float = 0.0
    done: bool = False


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
    ) -> None:
        self.remote = remote
        self.files = files
        self.index = files.index
        self.pool = pool
        self.log = log
        self.bucket = bucket or TokenBucket(None)
        self.inflight: dict[bytes, asyncio.Future[None]] = {}
        self.meter = RateMeter()
        self.counters = Counters()
        self.online: bool | None = None
        self.last_error = ""
        self.boot_started: float | None = None  # a machine's first connection (monotonic)

    # -- bookkeeping -----------------------------------------------------------------

    def set_online(self, online: bool, error: str = "") -> None:
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

    async def _store(self, items: list[tuple[bytes, memoryview]]) -> list[Exception | None]:
        """Verify and write envelopes on a worker thread; mark the good ones cached."""

        loop = asyncio.get_running_loop()
        results: list[Exception | None] = list(
            await loop.run_in_executor(self.pool, self.files.store_many, items)
        )
        for (cid, _), error in zip(items, results, strict=True):
            self._account(cid, error)
        return results

    def _account(self, cid: bytes, error: Exception | None) -> None:
        """Count a chunk that was fetched and written, or (corrupt) log it."""
        if error is None:
            self.index.add(cid)
            self.counters.fetched_chunks += 1
        elif isinstance(error, CorruptObject):
            self.counters.corrupt += 1
            event(self.log, "corrupt-chunk", logging.WARNING, chunk=cid.hex(), error=str(error))

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
                self.set_online(True)
                (error,) = await self._store([(cid, memoryview(envelope))])
                if error is None:
                    self._settle(cid, None)
                    return
                fresh = True
            except Unreachable as exc:
                self.set_online(False, str(exc))
            except LaminaError as exc:  # refused, not found: retrying will not help
                self._settle(cid, exc)
                return
            delay = backoff.next()
            if loop.time() + delay > deadline:
                self._settle(cid, Unreachable(self.last_error or "gave up"))
                return
            self.counters.retries += 1
            await asyncio.sleep(delay)

    # -- background hydration (the loop's side; the transfers run in hydrate.py) -----------

    def boot_begins(self) -> None:
        """A first connection: a machine starts (the NBD catalog calls this)."""
        self.boot_started = time.monotonic()

    def boot_ends(self) -> None:
        """The last connection closed."""
        self.boot_started = None

    def in_boot(self) -> bool:
        started = self.boot_started
        return started is not None and time.monotonic() - started < BOOT_WINDOW

    def claim(self, hydration: Hydration, limit: int) -> Claim:
        """The next chunks for a hydration worker, or how long it should wait first."""
        if hydration.done:
            return Claim(done=True)
        booting = self.in_boot()
        if booting and hydration.profile_done:
            return Claim(wait=0.25)  # look again soon: the boot may end any moment
        now = time.monotonic()
        wait = self.bucket.delay(now)
        if wait > 0:
            return Claim(wait=wait)
        ids = hydration.take(limit, busy=self.inflight, profile_only=booting)
        if not ids:
            return Claim(wait=0.05)  # what is left is on its way elsewhere
        for cid in ids:
            self._register(cid)
        # Reserve the plaintext size up front so that parallel workers pace each other;
        # ``delivered`` settles the difference with what actually came.
        reserved = sum(self.files.manifest.chunk_len(self.index.positions[c][0]) for c in ids)
        self.bucket.charge(reserved, now)
        return Claim(ids=ids, reserved=reserved)

    def delivered(self, claim: Claim, received: int, errors: list[Exception | None]) -> None:
        """A worker wrote (or failed to verify) the chunks of ``claim``."""
        self._received(received, claim.reserved)
        self.set_online(True)
        for cid, error in zip(claim.ids, errors, strict=True):
            self._account(cid, error)
            self._settle(cid, error)
        if any(errors):
            self.counters.retries += 1

    def failed(self, claim: Claim, error: Exception) -> None:
        """A worker's request failed as a whole (the manager away, a refusal)."""
        self.bucket.charge(-claim.reserved, time.monotonic())
        if isinstance(error, Unreachable):
            self.set_online(False, str(error))
        else:
            event(self.log, "hydration-error", logging.WARNING, error=str(error))
        self.counters.retries += 1
        for cid in claim.ids:
            self._settle(cid, error)

    def hydrated(self, seconds: float) -> None:
        event(
            self.log,
            "hydrated",
            seconds=round(seconds, 3),
            bytes=self.index.data_bytes,
            corrupt=self.counters.corrupt,
        )

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
