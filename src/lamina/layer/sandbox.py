"""The capture sandbox: ``python -m lamina.layer.sandbox CONFIG.json``.

Runs a command chrooted into an overlay of the given layers, in its own mount and PID
namespaces, so the host sees none of its mounts and nothing it starts outlives it (when
the command, PID 1 of its namespace, exits, the kernel ends the rest; when the last
process of the mount namespace is gone, the overlay goes with it).

Inside, where the composed tree has the directory: ``/proc`` is a fresh proc, ``/sys`` a
read-only sysfs, ``/dev`` a tmpfs with the host's null, zero, full, random, urandom and
tty bound in, its own ``/dev/pts`` (apt logs through a pseudo-terminal) and ``/dev/shm``;
``/tmp``, ``/run``, ``/var/tmp`` are tmpfs, so scratch files never end up in the captured
layer. Network access is the host's (an installer downloads), with the host's resolver
configuration bound over the tree's ``/etc/resolv.conf``, and the UTS namespace is the
command's own with a neutral hostname (``lamina-capture``), so nothing of the packaging
host leaks into what an installer writes.

Kept to the standard library, ``mountapi`` and ``overlay``: it runs as a fresh process
between ``unshare`` and ``exec``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from lamina.layer import mountapi
from lamina.layer.mountapi import Param
from lamina.layer.overlay import OPTIONS

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
SCRATCH = ("tmp", "run", "var/tmp")
HOSTNAME = "lamina-capture"
RESOLV_CONF = "/etc/resolv.conf"
NOSUID_NODEV_NOEXEC = mountapi.MS_NOSUID | mountapi.MS_NODEV | mountapi.MS_NOEXEC
CLONE_NEWUTS = 0x04000000
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _inside(root: Path) -> None:
    """Mount what the command needs under ``root`` (in the new namespaces)."""
    if (root / "proc").is_dir():
        mountapi.mount("proc", root / "proc", "proc", mountapi.MS_NOSUID | mountapi.MS_NODEV)
    dev = root / "dev"
    if dev.is_dir():
        mountapi.mount("tmpfs", dev, "tmpfs", mountapi.MS_NOSUID, "mode=0755")
        for name in DEVICES:
            if Path("/dev", name).exists():
                (dev / name).touch()
                mountapi.mount(f"/dev/{name}", dev / name, None, mountapi.MS_BIND)
        _pts_and_shm(dev)
    if (root / "sys").is_dir():
        flags = mountapi.MS_RDONLY | NOSUID_NODEV_NOEXEC
        mountapi.mount("sysfs", root / "sys", "sysfs", flags)
    for scratch in SCRATCH:
        if (root / scratch).is_dir() and not (root / scratch).is_symlink():
            mountapi.mount("tmpfs", root / scratch, "tmpfs", mountapi.MS_NOSUID | mountapi.MS_NODEV)
    _resolver(root)


def _pts_and_shm(dev: Path) -> None:
    (dev / "pts").mkdir()
    mountapi.mount(
        "devpts",
        dev / "pts",
        "devpts",
        mountapi.MS_NOSUID | mountapi.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )
    (dev / "ptmx").symlink_to("pts/ptmx")
    (dev / "shm").mkdir()
    mountapi.mount(
        "tmpfs", dev / "shm", "tmpfs", mountapi.MS_NOSUID | mountapi.MS_NODEV, "mode=1777"
    )
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "fd/0"),
        ("stdout", "fd/1"),
        ("stderr", "fd/2"),
    ):
        (dev / name).symlink_to(target)


def _resolver(root: Path) -> None:
    """Bind the host's resolv.conf over the tree's. A tree whose resolv.conf is a link into
    a scratch directory (systemd-resolved's /run/...) gets the link's target made there;
    a tree without one is left without (creating it would end up in the layer)."""
    host = Path(RESOLV_CONF).resolve()
    if not host.is_file():
        return
    target = root / RESOLV_CONF.lstrip("/")
    if target.is_symlink():
        link = os.readlink(target)
        inside = Path(link if link.startswith("/") else f"/etc/{link}")
        resolved = Path(os.path.normpath(inside))
        if not any(resolved.is_relative_to(f"/{s}") for s in SCRATCH):
            return
        target = root / str(resolved).lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    elif not target.is_file():
        return
    mountapi.mount(str(host), target, None, mountapi.MS_BIND)


def _child(config: dict[str, object]) -> None:
    root = Path(str(config["root"]))
    lowers = [str(p) for p in config["lowers"]]  # type: ignore[attr-defined]
    params = [Param("lowerdir+", p) for p in lowers]
    params += [Param("upperdir", str(config["upper"])), Param("workdir", str(config["work"]))]
    fd = mountapi.new_mount("overlay", [*params, *OPTIONS])
    mountapi.move_mount(fd, root)
    os.close(fd)
    _inside(root)
    os.chroot(root)
    os.chdir("/")
    command = [str(c) for c in config["command"]]  # type: ignore[attr-defined]
    env = {"PATH": PATH, "HOME": "/root", "TERM": os.environ.get("TERM", "dumb"), "LANG": "C"}
    os.execvpe(command[0], command, env)


def main(argv: list[str]) -> int:
    config = json.loads(Path(argv[1]).read_text())
    mountapi.unshare(mountapi.CLONE_NEWNS | mountapi.CLONE_NEWPID | CLONE_NEWUTS)
    socket.sethostname(HOSTNAME)
    mountapi.mount("none", Path("/"), None, mountapi.MS_REC | mountapi.MS_PRIVATE)
    pid = os.fork()
    if pid == 0:
        try:
            _child(config)
        except OSError as exc:
            sys.stderr.write(f"lamina: capture: {exc}\n")
            os._exit(127)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
