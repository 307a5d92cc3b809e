"""``lamina agent``: the process on each machine.

- At start it reports the boot (``POST /agent/boot``) and applies the identity it gets.
- ``lamina agent login USER`` / ``logout USER`` (a PAM session hook runs them) talk to the
  running agent over a unix socket in its home (``run/agent.sock``, root only), so one
  process owns the mounts and serializes them. Login claims the session at the manager,
  fetches the entitled layers and the writable layer into the host's store, and composes
  them at ``ROOT/USER``. Logout unmounts (the writable layer keeps what its policy keeps),
  uploads the new writable version and ends the session at the manager.
- A long-poll of ``/agent/desired`` brings entitlement changes: layers attach and detach
  live in the sessions they concern.
- When the manager is away, every call retries with capped exponential backoff. A logout
  whose new writable version could not yet be handed over is kept in ``agent/pending/``
  and retried until the manager records it; the user's next login here waits for it, and
  the manager refuses a login elsewhere until then, so nothing a user wrote is lost. Each
  pending logout is retried on its own: one that fails does not hold up the others or the
  long-poll. One the manager refuses for good (409: it holds no session to save into;
  404: the user is gone) cannot succeed by retrying: it is moved to ``agent/pending/failed/``
  with the manager's reason and the saved version's manifest id, logged as a warning, and
  shown by ``lamina agent status``, for an administrator to recover.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lamina import logs
from lamina.agent import fetch, lazy
from lamina.agent.host import control_server, failed_dir, pending_dir, socket_path
from lamina.agent.reconcile import Attach, Detach, Have, Pending, Stale, Want, plan
from lamina.errors import (
    AlreadyExists,
    Conflict,
    InvalidInput,
    LaminaError,
    NotFound,
    Unreachable,
    UsageError,
)
from lamina.files import write_atomic
from lamina.home import Home
from lamina.manager.client import ManagerClient
from lamina.names import check_user_name

if TYPE_CHECKING:
    from lamina.layer.records import LayerRecords

T = TypeVar("T")
# Backoff between retries: 0.2 s doubling to 5 s, +-25% jitter so that 10,000 agents
# coming back after a manager restart do not arrive in one wave.
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0
WAIT = 30  # long-poll seconds
HANDOVER = 30.0  # a logout waits this long for the manager, then finishes in the background
# What the manager answers to a logout that no retry can change: 409 (no session of the user
# here to save into, e.g. ended meanwhile), 404 (no such user), 422 (a request it rejects).
REFUSED = (Conflict, AlreadyExists, NotFound, UsageError)


def backoff(attempt: int) -> float:
    delay: float = min(BACKOFF_MAX, BACKOFF_FIRST * 2**attempt)
    return delay * random.uniform(0.75, 1.25)


class Agent:
    def __init__(
        self,
        home: Home,
        client: ManagerClient,
        root: Path,
        *,
        etc: Path | None = None,
        log: logging.Logger | None = None,
        lazy: bool = False,
        ca: Path | None = None,
    ) -> None:
        self.lazy = lazy  # app layers attached lazily (lamina.agent.lazy)
        self.ca = ca
        self.home = home
        self.client = client
        self.root = root.absolute()
        self.etc = etc
        self.log = log or logs.setup()
        self.lock = threading.RLock()  # one mount operation at a time
        self.stopping = threading.Event()
        self.rev: str | None = None
        # user -> what is mounted at ROOT/USER: read from the records once, then kept by
        # this process's own mounts (it makes them all, under the lock). Reading the records
        # per long-poll answer cost 0.2 s of each live change under emulation, and 2.6 s
        # (its queries' first compilation) right after a login, beside the user's new shell.
        self._haves: dict[str, Have] | None = None
        self.pending_dir = pending_dir(home)

    @functools.cached_property
    def records(self) -> LayerRecords:
        """The layer records in this host's own database (opened on first use: a PAM
        hook's ``lamina agent login`` only talks to the running agent)."""
        from lamina.manager.layer_records import DatabaseRecords

        return DatabaseRecords(self.home)

    # -- calls to the manager -----------------------------------------------------------------

    def call(self, fn: Callable[[], T], *, timeout: float | None = None) -> T:
        """``fn()``, retried with backoff while the manager is unreachable."""
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            try:
                return fn()
            except Unreachable as exc:
                if self.stopping.is_set() or (deadline is not None and time.monotonic() > deadline):
                    raise
                delay = backoff(attempt)
                logs.event(
                    self.log, "manager unreachable", error=str(exc), retry_in=round(delay, 2)
                )
                attempt += 1
                self.stopping.wait(delay)

    # -- boot ---------------------------------------------------------------------------------

    def boot(self) -> dict[str, Any]:
        booted: dict[str, Any] = self.call(lambda: self.client.json("POST", "/agent/boot"))
        self.apply_identity(booted)
        logs.event(self.log, "booted", machine=booted["machine"], image=booted["image"])
        return booted

    def apply_identity(self, booted: dict[str, Any]) -> None:
        state = self.home.root / "agent"
        state.mkdir(parents=True, exist_ok=True)
        write_atomic(state / "identity.json", json.dumps(booted, indent=2) + "\n", mode=0o600)
        if self.etc is None:
            return
        ident = booted["identity"]
        write_atomic(self.etc / "hostname", ident["hostname"] + "\n", mode=0o644)
        write_atomic(self.etc / "machine-id", ident["machine_id"] + "\n", mode=0o444)
        for kind, pair in (ident.get("ssh_host_keys") or {}).items():
            key = self.etc / "ssh" / f"ssh_host_{kind}_key"
            write_atomic(key, pair["private"], mode=0o600)
            write_atomic(key.with_name(key.name + ".pub"), pair["public"] + "\n", mode=0o644)

    # -- login / logout -----------------------------------------------------------------------

    def session_root(self, user: str) -> Path:
        return self.root / check_user_name(user)

    def login(self, user: str) -> dict[str, Any]:
        from lamina.agent import local_versions
        from lamina.layer import roots

        root = self.session_root(user)
        with self.lock:
            with contextlib.suppress(*REFUSED):  # parked in pending/failed/ and logged
                self._flush_pending(user, timeout=HANDOVER)
            # A login repeated while the user's root is mounted continues the same session.
            was_mounted = self._mounted(root)
            state: dict[str, Any] = self.call(
                lambda: self.client.json("POST", "/agent/login", json={"user": user}), timeout=60
            )
            try:
                self.fetch_layers(state["layers"])
                writable = state["writable"]
                if writable is not None:
                    if writable["version"] is not None:
                        fetch.ensure_version(self.home, self.client, writable, "writable")
                    with self.home.session() as session:
                        local_versions.trim_after(
                            session, name=writable["name"], version=writable["version"] or 0
                        )
                if not self._mounted(root):
                    root.mkdir(parents=True, exist_ok=True)
                    self._keep(
                        user,
                        lambda: roots.mount(
                            self.home,
                            self.records,
                            root,
                            [la["ref"] for la in state["layers"]],
                            writable=writable["name"] if writable else None,
                            policy=writable["policy"] if writable else "all",
                        ),
                    )
                self.composed(user, root)
            except BaseException:
                # Give the session (and the writable layer) back only if nothing of it is
                # mounted here. While ROOT/USER is mounted the writable layer is in use: ending
                # the session would let another machine claim it, and this one's logout would
                # then be refused with all it saved.
                if not was_mounted and not self._mounted(root):
                    with contextlib.suppress(LaminaError):
                        self.client.json("POST", "/agent/logout", json={"user": user})
                raise
        logs.event(self.log, "login", user=user, layers=[la["ref"] for la in state["layers"]])
        return {"user": user, "root": str(root), "layers": [la["ref"] for la in state["layers"]]}

    # -- where a system agent (lamina.guest.session) differs --------------------------------

    def fetch_layers(self, layers: list[dict[str, Any]]) -> None:
        """Make a login's read-only layers mountable here."""
        for layer in layers:
            self.ensure_app(layer)

    def ensure_app(self, layer: dict[str, Any]) -> None:
        fetch.ensure_version(self.home, self.client, layer, "app", lazy=self.lazy, ca=self.ca)

    def composed(self, user: str, root: Path) -> None:
        """``root`` (the user's composed root) was mounted or changed."""

    def leaving(self, user: str, root: Path) -> None:
        """``root`` is about to be unmounted and its writable layer kept."""

    def _mounted(self, root: Path) -> bool:
        return root.parent == self.root and root.name in self._sessions()

    def _sessions(self) -> dict[str, Have]:
        """What is mounted at each user's root (see ``_haves``)."""
        from lamina.layer import roots

        if self._haves is None:
            haves = {}
            for m in roots.mounts(self.home, self.records):
                path = Path(m.root)
                if path.parent == self.root:
                    haves[path.name] = Have(path.name, tuple(m.layers), m.writable)
            self._haves = haves
        return self._haves

    def _keep(self, user: str, operation: Callable[[], T]) -> T:
        """Run a mount operation on ``user``'s root and keep what it left there (a
        ``Mounted``: that; anything else: nothing). One that fails may have done part of
        its work: the records are read again next time."""
        from lamina.layer.roots import Mounted

        sessions = self._sessions()
        try:
            result = operation()
        except BaseException:
            self._haves = None
            raise
        if isinstance(result, Mounted):
            sessions[user] = Have(user, tuple(result.layers), result.writable)
        else:
            sessions.pop(user, None)
        return result

    def logout(self, user: str) -> dict[str, Any]:
        from lamina.layer import roots

        root = self.session_root(user)
        with self.lock:
            saved = None
            if self._mounted(root):
                self.leaving(user, root)
                saved = self._keep(user, lambda: roots.umount(self.home, self.records, root)).saved
            self.pending_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(
                self.pending_dir / f"{user}.json", json.dumps({"saved": saved}), mode=0o600
            )
            if self.lazy:  # what this session read first: the layers' read-ahead profiles
                with contextlib.suppress(LaminaError, OSError):
                    lazy.upload_profiles(self.home, self.client)
            try:
                result = self._flush_pending(user, timeout=HANDOVER)
            except Unreachable:
                # Unmounted and kept here; the poll loop hands it over when the manager is back.
                result = {"user": user, "ended": False, "saved": saved, "pending": True}
        logs.event(self.log, "logout", user=user, saved=result.get("saved"))
        return result

    def _flush_pending(self, user: str, timeout: float | None = None) -> dict[str, Any]:
        """Hand a finished session's writable version to the manager (retried until done).
        A logout the manager refuses for good is parked in ``pending/failed/`` and its
        error raised."""
        from lamina.agent import local_versions

        path = self.pending_dir / f"{user}.json"
        if not path.exists():
            return {"user": user, "ended": False, "saved": None}
        saved = json.loads(path.read_text())["saved"]
        body: dict[str, Any] = {"user": user}
        for attempt in range(3):
            if saved is not None:
                body["writable"] = self.call(
                    lambda: fetch.upload_version(self.home, self.client, saved), timeout=timeout
                )
            try:
                result: dict[str, Any] = self.call(
                    lambda: self.client.json("POST", "/agent/logout", json=body), timeout=timeout
                )
                break
            except InvalidInput:  # chunks collected in between (store gc): upload again
                if attempt == 2:
                    raise
            except REFUSED as exc:
                kept = self._park(path, user, saved, body.get("writable"), exc)
                raise type(exc)(f"{exc} (the logout is kept in {kept})") from None
        if saved is not None and result.get("saved") and result["saved"] != saved:
            # The manager numbered it otherwise: keep the local copy under its number.
            name, _, version = result["saved"].rpartition("@")
            with self.home.session() as session:
                manifest, files, size, _bases, policy = local_versions.version_facts(
                    session, ref=saved
                )
                local_versions.record(
                    session,
                    name=name,
                    kind="writable",
                    version=int(version),
                    manifest=manifest,
                    files=files,
                    size=size,
                    policy=policy,
                )
        path.unlink()
        return result

    def _park(
        self,
        path: Path,
        user: str,
        saved: str | None,
        writable: dict[str, Any] | None,
        error: LaminaError,
    ) -> Path:
        """Move a refused pending logout out of the retry queue, keeping what an
        administrator needs to recover the saved version: its manifest id names its tree in
        this host's chunk store (a later login may drop the local version record)."""
        failed = failed_dir(self.home)
        record = {
            "user": user,
            "saved": saved,
            "manifest": writable["manifest"] if writable else None,
            "refused": type(error).__name__,
            "reason": str(error),
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        # One file per refusal: a user may collect several before anyone looks.
        dest = failed / f"{user}.{time.time_ns()}.json"
        write_atomic(dest, json.dumps(record, indent=2) + "\n", mode=0o600)
        path.unlink()
        logs.event(
            self.log,
            "logout refused",
            logging.WARNING,
            user=user,
            saved=saved,
            reason=str(error),
            kept=str(dest),
        )
        return dest

    def flush_all_pending(self, timeout: float | None = None) -> None:
        """Try every pending logout once per call, each on its own: a failure is logged
        and the file stays for the next call, a refusal is parked; none stops the others.
        ``timeout`` bounds the retries of the whole round (each file still gets one try),
        so a manager that is away does not hold the round up once per file."""
        if not self.pending_dir.is_dir():
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        for path in sorted(self.pending_dir.glob("*.json")):
            if self.stopping.is_set():
                return
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                with self.lock:
                    self._flush_pending(path.stem, timeout=left)
            except REFUSED:
                continue  # parked and logged by _flush_pending
            except Exception as exc:  # whatever it is, the file stays and the rest go on
                logs.event(
                    self.log,
                    "pending logout failed",
                    logging.WARNING,
                    user=path.stem,
                    error=f"{type(exc).__name__}: {exc}",
                )

    # -- desired state ------------------------------------------------------------------------

    def reconcile(self, desired: dict[str, Any]) -> list[str]:
        """Apply live what differs between the manager's sessions and the mounted ones."""
        from lamina.layer import attach

        plan_clock = logs.Steps()
        with self.lock:
            wants = {
                s["user"]: Want(
                    s["user"],
                    tuple(la["ref"] for la in s["layers"]),
                    s["writable"]["name"] if s["writable"] else None,
                )
                for s in desired["sessions"]
            }
            layers = {la["ref"]: la for s in desired["sessions"] for la in s["layers"]}
            haves = dict(self._sessions())
            done = []
            planned = plan_clock.step("plan")
            for action in plan(wants, haves):
                root = self.session_root(action.user)
                clock = logs.Steps()
                try:
                    if isinstance(action, Attach):
                        self.ensure_app(layers[action.ref])
                        clock.step("fetch")
                        attached = self._keep(
                            action.user,
                            functools.partial(
                                attach.attach, self.home, self.records, root, action.ref
                            ),
                        )
                        clock.split("image", attached.prepared.get(action.ref, 0.0))
                        clock.step("mount")
                        self.composed(action.user, root)
                        done.append(f"attach {action.user} {action.ref} ({clock.step('show')})")
                    elif isinstance(action, Detach):
                        self._keep(
                            action.user,
                            functools.partial(
                                attach.detach, self.home, self.records, root, action.name
                            ),
                        )
                        clock.step("mount")
                        self.composed(action.user, root)
                        done.append(f"detach {action.user} {action.name} ({clock.step('show')})")
                    elif isinstance(action, Pending):
                        logs.event(self.log, "pending", user=action.user, why=action.why)
                    elif isinstance(action, Stale):
                        logs.event(self.log, "stale session", user=action.user)
                except LaminaError as exc:
                    logs.event(self.log, "reconcile failed", action=str(action), error=str(exc))
            if done:
                logs.event(self.log, "reconciled", actions=done, planned=planned)
            return done

    def poll_forever(self) -> None:
        attempt = 0
        while not self.stopping.is_set():
            # Never raises: a pending logout that fails must not keep the loop from the poll.
            self.flush_all_pending(timeout=HANDOVER)
            try:
                params: dict[str, Any] = {"wait": WAIT}
                if self.rev is not None:
                    params["rev"] = self.rev
                desired = self.client.json(
                    "GET", "/agent/desired", params=params, timeout=WAIT + 15
                )
                attempt = 0
                if desired["rev"] != self.rev:
                    # when the change arrived: the start of a live change's time here
                    logs.event(self.log, "desired", rev=desired["rev"])
                    self.reconcile(desired)
                    self.rev = desired["rev"]
            except Unreachable as exc:
                delay = backoff(attempt)
                attempt += 1
                logs.event(
                    self.log, "manager unreachable", error=str(exc), retry_in=round(delay, 2)
                )
                self.stopping.wait(delay)
            except LaminaError as exc:
                logs.event(self.log, "desired state failed", error=str(exc))
                self.stopping.wait(BACKOFF_MAX)

    # -- the control socket -------------------------------------------------------------------

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op, user = request.get("op"), request.get("user")
        if not isinstance(user, str):
            raise UsageError("a user name is needed")
        if op == "login":
            return self.login(user)
        if op == "logout":
            return self.logout(user)
        raise UsageError(f"unknown operation {op!r}")

    def run(self) -> None:
        """Boot, then serve the control socket and long-poll until stopped."""
        # What a login imports, imported now: 0.5 s of a first login on a loaded host.
        from lamina.agent import local_versions  # noqa: F401
        from lamina.layer import attach, prepare, roots  # noqa: F401

        self.boot()
        server = control_server(self.handle, socket_path(self.home))
        threading.Thread(target=server.serve_forever, name="control", daemon=True).start()
        try:
            self.poll_forever()
        finally:
            server.shutdown()
            server.server_close()
            socket_path(self.home).unlink(missing_ok=True)
