"""``lamina serve``: the manager (HTTP) and the block server (NBD).

This process runs the manager and accepts NBD connections on one event loop (uvloop when
available); the connections are served by worker processes, one per core by default
(``serve.workers``), or in this process with ``workers=0``. Starting or stopping the
server changes no delta: a stateless machine starts clean at its next boot
(``serve.catalog``), so a client that reconnects across a restart or a crash of the server
(qemu's ``reconnect-delay``) reads what it wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from lamina import logs
from lamina.errors import LaminaError, UsageError
from lamina.home import Home
from lamina.locks import try_lock
from lamina.manager import history
from lamina.manager.app import create_app, create_boot_app
from lamina.manager.console.auth import print_login_url
from lamina.manager.nbdtotals import NbdTotals
from lamina.manager.services.netboot import check_auto_add
from lamina.serve.control import Control, CopyOpen
from lamina.serve.imagefiles import hydrated_dir
from lamina.serve.options import ServeOptions
from lamina.serve.tls import ServeTls, tls_setup, warn_if_exposed

DEFAULT_NBD = "127.0.0.1:10809"
DEFAULT_HTTP = "127.0.0.1:8480"


def parse_address(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"bad {what} address {text!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(
    home: Home,
    options: ServeOptions,
    *,
    ready: Callable[[], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM or until ``stop`` is set; then close every connection,
    flush and close every delta, so the home can be served again at once."""
    # One block server per home: it owns the deltas. (Managers without NBD may be many.)
    home_lock = _lock_home(home) if options.nbd is not None else None
    try:
        await _serve(home, options, ready=ready, stop=stop)
    finally:
        if home_lock is not None:
            os.close(home_lock)


async def _serve(  # noqa: PLR0915 (one start-up and shutdown sequence, in order)
    home: Home,
    options: ServeOptions,
    *,
    ready: Callable[[], None] | None,
    stop: asyncio.Event | None,
) -> None:
    log = logs.setup(options.log_level)
    if options.auto_add is not None:
        with home.session(read_only=True) as session:
            check_auto_add(session, options.auto_add)
    if options.nbd is not None:  # derived data of the last run (see serve.imagefiles)
        shutil.rmtree(hydrated_dir(home.cache_dir), ignore_errors=True)
    loop = asyncio.get_running_loop()
    # The server certificate is issued (or renewed) here, once: the NBD workers find it.
    tls = tls_setup(home, options, None) if options.tls else None
    # Bind both ports before anything else: a port in use is a one-line error at start,
    # not a manager that silently never came up beside a working block server.
    nbd_sock = _listen(options.nbd, "--nbd") if options.nbd is not None else None
    http_sock = _listen(options.http, "--http") if options.http is not None else None
    boot_sock = _listen(options.boot_http, "--boot-http") if options.boot_http else None
    stop = stop or asyncio.Event()
    failed: list[str] = []
    block = await _start_nbd(home, options, log, nbd_sock, stop, failed) if nbd_sock else None
    totals = block[2] if block is not None else None
    leave = None
    if options.server_name is not None and options.nbd is not None:
        from lamina.serve.cluster import advertised, join

        address = advertised(options.nbd, options.advertise)
        leave = await join(home, options.server_name, address, options.heartbeat, log)
    # `lamina backup` asks the block server (the deltas' owner) to copy them at flush points
    control = None
    if block is not None:
        control = await Control(home.root, home.deltas_dir, block[1], log).start()
    https = _start_https(home, options, tls, (http_sock, boot_sock), stop, totals)
    manager_app = https[0][0].config.app if options.http is not None else None
    sampler = (
        asyncio.create_task(_sample_history(home, manager_app, totals))
        if manager_app is not None and totals is not None
        else None
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    logs.event(
        log,
        "serving",
        nbd=f"{options.nbd[0]}:{options.nbd[1]}" if options.nbd else None,
        http=f"{options.http[0]}:{options.http[1]}" if options.http else None,
        boot_http=f"{options.boot_http[0]}:{options.boot_http[1]}" if options.boot_http else None,
        tls=options.tls,
        workers=options.worker_count if options.nbd else None,
    )
    if not options.tls:
        warn_if_exposed(log, options.hosts)
    if options.http is not None and log.isEnabledFor(logging.INFO):
        # the console's one-time login URL, as Jupyter prints it (not in quiet runs: the demo)
        print_login_url(home, options.http, https=options.tls)
    if ready is not None:
        ready()
    try:
        await stop.wait()
    finally:
        if sampler is not None:
            sampler.cancel()
        if leave is not None:
            await leave()
        if control is not None:
            control.close()
        if block is not None:
            await block[0]()
        # the workers' parent accepts on it: left open, a server started again in this
        # process (the demo's second round) cannot listen on the port
        if nbd_sock is not None:
            nbd_sock.close()
        await _stop_https(https)
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        logs.event(log, "stopped")
    if failed:
        raise LaminaError(failed[0])


async def _start_nbd(
    home: Home,
    options: ServeOptions,
    log: logging.Logger,
    sock: socket.socket,
    stop: asyncio.Event,
    failed: list[str],
) -> tuple[Callable[[], Awaitable[None]], CopyOpen, Callable[[], NbdTotals]]:
    """Serve NBD on ``sock`` (in workers, or here); returns what stops it, how to copy
    an open delta for a backup, and what gives its counters (for /metrics). Workers that
    keep dying at start set ``stop`` and say why in ``failed``."""
    if options.worker_count == 0:
        from lamina.serve.handshake import NbdService

        service = NbdService(home, log, io_threads=options.io_threads, options=options)
        counting = service.shared.meter.filter()
        log.addFilter(counting)
        server = await asyncio.get_running_loop().create_server(service.protocol, sock=sock)

        async def stop_here() -> None:
            log.removeFilter(counting)
            server.close()
            await service.close()

        return stop_here, service.copy_delta, service.totals
    from lamina.serve.workers import WorkerPool

    pool = WorkerPool(home, options, log)
    try:
        await pool.start(sock)
    except BaseException:
        await pool.stop()
        raise

    async def watch_pool() -> None:
        await pool.failed.wait()
        failed.append("NBD workers keep exiting at start (see the log above)")
        stop.set()

    watch = asyncio.create_task(watch_pool())

    async def stop_workers() -> None:
        watch.cancel()
        await pool.stop()

    return stop_workers, pool.copy_delta, pool.totals


async def _sample_history(home: Home, app: Any, totals: Callable[[], NbdTotals]) -> None:
    """Feed the dashboard's charts a sample a minute (see manager.history)."""
    while True:
        nbd = totals()
        usage = await asyncio.to_thread(home.store.usage)
        app.state.history.add(history.now_sample(nbd.boots, nbd.read_bytes(), usage.pack_bytes))
        await asyncio.sleep(history.EVERY)


HttpServers = list[tuple[Any, "asyncio.Task[None]"]]  # uvicorn servers and their tasks


def _start_https(
    home: Home,
    options: ServeOptions,
    tls: ServeTls | None,
    socks: tuple[socket.socket | None, socket.socket | None],
    stop: asyncio.Event,
    totals: Callable[[], NbdTotals] | None,
) -> HttpServers:
    """The manager on --http and, when asked, network boot alone on --boot-http."""
    https = []
    netboot = options.netboot()
    if options.http is not None:
        app = create_app(home, netboot)
        app.state.nbd_totals = totals  # for /metrics and the console
        if options.nbd is not None:  # the console shows the NBD URLs of machines
            app.state.nbd_address = (*options.nbd, options.tls)
        https.append(_start_http(app, options.http, tls, socks[0], stop))
    if options.boot_http is not None:
        # plain HTTP whatever TLS says: firmware can check no certificate of ours
        app = create_boot_app(home, netboot)
        https.append(_start_http(app, options.boot_http, None, socks[1], stop))
    return https


async def _stop_https(https: HttpServers) -> None:
    for http, task in https:
        http.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _start_http(
    app: Any,
    address: tuple[str, int],
    tls: ServeTls | None,
    sock: socket.socket | None,
    stop: asyncio.Event,
) -> tuple[Any, asyncio.Task[None]]:
    http = _http_server(app, address, tls)
    task = asyncio.create_task(http.serve(sockets=[sock]))
    task.add_done_callback(lambda _task: stop.set())  # the manager died: stop all
    return http, task


def _lock_home(home: Home) -> int:
    return try_lock(
        home.root / "serve.lock",
        f"another `lamina serve` is serving block devices from {home.root} "
        "(more managers on one database: --no-nbd)",
    )


def _listen(address: tuple[str, int], what: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        # a deep backlog absorbs a login storm's (or a boot storm's) connection burst
        sock.listen(4096)
    except OSError as exc:
        sock.close()
        raise LaminaError(
            f"cannot listen on {address[0]}:{address[1]} ({what}): {exc.strerror}"
        ) from None
    sock.setblocking(False)
    return sock


def _http_server(app: Any, address: tuple[str, int], tls: ServeTls | None) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # the serve loop owns SIGINT/SIGTERM and stops both servers

    # httptools parses requests in C: 623 logins/s in the login storm where h11 (pure
    # Python) gave 516. A deep backlog absorbs a login storm's connection burst.
    config = uvicorn.Config(
        app,
        host=address[0],
        port=address[1],
        log_level="warning",
        lifespan="off",
        http="httptools",
        backlog=4096,
        timeout_keep_alive=75,
        # Agents' long-polls (up to 30 s) would hold a stop that long; they reconnect.
        timeout_graceful_shutdown=2,
        ssl_certfile=tls.http_cert if tls else None,
        ssl_keyfile=tls.http_key if tls else None,
    )
    return Server(config)


def run(home: Home, options: ServeOptions) -> None:
    import resource

    # Every agent keeps a connection open (its long-poll): 10,000 machines need more file
    # descriptors than the usual soft limit of 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        uvloop.run(serve(home, options))
    except ImportError:
        asyncio.run(serve(home, options))
