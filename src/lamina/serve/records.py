"""What serving NBD asks of the manager's database, as plain values: the export names,
what an export is, what a machine's credential may open, who a certificate names, boot
profiles.

``DatabaseRecords`` answers from the home's database: in a server without worker
processes, and in the parent of worker processes. A worker asks its parent
(``ParentRecords``, one message each way on their channel) and so holds neither
SQLAlchemy nor the manager's models: about 25 MiB of each worker's resident set, which
the whole server's 256 MiB budget under attack cannot spare. Calls come from the
handshake threads, never from the event loop (they block until the answer comes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import pickle
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from lamina.errors import LaminaError
from lamina.names import MACHINE_PREFIX, SEED_SUFFIX, parse_ref
from lamina.nbd import ExportInfo
from lamina.trust.principal import Principal, presented

if TYPE_CHECKING:
    from lamina.home import Home
    from lamina.identity import AgentSeed, Identity

# Seconds a worker waits for its parent's answer: a lookup takes milliseconds; a parent
# that does not answer in this time is gone or stuck, and the client gets an error.
ANSWER_TIMEOUT: Final = 60.0


@dataclass(frozen=True, slots=True)
class Pin:
    """The image version a machine boots."""

    image: str
    version: int
    latest: bool  # the image's newest version: the bare IMAGE name means it too


@dataclass(frozen=True, slots=True)
class Record:
    """An export as the database describes it (a seed: the identity it is built from)."""

    info: ExportInfo
    kind: str  # image | machine | seed
    manifest_id: bytes
    machine: str | None = None
    stateless: bool = False
    seed: tuple[Identity, AgentSeed | None] | None = None


class Records(Protocol):
    def names(self) -> list[str]: ...

    def resolve(self, name: str, server: str | None) -> Record:
        """Export ``name`` (``server``: this block server's name in a cluster, which
        serves only the stateful machines assigned to it); LaminaError when there is none."""
        ...

    def pin(self, machine: str) -> Pin | None: ...

    def principal(self, der: bytes | None) -> Principal:
        """Who verified client certificate ``der`` (DER; None: none shown) names, if it
        still holds (parsed where the database is: the X.509 code stays out of workers)."""
        ...

    def boots(self, manifest_id: bytes) -> int: ...

    def save_profile(self, manifest_id: bytes, order: list[int]) -> None: ...

    def profile(self, manifest_id: bytes) -> bytes:
        """The version's boot profile, encoded (``lamina.image.profile``); b"" if none."""
        ...


CALLS: Final = frozenset(
    {"names", "resolve", "pin", "principal", "boots", "save_profile", "profile"}
)


class DatabaseRecords:
    """The answers, from the home's database (from any thread)."""

    def __init__(self, home: Home) -> None:
        self.home = home

    def names(self) -> list[str]:
        from lamina.manager.services import images, machines

        out: list[str] = []
        with self.home.session() as session:
            for image in images.list_images(session):
                out.append(image.name)
                out += [v.ref for v in image.versions]
            for machine in machines.list_all(session):
                out += [MACHINE_PREFIX + machine.name, MACHINE_PREFIX + machine.name + SEED_SUFFIX]
        return out

    def resolve(self, name: str, server: str | None) -> Record:
        from lamina.errors import Refused
        from lamina.manager.services import images, machines, servers

        with self.home.session() as session:
            if not name.startswith(MACHINE_PREFIX):
                version = images.get_version(session, parse_ref(name, "image name"))
                info = ExportInfo(name, version.size, read_only=True, description=version.ref)
                return Record(info, "image", bytes.fromhex(version.manifest_id))
            rest = name[len(MACHINE_PREFIX) :]
            machine = machines.get(session, rest.removesuffix(SEED_SUFFIX))
            version = machine.image_version
            if rest.endswith(SEED_SUFFIX):
                seed = machines.seed_of(session, machine, self.home)
                info = ExportInfo(name, 0, read_only=True, description="identity seed")
                return Record(info, "seed", b"", machine.name, seed=seed)
            if server is not None and machine.mode == machines.STATEFUL:
                found = servers.assigned(session, machine)
                if found is not None and found.name != server:
                    raise Refused(f"{machine.name} is stateful and served by {found.name}")
            info = ExportInfo(
                name, version.size, read_only=False, description=f"{version.ref} + delta"
            )
            return Record(
                info,
                "machine",
                bytes.fromhex(version.manifest_id),
                machine.name,
                stateless=machine.mode == "stateless",
            )

    def pin(self, machine: str) -> Pin | None:
        from sqlalchemy import func, select

        from lamina.errors import NotFound
        from lamina.manager.models import ImageVersion
        from lamina.manager.services import machines

        with self.home.session(read_only=True) as session:
            try:
                version = machines.get(session, machine).image_version
            except NotFound:
                return None
            newest = session.scalar(
                select(func.max(ImageVersion.version)).where(
                    ImageVersion.image_id == version.image_id
                )
            )
            return Pin(version.image.name, version.version, version.version == newest)

    def principal(self, der: bytes | None) -> Principal:
        from lamina.manager.services import credentials

        with self.home.session(read_only=True) as session:
            return credentials.principal_of(session, presented(der))

    def boots(self, manifest_id: bytes) -> int:
        from lamina.manager.services import profiles

        return profiles.boots(self.home, manifest_id)

    def save_profile(self, manifest_id: bytes, order: list[int]) -> None:
        from lamina.manager.services import profiles

        profiles.save(self.home, manifest_id, order)

    def profile(self, manifest_id: bytes) -> bytes:
        from lamina.image.profile import encode
        from lamina.manager.services import profiles
        from lamina.serve.warmup import WARM_MAX

        order, _boots = profiles.load(self.home, manifest_id)
        return encode(order[:WARM_MAX])  # (one channel message: see serve.warmup)


# -- a worker process and its parent ------------------------------------------------------

Send = Callable[[tuple[Any, ...]], None]


class ParentRecords:
    """A worker's records: each call is a ``("db", id, call, args)`` message to the
    parent, answered by ``("db-answer", id, pickled)``; ``save_profile`` is not
    answered."""

    def __init__(self, send: Send, loop: asyncio.AbstractEventLoop) -> None:
        self._send = send
        self._loop = loop
        self._ids = itertools.count(1)
        self._waiting: dict[int, concurrent.futures.Future[Any]] = {}

    def _call(self, call: str, *args: Any) -> Any:
        if _on_loop(self._loop):
            raise RuntimeError(f"records.{call} blocks: call it from a thread")
        request = next(self._ids)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._waiting[request] = future
        self._loop.call_soon_threadsafe(self._send, ("db", request, call, args))
        try:
            ok, value = future.result(timeout=ANSWER_TIMEOUT)
        except TimeoutError:
            raise LaminaError(f"the server's database did not answer ({call})") from None
        finally:
            self._waiting.pop(request, None)
        if not ok:
            raise value
        return value

    def answer(self, request: int, data: bytes) -> None:
        """The parent's answer (on the event loop): wakes the calling thread."""
        future = self._waiting.get(request)
        if future is not None and not future.done():
            future.set_result(pickle.loads(data))

    def lost(self) -> None:
        """The parent has gone: every call waiting fails."""
        for future in list(self._waiting.values()):
            if not future.done():
                future.set_result((False, LaminaError("the server's main process has gone")))

    def names(self) -> list[str]:
        return list(self._call("names"))

    def resolve(self, name: str, server: str | None) -> Record:
        record: Record = self._call("resolve", name, server)
        return record

    def pin(self, machine: str) -> Pin | None:
        pin: Pin | None = self._call("pin", machine)
        return pin

    def principal(self, der: bytes | None) -> Principal:
        principal: Principal = self._call("principal", der)
        return principal

    def boots(self, manifest_id: bytes) -> int:
        return int(self._call("boots", manifest_id))

    def profile(self, manifest_id: bytes) -> bytes:
        return bytes(self._call("profile", manifest_id))

    def save_profile(self, manifest_id: bytes, order: list[int]) -> None:
        self._loop.call_soon_threadsafe(self._send, ("db", 0, "save_profile", (manifest_id, order)))


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class RecordsServer:
    """The parent's side: answers its workers' calls on threads of its own, from its
    ``DatabaseRecords``."""

    def __init__(self, home: Home, threads: int = 2) -> None:
        self.records = DatabaseRecords(home)
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="records")

    def call(self, send: Send, request: int, call: str, args: tuple[Any, ...]) -> None:
        """Answer one call (on the event loop): ``send`` gets the answer there."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, self._run, call, args)
        if request:
            future.add_done_callback(lambda f: _answer(send, request, f.result()))

    def _run(self, call: str, args: tuple[Any, ...]) -> bytes:
        try:
            if call not in CALLS:
                raise LaminaError(f"no such call: {call}")
            value = getattr(self.records, call)(*args)
            return pickle.dumps((True, value))
        except LaminaError as exc:  # the worker raises it in the thread that called
            try:
                return pickle.dumps((False, exc))
            except Exception:
                return pickle.dumps((False, LaminaError(str(exc))))
        except Exception as exc:  # (a database driver's error: ours, not its classes)
            return pickle.dumps((False, LaminaError(f"database: {exc}")))

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def _answer(send: Send, request: int, data: bytes) -> None:
    send(("db-answer", request, data))
