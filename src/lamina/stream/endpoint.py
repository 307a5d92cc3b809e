"""``lamina stream``: the local endpoint (one event loop, uvloop when available).

Start-up needs the manager only for a new cache (image info, manifest, a stateful
machine's delta); a cache that exists starts from its files alone, so a restart with the
manager unreachable serves at once (when the manager answers, its IMAGE@VERSION must
still have the cached manifest id). Then, side by side: the NBD server, background
hydration (boot profile first), marks persisted every 200 ms, ``status.json`` refreshed
every second, and a control socket for ``lamina stream status`` and ``sync``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lamina import logs
from lamina.delta import transfer
from lamina.delta.convert import apply_runs
from lamina.errors import Conflict, LaminaError, Unreachable, UsageError
from lamina.files import write_atomic
from lamina.files import write_json_atomic as write_json
from lamina.names import check_name, parse_ref
from lamina.nbd import ExportInfo
from lamina.nbd.aio import NbdServerProtocol
from lamina.nbd.device import BlockDevice, MemoryDevice
from lamina.stream import cache as cachedir
from lamina.stream.cache import ChunkFiles, StreamConfig
from lamina.stream.device import StreamCatalog, StreamImageDevice, StreamMachineDevice
from lamina.stream.fetch import Fetcher
from lamina.stream.hydrate import Hydrator
from lamina.stream.rate import Backoff, TokenBucket
from lamina.stream.remote import Remote
from lamina.stream.schedule import Hydration
from lamina.stream.stack import DeltaStack
from lamina.stream.sync import sync

DEFAULT_NBD = "127.0.0.1:10810"
DEFAULT_TIMEOUT = 30.0
# How long a start waits for the manager's word on what may have changed (a machine's
# mode, its seed) before going on with what the cache holds: a refused connection fails at
# once, a network that swallows packets costs this much.
ASK_TIMEOUT = 3.0


@dataclass
class StreamOptions:
    image: str  # IMAGE or IMAGE@VERSION: also the export's name
    cache: Path
    nbd: tuple[str, int]
    url: str | None = None
    token: str | None = None
    machine: str | None = None
    rate: float | None = None
    timeout: float = DEFAULT_TIMEOUT
    hydrate: bool = True
    connections: int = 8
    ca: Path | None = None  # the CA of an https:// manager (kept with the cache)


def check_names(image: str, machine: str | None) -> None:
    """Raise UsageError unless ``image`` is IMAGE[@VERSION] and ``machine`` a valid name."""
    parse_ref(image, "image name")
    if machine is not None:
        check_name(machine, "machine name")


def control_address(cache: Path) -> str:
    """The endpoint's control socket: abstract (nothing to clean up after a kill -9)."""
    key = hashlib.sha256(str(cache.resolve()).encode()).hexdigest()[:24]
    return f"\0lamina-stream-{key}"


# -- preparing the cache -------------------------------------------------------------------


async def _new_config(options: StreamOptions, remote: Remote) -> tuple[StreamConfig, bytes]:
    ref = parse_ref(options.image, "image name")
    mode = None
    if options.machine is not None:
        info = await remote.machine_info(options.machine)
        if info["image"] != ref.name or ref.version not in (None, info["version"]):
            raise UsageError(
                f"machine {options.machine} is pinned to {info['image']}@{info['version']},"
                f" not {options.image}"
            )
        mode = str(info["mode"])
    else:
        info = await remote.image_info(ref.name, ref.version)
    manifest = await remote.manifest(info["image"], int(info["version"]))
    config = StreamConfig(
        url=remote.url,
        image=str(info["image"]),
        version=int(info["version"]),
        manifest_id=bytes.fromhex(str(info["manifest_id"])),
        size=int(info["size"]),
        chunk_size=int(info["chunk_size"]),
        token=options.token or "",
        machine=options.machine,
        mode=mode,
    )
    return config, manifest


async def prepare(options: StreamOptions, log: logging.Logger) -> StreamConfig:
    """Open the cache under ``options.cache`` (the caller holds its lock), laying it out
    first when it is new."""
    root = options.cache
    if (root / "config.json").exists():
        config = cachedir.read_config(root)
        ref = parse_ref(options.image, "image name")
        if ref.name != config.image or ref.version not in (None, config.version):
            raise Conflict(f"{root} caches {config.image}@{config.version}, not {options.image}")
        if options.machine != config.machine:
            raise Conflict(f"{root} belongs to machine {config.machine}, not {options.machine}")
        changes: dict[str, Any] = {}
        if options.url and options.url.rstrip("/") != config.url:
            changes["url"] = options.url.rstrip("/")
        if options.token and options.token != config.token:
            changes["token"] = options.token
        config = replace(config, **changes)
        cachedir.keep_ca(root, options.ca)
        # Checked with the URL and token given now; kept only for a cache that is accepted.
        await _check_manifest(config, root, log)
        if changes:
            cachedir.update_config(root, config)
        return config
    if not options.url or not options.token:
        raise UsageError(
            "a new cache needs --from URL and --token T (or a --home holding the manager's database)"
        )
    remote = Remote(options.url, options.token, connections=2, ca=options.ca)
    try:
        config, manifest = await _new_config(options, remote)
    except Unreachable as exc:
        raise Unreachable(f"cannot reach the manager to start a new cache: {exc}") from None
    finally:
        await remote.close()
    cachedir.create(root, config, manifest)
    cachedir.keep_ca(root, options.ca)
    logs.event(log, "cache-created", cache=str(root), image=f"{config.image}@{config.version}")
    return config


async def _check_manifest(config: StreamConfig, root: Path, log: logging.Logger) -> None:
    """Refuse a cache whose IMAGE@V the manager holds with other content (the number
    reused: a manager whose database was rebuilt or restored, or --from now naming another
    one): it would go on serving the old bytes, and a machine's local writes were made on
    them. Caches are matched by name and version, so only the manifest id tells. Offline,
    or when the manager cannot say, the cache is served as it is: it is consistent."""
    remote = Remote(config.url, config.token, connections=1, ca=cachedir.ca_file(root))
    try:
        info = await asyncio.wait_for(remote.image_info(config.image, config.version), ASK_TIMEOUT)
    except (LaminaError, TimeoutError) as exc:
        logs.event(
            log,
            "manifest-unchecked",
            logging.WARNING,
            image=f"{config.image}@{config.version}",
            reason=str(exc) or "timeout",
        )
        return
    finally:
        await remote.close()
    if info.get("manifest_id") != config.manifest_id.hex():
        ref = f"{config.image}@{config.version}"
        raise Conflict(
            f"{root} caches {ref} with manifest {config.manifest_id.hex()[:16]}, but the manager's"
            f" {ref} is {str(info.get('manifest_id'))[:16]}: start with a new --cache"
        )


async def _refresh_mode(
    config: StreamConfig, remote: Remote, root: Path, log: logging.Logger
) -> StreamConfig:
    """A machine's mode may have changed on the manager; offline, the cached one holds."""
    if config.machine is None:
        return config
    try:
        info = await asyncio.wait_for(remote.machine_info(config.machine), ASK_TIMEOUT)
    except (LaminaError, TimeoutError) as exc:
        logs.event(log, "mode-unchecked", mode=config.mode, reason=str(exc) or "timeout")
        return config
    if info.get("mode") != config.mode:
        config = replace(config, mode=str(info["mode"]))
        cachedir.update_config(root, config)
    return config


async def _fetch_machine_delta(
    config: StreamConfig, remote: Remote, stack: DeltaStack, root: Path
) -> StreamConfig:
    """A stateful machine's delta as the manager holds it becomes the synced layer (once,
    when the cache is new: later the synced layer follows from this endpoint's syncs)."""
    assert config.machine is not None
    blob = transfer.decode(await remote.machine_delta(config.machine))
    if blob.base_id != config.manifest_id:
        raise Conflict(f"machine {config.machine}'s delta belongs to another image version")
    await asyncio.to_thread(apply_runs, stack.synced, blob.runs)
    config = replace(config, delta_fetched=True)
    cachedir.update_config(root, config)
    return config


# -- the endpoint ----------------------------------------------------------------------------


class Endpoint:
    def __init__(self, options: StreamOptions, config: StreamConfig, log: logging.Logger) -> None:
        self.options = options
        self.config = config
        self.log = log
        self.root = options.cache
        self.files = ChunkFiles(self.root, config)
        self.store_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store")
        # Reads waiting for the network hold a thread each: room for many at once.
        self.nbd_pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="io")
        self.remote = Remote(
            config.url,
            config.token,
            connections=options.connections,
            ca=cachedir.ca_file(self.root),
        )
        bucket = TokenBucket(options.rate, now=time.monotonic())
        self.fetcher = Fetcher(self.remote, self.files, self.store_pool, log, bucket=bucket)
        self.stack: DeltaStack | None = None
        self.device: BlockDevice | None = None
        self.started = time.monotonic()
        self._sync_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []
        self.exports: list[str] = []

    async def open_device(self) -> BlockDevice:
        loop = asyncio.get_running_loop()
        info = ExportInfo(
            self.options.image,
            self.config.size,
            read_only=self.config.machine is None,
            description=f"{self.config.image}@{self.config.version} (streamed)",
        )
        image = StreamImageDevice(info, self.files, self.fetcher, loop, self.options.timeout)
        if self.config.machine is None:
            self.device = image
            return image
        self.config = await _refresh_mode(self.config, self.remote, self.root, self.log)
        stack = DeltaStack(
            self.root / "deltas",
            size=self.config.size,
            base_id=self.config.manifest_id,
        )
        self.stack = stack
        if self.config.mode == "stateless":
            stack.drop_local()
        elif not self.config.delta_fetched:
            self.config = await _fetch_machine_delta(self.config, self.remote, stack, self.root)
        self.device = StreamMachineDevice(info, image, stack)
        return self.device

    async def _seed_devices(self) -> list[BlockDevice]:
        """A machine's identity seed as export ``IMAGE/seed``: fetched when the manager
        answers (identities change), else the copy kept from last time."""
        if self.config.machine is None:
            return []
        path = self.root / "seed.iso"
        try:
            data = await asyncio.wait_for(
                self.remote.machine_seed(self.config.machine), ASK_TIMEOUT
            )
            if not path.exists() or path.read_bytes() != data:
                write_atomic(path, data, durable=False)
        except (LaminaError, TimeoutError) as exc:
            if not path.exists():
                logs.event(self.log, "no-seed", logging.WARNING, reason=str(exc))
                return []
            data = path.read_bytes()
        info = ExportInfo(
            f"{self.options.image}/seed", len(data), read_only=True, description="identity seed"
        )
        return [MemoryDevice(info, data)]

    async def _hydrate(self) -> None:
        backoff = Backoff(cap=5.0)
        profile: list[int] = []
        while True:  # the profile first; an unreachable manager is waited for
            try:
                profile = await self.remote.profile(self.config.image, self.config.version)
                break
            except Unreachable as exc:
                self.fetcher.set_online(False, str(exc))
                await asyncio.sleep(backoff.next())
            except LaminaError as exc:
                logs.event(self.log, "no-profile", reason=str(exc))
                break
        hydration = Hydration(self.files.index, profile)
        logs.event(
            self.log, "hydrating", profile_chunks=hydration.profiled, chunks=len(hydration.order)
        )
        hydrator = Hydrator(
            self.fetcher, self.files, self.config.url, self.config.token, ca=self.remote.ca
        )
        await hydrator.run(hydration)
        await self.fetcher.persist()

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        data = cachedir.summary(self.config, self.files.index)
        data |= {
            "running": True,
            "pid": os.getpid(),
            "export": self.options.image,
            "nbd": f"nbd://{self.options.nbd[0]}:{self.options.nbd[1]}/{self.options.image}",
            "exports": self.exports,
            "online": self.fetcher.online,
            "last_error": self.fetcher.last_error or None,
            "rate_bytes_per_s": round(self.fetcher.meter.rate(now)),
            "fetched_bytes": self.fetcher.meter.total,
            "fetched_chunks": self.fetcher.counters.fetched_chunks,
            "demand_chunks": self.fetcher.counters.demand_chunks,
            "corrupt_refetched": self.fetcher.counters.corrupt,
            "retries": self.fetcher.counters.retries,
            "hydrating": self.options.hydrate and not self.files.index.complete,
            "booting": self.fetcher.in_boot(),
            "uptime_s": round(now - self.started, 1),
        }
        if self.stack is not None:
            data["mode"] = self.config.mode
            data["local_delta_blocks"] = self.stack.local_blocks()
            data["sync"] = self.stack.state.next_step() if self.stack.state.sealed else None
        return data

    async def _status_loop(self) -> None:
        # Figures for onlookers, refreshed every second: not worth two fsyncs each time.
        while True:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(
                    write_json, self.root / "status.json", self.status(), durable=False
                )
            await asyncio.sleep(1.0)

    async def do_sync(self) -> dict[str, Any]:
        async with self._sync_lock:
            assert self.stack is not None
            device = self.device
            changed = device.rebuild if isinstance(device, StreamMachineDevice) else (lambda: None)
            return await sync(self.stack, self.remote, self.config, changed=changed)

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline() or b"{}")
            op = request.get("op")
            if not _same_user(writer):  # an abstract socket has no file mode to guard it
                answer: dict[str, Any] = {"ok": False, "error": "not its user", "code": 12}
            elif op == "status":
                answer = {"ok": True, "status": self.status()}
            elif op == "sync":
                if self.stack is None:
                    raise UsageError("this stream has no machine (start it with --machine NAME)")
                answer = {"ok": True, "result": await self.do_sync()}
            else:
                answer = {"ok": False, "error": f"unknown request {op!r}", "code": 2}
        except LaminaError as exc:
            answer = {"ok": False, "error": str(exc), "code": exc.exit_code}
        except (ValueError, OSError) as exc:
            answer = {"ok": False, "error": str(exc), "code": 1}
        with contextlib.suppress(OSError):
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
            writer.close()

    async def run(self, ready: Any = None) -> None:
        loop = asyncio.get_running_loop()
        device, seeds = await asyncio.gather(self.open_device(), self._seed_devices())
        self.exports = [self.options.image] + [d.info.name for d in seeds]
        catalog = StreamCatalog(
            device,
            seeds,
            on_first=self.fetcher.boot_begins,
            on_idle=self.fetcher.boot_ends,
        )
        nbd = await loop.create_server(
            # No lanes: a sync seals and merges deltas on the loop, the device stays there.
            lambda: NbdServerProtocol(catalog, self.nbd_pool, self.log),
            *self.options.nbd,
            reuse_address=True,
        )
        control = await asyncio.start_unix_server(self._control, path=control_address(self.root))
        self._tasks = [
            asyncio.create_task(self.fetcher.persist_loop()),
            asyncio.create_task(self._status_loop()),
        ]
        if self.options.hydrate and not self.files.index.complete:
            self._tasks.append(asyncio.create_task(self._hydrate()))
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        logs.event(
            self.log,
            "streaming",
            export=self.status()["nbd"],
            image=f"{self.config.image}@{self.config.version}",
            machine=self.config.machine,
            mode=self.config.mode,
            complete=self.files.index.complete,
        )
        if ready is not None:
            ready()
        try:
            await stop.wait()
        finally:
            nbd.close()
            control.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.fetcher.persist()
            with contextlib.suppress(OSError):
                write_json(self.root / "status.json", self.status() | {"running": False})
            self.close()
            await self.remote.close()
            logs.event(self.log, "stopped")

    def close(self) -> None:
        if self.stack is not None:
            self.stack.close()
        self.nbd_pool.shutdown(wait=False, cancel_futures=True)
        self.store_pool.shutdown(wait=True)
        self.files.close()


def _same_user(writer: asyncio.StreamWriter) -> bool:
    """The peer of a control connection runs as this process's user (or root)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.getuid())


async def main(options: StreamOptions, ready: Any = None) -> None:
    log = logs.setup()
    check_names(options.image, options.machine)  # a bad name creates no cache directory
    lock_fd = cachedir.lock_dir(options.cache)
    try:
        config = await prepare(options, log)
        endpoint = Endpoint(options, config, log)
        await endpoint.run(ready)
    finally:
        os.close(lock_fd)


def run(options: StreamOptions) -> None:
    try:
        import uvloop

        uvloop.run(main(options))
    except ImportError:
        asyncio.run(main(options))
