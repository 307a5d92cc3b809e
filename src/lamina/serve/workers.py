"""NBD worker processes: one per core, fed connections by the parent.

    parent (lamina serve)              worker i (python -m lamina.serve.workers)
    HTTP manager, accepts NBD  --fd-->  handshake, fast path, its machines' deltas
    routes hand-overs, restarts  <--    opened/closed machine exports, its load

One Python event loop was the ceiling of a boot storm (988 MiB/s for 32 machines where
nbd-server forks a process per client): each worker is a loop of its own with its own
threads, and the parent's loop keeps only the manager and ``accept``, so the API answers
whatever the block traffic. The parent hands each new connection to the worker with the
fewest; a machine's export can be open in one worker only (its delta has one writer), so
a worker that finds a machine's delta held by a sibling passes the connection back with
its handshake state, and the parent forwards it to the sibling it knows holds it (or back
to the sender, which then answers the GO itself: the holder was not a worker, or has just
let go). Workers share image data through ``ImageFiles`` (the page cache), not memory.

A worker that dies is replaced; its clients reconnect (as qemu does with
``reconnect-delay``) to another worker, and the kernel has already released its deltas'
locks. Parent and worker talk over a ``channel.Channel``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from lamina import logs
from lamina._tuning import tune_process
from lamina.errors import LaminaError
from lamina.home import Home
from lamina.manager.nbdtotals import NbdTotals
from lamina.serve.channel import Channel
from lamina.serve.meter import Meter
from lamina.serve.records import RecordsServer
from lamina.store.location import StoreSettings

if TYPE_CHECKING:
    from lamina.serve.handshake import NbdService
    from lamina.serve.options import ServeOptions

_LOAD_EVERY: Final = 0.05  # seconds between a worker's load reports, at most
_METRICS_EVERY: Final = 1.0  # seconds between a worker's counters (a scrape is 15 s or more)
_RESPAWN_AFTER: Final = 0.5
_CRASH_LOOP: Final = 5  # deaths in a row within _YOUNG seconds of their start: give up
_YOUNG: Final = 5.0
_STOP_WITHIN: Final = 20.0  # seconds a worker's shutdown may take (see _exit_if_stuck)


# -- the parent's side ------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    channel: Channel
    started: float
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    load: int = 0  # connections, as last reported
    sent: int = 0  # connections handed to it since that report
    # its connections by client address (the parent admits them: see _accept)
    addresses: Counter[str] = field(default_factory=Counter)
    totals: NbdTotals = field(default_factory=NbdTotals)  # its counters, as last reported


class WorkerPool:
    """The parent's side: spawns the workers, hands them connections, routes hand-overs
    between them, replaces the ones that die."""

    def __init__(self, home: Home, options: ServeOptions, log: logging.Logger) -> None:
        self.home = home
        self.count = options.worker_count
        # the workers' database lookups: as many threads as their handshake threads
        self.records = RecordsServer(home, threads=2 * self.count)
        self.log = log
        from lamina.serve.options import serve_limits

        limits = serve_limits(options)
        self._config = {
            "workers": self.count,
            "home": str(home.root),
            "database_url": home.database_url,
            # the chunk store's settings as the parent read them (see "limits")
            "store": dataclasses.asdict(StoreSettings.load()),
            "io_threads": options.io_threads,
            "log_level": options.log_level,
            # what a worker needs to set up TLS as its parent did (see serve.tls)
            "tls": options.tls,
            "nbd": options.nbd,
            "http": options.http,
            "tls_names": options.tls_names,
            "https_cert": str(options.https_cert) if options.https_cert else None,
            "https_key": str(options.https_key) if options.https_key else None,
            # what clients may cost, as the parent was told or read from the environment
            # (a worker that read its settings itself would import pydantic for it)
            "limits": dataclasses.asdict(limits),
            "server_name": options.server_name,
        }
        self.workers: dict[int, _Worker] = {}
        self.per_address = limits.connections_per_address
        self.owners: dict[str, int] = {}  # machine export -> the worker holding its delta
        # delta copies asked of workers (``copy_delta``): request id -> (worker, answer)
        self._copies: dict[int, tuple[int, asyncio.Future[bool]]] = {}
        self._next_copy = 0
        self._stopping = False
        self._deaths: list[float] = []
        self.failed = asyncio.Event()  # workers keep dying at start: stop serving
        self._listener: socket.socket | None = None
        self.retired = NbdTotals()  # the counters of workers that have gone
        self.meter = Meter()  # this process's errors (a worker that exited, ...)
        self._counting = self.meter.filter()

    def totals(self) -> NbdTotals:
        """The NBD counters of every worker, as last reported (at most _METRICS_EVERY
        old), with those of workers that died."""
        out = self.meter.snapshot([])
        out.add(self.retired)
        for worker in self.workers.values():
            out.add(worker.totals)
        return out

    async def start(self, listener: socket.socket, timeout: float = 60.0) -> None:
        for i in range(self.count):
            self._spawn(i)
        self._listener = listener
        self.log.addFilter(self._counting)
        listener.setblocking(False)
        asyncio.get_running_loop().add_reader(listener.fileno(), self._accept)
        await asyncio.wait_for(
            asyncio.gather(*(w.ready.wait() for w in self.workers.values())), timeout
        )

    def _spawn(self, index: int) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = json.dumps({**self._config, "index": index, "channel": child.fileno()})
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lamina.serve.workers", config],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            child.close()
        channel = Channel(
            parent,
            lambda message, fds: self._message(index, message, fds),
            lambda: self._lost(index),
        )
        self.workers[index] = _Worker(index, proc, channel, time.monotonic())

    # -- connections -----------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: drop this burst, keep serving
                logs.event(self.log, "accept-failed", logging.WARNING, error=str(exc))
                return
            address = peer[0] if isinstance(peer, tuple) else str(peer)
            if sum(w.addresses[address] for w in self.workers.values()) >= self.per_address:
                client = f"{address}:{peer[1]}" if isinstance(peer, tuple) else address
                logs.event(self.log, "too-many-connections", logging.WARNING, client=client)
                sock.close()
                continue
            self._dispatch(sock.detach(), address)

    def _dispatch(self, fd: int, address: str) -> None:
        live = [w for w in self.workers.values() if not w.channel.closed]
        if not live:
            os.close(fd)
            return
        worker = min(live, key=lambda w: (w.load + w.sent, w.index))
        worker.sent += 1
        worker.addresses[address] += 1
        worker.channel.send(("conn", None), fd)

    def _message(self, index: int, message: tuple[Any, ...], fds: list[int]) -> None:
        kind = message[0]
        worker = self.workers.get(index)
        if kind == "hand-over" and fds:
            if worker is not None:
                _leave(worker.addresses, message[3])
            self._route(index, message[1], message[2], fds[0], message[3])
            return
        for fd in fds:  # no other message carries one
            os.close(fd)
        if worker is None:
            return
        if kind == "db":
            self.records.call(worker.channel.send, *message[1:])
        elif kind == "ready":
            worker.ready.set()
            for export in self.owners:  # what its siblings hold (see ``_held``)
                worker.channel.send(("held", export, True))
        elif kind == "load":
            worker.load, worker.sent = message[1], 0
        elif kind == "metrics":
            worker.totals = NbdTotals.from_wire(message[1])
        elif kind == "opened":
            self.owners[message[1]] = index
            self._held(index, message[1], True)
        elif kind == "closed" and self.owners.get(message[1]) == index:
            del self.owners[message[1]]
            self._held(index, message[1], False)
        elif kind == "left":
            _leave(worker.addresses, message[1])
        elif kind == "copied":
            self._copied(message[1], message[2], message[3])

    def _held(self, holder: int, export: str, held: bool) -> None:
        """Tell the other workers that ``holder`` has machine ``export`` open (or no more):
        their NBD_OPT_INFO then describes it as the holder's GO would, read-only."""
        for w in self.workers.values():
            if w.index != holder and not w.channel.closed:
                w.channel.send(("held", export, held))

    def _route(self, sender: int, export: str, state: bytes, fd: int, address: str) -> None:
        """A connection whose machine a sibling holds: to the worker known to hold it, or
        (not known yet: its "opened" may still be on the way) to the next one in turn;
        the workers stop handing it on once each has tried."""
        owner = self.owners.get(export)
        target = self.workers.get(owner) if owner is not None and owner != sender else None
        if target is None or target.channel.closed:
            live = sorted(i for i, w in self.workers.items() if not w.channel.closed)
            after = [i for i in live if i > sender] + [i for i in live if i <= sender]
            target = self.workers[after[0]] if after else None
        if target is None:
            os.close(fd)
            return
        target.sent += 1
        target.addresses[address] += 1
        target.channel.send(("conn", state), fd)

    async def copy_delta(self, export: str, src: Path, dest: Path) -> bool:
        """Have the worker holding ``export`` copy its delta at a flush point (see
        ``NbdService.copy_delta``); False when no worker has it open."""
        owner = self.owners.get(export)
        worker = self.workers.get(owner) if owner is not None else None
        if worker is None or worker.channel.closed:
            return False
        self._next_copy += 1
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._copies[self._next_copy] = (worker.index, answer)
        worker.channel.send(("copy", self._next_copy, export, str(src), str(dest)))
        return await answer

    def _copied(self, request: int, copied: bool, error: str | None) -> None:
        _index, answer = self._copies.pop(request, (0, None))
        if answer is not None and not answer.done():
            if error is not None:
                answer.set_exception(LaminaError(error))
            else:
                answer.set_result(copied)

    def _lost(self, index: int) -> None:
        """A worker's channel ended: it is exiting (or gone); wait for it, replace it."""
        worker = self.workers.get(index)
        if worker is None or self._stopping:
            return
        code = worker.proc.poll()
        if code is None:
            asyncio.get_running_loop().call_later(0.05, self._lost, index)
            return
        for export in [k for k, v in self.owners.items() if v == index]:
            del self.owners[export]
            self._held(index, export, False)
        for request, (holder, _answer) in list(self._copies.items()):
            if holder == index:  # its deltas' locks are free now: copied as closed ones
                self._copied(request, False, None)
        self.retired.add(worker.totals.ended())
        worker.totals = NbdTotals()
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < 60] + [now]
        logs.event(self.log, "worker-exited", logging.ERROR, worker=index, code=code)
        young = now - worker.started < _YOUNG
        if young and len(self._deaths) >= _CRASH_LOOP:
            self.failed.set()
            return
        asyncio.get_running_loop().call_later(_RESPAWN_AFTER, self._respawn, index)

    def _respawn(self, index: int) -> None:
        if not self._stopping:
            self._spawn(index)

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting; each worker drops its clients and flushes its deltas."""
        self._stopping = True
        self.log.removeFilter(self._counting)
        if self._listener is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._listener.fileno())
        for w in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for w in self.workers.values():
            while w.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
            w.channel.close()
        self.records.close()


def _leave(addresses: Counter[str], address: str) -> None:
    addresses[address] -= 1
    if addresses[address] <= 0:
        del addresses[address]


# -- the worker's side ------------------------------------------------------------------


class _ChannelHub:
    """What a worker tells its parent."""

    def __init__(self, channel_fd: int) -> None:
        self.channel: Channel | None = None
        self._fd = channel_fd
        self._load_due = False
        self.load: Callable[[], int] = lambda: 0

    def hand_over(self, export: str, fd: int, state: bytes, address: str) -> None:
        assert self.channel is not None
        self.channel.send(("hand-over", export, state, address), fd)

    def left(self, address: str) -> None:
        if self.channel is not None:
            self.channel.send(("left", address))

    def opened(self, export: str) -> None:
        if self.channel is not None:
            self.channel.send(("opened", export))

    def closed(self, export: str) -> None:
        if self.channel is not None:
            self.channel.send(("closed", export))

    def load_changed(self) -> None:
        if not self._load_due:
            self._load_due = True
            asyncio.get_running_loop().call_later(_LOAD_EVERY, self._report)

    def _report(self) -> None:
        self._load_due = False
        if self.channel is not None:
            self.channel.send(("load", self.load()))

    def report_totals(self, totals: Callable[[], NbdTotals]) -> None:
        """Send this worker's counters now and every _METRICS_EVERY seconds."""
        if self.channel is None or self.channel.closed:
            return
        self.channel.send(("metrics", totals().to_wire()))
        asyncio.get_running_loop().call_later(_METRICS_EVERY, self.report_totals, totals)


class _Tagged(logging.Filter):
    """Every event of a worker names it (which worker served a connection, in the log)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            fields.setdefault("worker", self.index)
        return True


async def _worker(config: dict[str, Any]) -> None:
    from lamina.serve.handshake import NbdService
    from lamina.serve.records import ParentRecords

    log = logs.setup(config["log_level"])
    log.addFilter(_Tagged(config["index"]))
    # (no database here: what serving needs of it, the parent answers; see serve.records)
    home = Home(
        Path(config["home"]),
        config["database_url"],
        store_settings=StoreSettings(**config["store"]),
    )
    hub = _ChannelHub(config["channel"])

    def send(msg: tuple[Any, ...]) -> None:
        channel.send(msg)  # (made below: it hands answers to ``records``)

    records = ParentRecords(send, asyncio.get_running_loop())
    service = NbdService(
        home,
        log,
        io_threads=config["io_threads"],
        hub=hub,
        options=_options(config),
        siblings=config["workers"] - 1,
        records=records,
        index=config["index"],
    )
    hub.load = lambda: len(service.protocols) + len(service.shared.connections)
    log.addFilter(service.shared.meter.filter())
    stop = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    def message(msg: tuple[Any, ...], fds: list[int]) -> None:
        if msg[0] == "copy":
            task = asyncio.ensure_future(_copy(service, channel, *msg[1:]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            return
        if msg[0] == "db-answer":
            records.answer(msg[1], msg[2])
            return
        if msg[0] == "held":
            service.catalog.held_elsewhere(msg[1], msg[2])
            return
        if msg[0] != "conn" or not fds:
            for fd in fds:
                os.close(fd)
            return
        task = asyncio.ensure_future(service.accept(socket.socket(fileno=fds[0]), msg[1]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        hub.load_changed()

    def lost() -> None:
        records.lost()
        stop.set()

    channel = Channel(socket.socket(fileno=config["channel"]), message, lost)
    hub.channel = channel
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    service.on_change = hub.load_changed
    service.shared.on_close = hub.load_changed
    channel.send(("ready",))
    hub.report_totals(service.totals)
    # What is alive now (modules, the database layer: about 95,000 objects) lives as long
    # as the worker: out of the collector's reach, a full collection stops the loop for
    # a few ms instead of about 60.
    gc.freeze()
    logs.event(log, "worker-started", pid=os.getpid())
    try:
        await stop.wait()
    finally:
        _exit_if_stuck(log, _STOP_WITHIN)
        await service.close()
        channel.close()
        logs.event(log, "worker-stopped", **service.counters())


def _exit_if_stuck(log: logging.Logger, seconds: float) -> None:
    """A worker whose shutdown hangs (a thread blocked on a client's socket, a device
    queue that does not drain) exits anyway after ``seconds``, so that no worker outlives
    its server: what it acknowledged is already in its deltas' files, which a killed
    process leaves consistent (the same as ``kill -9``)."""

    def expire() -> None:
        logs.event(log, "worker-stop-timeout", logging.WARNING, seconds=seconds)
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


async def _copy(
    service: NbdService, channel: Channel, request: int, export: str, src: str, dest: str
) -> None:
    """A delta copy the parent asked for: answered ("copied", request, copied, error)."""
    try:
        copied, error = await service.copy_delta(export, Path(src), Path(dest)), None
    except (LaminaError, OSError, ValueError) as exc:
        copied, error = False, f"{export}: {exc}"
    channel.send(("copied", request, copied, error))


def _options(config: dict[str, Any]) -> ServeOptions:
    from lamina.nbd.limits import Limits
    from lamina.serve.options import ServeOptions

    def address(value: list[Any] | None) -> tuple[str, int] | None:
        return (value[0], value[1]) if value else None

    return ServeOptions(
        nbd=address(config["nbd"]),
        http=address(config["http"]),
        workers=0,
        io_threads=config["io_threads"],
        log_level=config["log_level"],
        tls=config["tls"],
        tls_names=tuple(config["tls_names"]),
        https_cert=Path(config["https_cert"]) if config["https_cert"] else None,
        https_key=Path(config["https_key"]) if config["https_key"] else None,
        limits=Limits(**config["limits"]) if config["limits"] else None,
        server_name=config.get("server_name"),
    )


def main(argv: list[str]) -> None:
    config = json.loads(argv[0])
    tune_process()  # as the CLI does: fewer collections, no malloc churn for chunks
    try:
        import uvloop

        uvloop.run(_worker(config))
    except ImportError:
        asyncio.run(_worker(config))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except LaminaError as exc:
        print(f"lamina worker: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
