"""Running a program inside a root directory, as its package scripts expect: ``/proc``,
``/sys``, ``/dev`` and a scratch ``/run``, mounted in a private mount namespace that goes
away with the program (nothing is left mounted on the host, even after a crash)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from lamina.errors import ToolError

# $1 is the root, the rest the command. A private namespace: these mounts never reach the
# host's, and vanish with the last process.
_SETUP = """set -e
root=$1; shift
mount --make-rprivate /
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
exec chroot "$root" "$@"
"""
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run(root: Path, command: Sequence[str], what: str) -> str:
    """Run ``command`` chrooted into ``root``; its output, or a ToolError with its last
    line of error output."""
    if shutil.which("unshare") is None:
        raise ToolError("unshare is not installed (Debian package util-linux)")
    for sub in ("proc", "sys", "dev", "run"):
        (root / sub).mkdir(exist_ok=True)
    env = {
        "PATH": PATH,
        "HOME": "/root",
        "LC_ALL": "C",
        "DEBIAN_FRONTEND": "noninteractive",
        "TERM": os.environ.get("TERM", "dumb"),
    }
    cmd = ["unshare", "--mount", "--fork", "sh", "-c", _SETUP, "sh", str(root), *command]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise ToolError(f"{what}: {lines[-1] if lines else f'exit status {proc.returncode}'}")
    return proc.stdout
