"""The agent's system mode: a logged-in user's layers appear in the running system.

Design. A machine runs one golden image; a user's app layers must appear *installed* in
it, for every process of the user's session (the shell, a desktop's ``systemd --user``
services, D-Bus activated programs), and go when the user leaves. The agent composes the
user's root as it always does (``lamina.layer.roots``: the app layers first, the base
last, the writable layer on top), with one difference: the base is not fetched and
mounted from its image, the running system *is* the base (the image was built from that
layer, see ``lamina image build``), so the composition's lowest layer is the system's
root directory (``lamina.layer.prepare.provide``). Then the directories where packages
install are bound from the composed root onto the running system, as systemd-sysext
merges ``/usr`` and ``/opt`` and systemd-confext ``/etc``:

    /usr, /opt, /etc, and the user's home   <-  bind of ROOT/usr, ... (ROOT: the overlay)

A live change (an entitlement granted or revoked) switches the composed root to a new
overlay (``lamina.layer.attach``) and each merged directory's bind is replaced the same
way: the new bind slides in beneath the old one, which is lazily detached, so lookups go
from one view to the other in one step and nothing is copied. The home keeps its first
bind (shells sit in it; both overlays share the upper directory). At logout the binds and
the overlay are detached lazily (processes that started from the session's ``/usr``, such as the user's
``systemd --user``, keep their view until they exit) and the writable layer is kept by its
policy: ``profile`` keeps the home, ``apps`` what was installed into the merged
directories, ``all`` both.

Why not a mount namespace per user (pam_namespace): the processes of a desktop session
are not all children of the PAM session (``systemd --user`` is started by PID 1), so they
would not see the user's apps. The price of merging into the one system view is that one
user's layers are composed at a time: a second user logging in while another's session
is composed gets the plain system and a message (RDSH-style use, one user after another,
is what this covers). And while a session is composed, anything written into the merged
directories, by anyone, lands in that session's upper layer.

Several PAM sessions of one user (two ssh logins, ``su``) share the composition: it is
counted, and the last logout ends it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lamina import logs
from lamina.agent.daemon import Agent
from lamina.errors import Conflict, LaminaError
from lamina.layer import mountapi, overlay, prepare

# Where packages install: what systemd-sysext (/usr, /opt) and systemd-confext (/etc) merge.
MERGED = ("usr", "opt", "etc")


@dataclass(frozen=True, slots=True)
class SystemInfo:
    """What the kit recorded about the root it was installed into (``etc/lamina/system.json``)."""

    base: str | None  # the layer this root was built as (NAME), when known

    @classmethod
    def read(cls, system_root: Path) -> SystemInfo:
        from lamina.guest import paths

        try:
            data = json.loads((system_root / paths.SYSTEM).read_text())
        except (OSError, ValueError):
            return cls(None)
        base = data.get("base") if isinstance(data, dict) else None
        return cls(base if isinstance(base, str) else None)


def home_of(user: str) -> str:
    """The user's home as a path below the root ("home/alice")."""
    try:
        return pwd.getpwnam(user).pw_dir.strip("/") or f"home/{user}"
    except KeyError:
        return f"home/{user}"


class Presenter:
    """Binds a composed root's merged directories onto the system root, and takes them
    away. What is presented is read from the mount table (a session's binds are overlays
    whose upper directory is in the agent's home), so an agent restarted in the middle of
    a session finds it."""

    def __init__(self, system_root: Path, mounts_dir: Path) -> None:
        self.system = system_root
        self.marker = f"upperdir={mounts_dir.absolute()}/"

    def targets(self, user: str) -> list[str]:
        return [*MERGED, home_of(user)]

    def show(self, user: str, root: Path) -> list[str]:
        """Present ``root`` (mounted) for ``user``; replaces what is presented already."""
        device = overlay.device(root)
        table = overlay.mountinfo()  # once: parsing it per directory cost 0.2 s emulated
        shown = []
        for rel in self.targets(user):
            source, target = root / rel, self.system / rel
            if not source.is_dir() or source.is_symlink():
                continue
            target.mkdir(parents=True, exist_ok=True)
            present = self._presented(target, table)
            if present and (rel not in MERGED or os.stat(target).st_dev == device):
                # This overlay is presented already; or it is the home, which stays on the
                # session's first overlay: shells have their working directory there, and
                # a replaced bind would leave them in a detached one (getcwd fails). Both
                # overlays write into the one upper directory, so nothing is lost.
                continue
            fd = mountapi.clone_tree(source)
            if present:
                overlay.switch(fd, target)
            else:
                overlay.mount_new(fd, target)
            shown.append(rel)
        return shown

    def hide(self, user: str) -> list[str]:
        """Detach (lazily) the session binds on ``user``'s directories."""
        hidden = []
        for rel in reversed(self.targets(user)):
            target = self.system / rel
            while self._presented(target):
                mountapi.umount(target, lazy=True)
                hidden.append(rel)
        return hidden

    def owner(self, sessions: Path) -> str | None:
        """The user whose composed root is presented on ``/usr``, if any."""
        target = self.system / MERGED[0]
        if not self._presented(target):
            return None
        device = os.stat(target).st_dev
        with contextlib.suppress(OSError):
            for child in sessions.iterdir():
                if overlay.mounted_at(child) is not None and overlay.device(child) == device:
                    return child.name
        return "?"  # a session whose root is gone (an agent that died mid-switch)

    def _presented(self, target: Path, table: list[overlay.MountInfo] | None = None) -> bool:
        found = overlay.mounted_at(target, table)
        return found is not None and found.fstype == "overlay" and self.marker in found.options


class SystemAgent(Agent):
    """``lamina agent --system-root /``: sessions composed into the running system."""

    def __init__(self, *args: Any, system_root: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.system = system_root.absolute()
        self.info = SystemInfo.read(self.system)
        self.presenter = Presenter(self.system, self.home.root / "mounts")
        self.sessions: dict[str, int] = {}  # user -> PAM sessions open

    # -- counted logins -----------------------------------------------------------------------

    def login(self, user: str) -> dict[str, Any]:
        with self.lock:
            owner = self.presenter.owner(self.root)
            if owner is not None and owner != user:
                raise Conflict(
                    f"{owner}'s session holds this machine's layers: {user} gets the plain "
                    "system (one user at a time)"
                )
            try:
                result = super().login(user)
            except LaminaError as exc:
                logs.event(self.log, "login failed", logging.WARNING, user=user, error=str(exc))
                raise
            self.sessions[user] = self.sessions.get(user, 0) + 1
            return result | {"sessions": self.sessions[user]}

    def logout(self, user: str) -> dict[str, Any]:
        with self.lock:
            if user not in self.sessions and not self._mounted(self.session_root(user)):
                # Its login was refused (an unknown user, another user's session): there
                # is no session here to end.
                return {"user": user, "ended": False, "saved": None}
            left = self.sessions.get(user, 1) - 1
            if left > 0:
                self.sessions[user] = left
                return {"user": user, "ended": False, "saved": None, "sessions": left}
            self.sessions.pop(user, None)
            return super().logout(user)

    def run(self) -> None:
        self.warm()
        super().run()

    def warm(self) -> None:
        """Import what logins and live changes use, open the database, and take up the
        sessions this host has mounted (an agent restarted mid-session): under emulation
        the imports alone took 4 s of the first login."""
        from lamina.agent import fetch, local_versions  # noqa: F401
        from lamina.layer import attach, materialize, roots, writable  # noqa: F401
        from lamina.manager.services import access  # noqa: F401

        for m in roots.mounts(self.home, self.records):
            if m.layers and Path(m.root).parent == self.root:
                [base] = self.records.versions([m.layers[-1]])
                prepare.provide(base.manifest_id, self.system)
                self.sessions.setdefault(Path(m.root).name, 1)

    def reconcile(self, desired: dict[str, Any]) -> list[str]:
        # Under the lock: a login's answer from the manager wakes the long-poll while the
        # login is still fetching, and both would record the base.
        with self.lock:
            for s in desired.get("sessions", []):
                if s["layers"]:
                    self._provide_base(s["layers"][-1])
            return super().reconcile(desired)

    # -- the hooks ------------------------------------------------------------------------------

    def fetch_layers(self, layers: list[dict[str, Any]]) -> None:
        """The app layers are fetched; the base (the last layer) is this running system."""
        if not layers:
            return
        *apps, base = layers
        super().fetch_layers(apps)
        self._provide_base(base)

    def _provide_base(self, base: dict[str, Any]) -> None:
        """The base layer's version, recorded here without its data: this system is it."""
        from lamina.agent import local_versions

        manifest_id = bytes.fromhex(base["manifest"])
        if prepare.provided(manifest_id) is not None:
            return
        with self.home.session() as session:
            local_versions.record(
                session,
                name=base["name"],
                kind="app",
                version=int(base["version"]),
                manifest=base["manifest"],
                files=0,
                size=0,
            )
        prepare.provide(manifest_id, self.system)
        if self.info.base is not None and base["name"] != self.info.base:
            logs.event(
                self.log,
                "base differs",
                base=base["ref"],
                system=self.info.base,
                note="the running system stands in for it",
            )

    def composed(self, user: str, root: Path) -> None:
        self.presenter.show(user, root)

    def leaving(self, user: str, root: Path) -> None:
        self.presenter.hide(user)
        if overlay.mounted_at(root) is not None:
            # Processes started from the session (a systemd --user, a daemon the user
            # launched) keep the detached overlay until they exit; roots.umount then
            # keeps the writable layer from the upper directory.
            for sub in overlay.submounts(root):
                with contextlib.suppress(OSError):
                    mountapi.umount(Path(sub.mountpoint), lazy=True)
            try:
                mountapi.umount(root, lazy=True)
            except OSError as exc:
                raise LaminaError(f"cannot detach {root}: {exc.strerror}") from None
