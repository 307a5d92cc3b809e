"""A Debian root file system from Debian's packages, with mmdebstrap.

The packages come from the apt sources this host is configured with (its mirror, its
updates and security suites for the wanted release), so a build needs no other network.
Downloaded packages are kept in a cache directory and handed to the next build
(mmdebstrap's ``sync-in``/``sync-out`` hooks): apt downloads only what changed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from lamina.errors import ToolError, UsageError

Log = Callable[[str], None]
APT_DIR = Path("/etc/apt")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# What a lamina machine needs beyond a minimal Debian: a kernel and an initramfs that
# boot it from a virtio disk (or NBD), systemd, cloud-init with its network renderer
# (ifupdown + dhclient), sshd, the locale cloud-init sets, busybox for the initramfs
# scripts, Python for the agent, erofs-utils for the agent's layer images, sudo for the
# first user; nbd-client, whose initramfs hook roots a machine booted from the network
# (``nbdroot=``) and brings the kernel's nbd module along.
PACKAGES = (
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "busybox",
    "systemd-sysv",
    "udev",
    "dbus",
    "libpam-systemd",
    "libnss-myhostname",
    "openssh-server",
    "cloud-init",
    "ifupdown",
    "isc-dhcp-client",
    "iproute2",
    "netbase",
    "locales",
    "sudo",
    "python3",
    "erofs-utils",
    "e2fsprogs",
    "kmod",
    "procps",
    "nbd-client",
)
SUITES = ("bookworm", "trixie", "bullseye")
_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")


def check_packages(names: Iterable[str]) -> list[str]:
    """Package names as Debian allows them; a bad one is refused with its name."""
    out = []
    for name in names:
        if not _NAME.fullmatch(name):
            raise UsageError(f"bad Debian package name {name!r}")
        out.append(name)
    return out


def check_suite(suite: str) -> str:
    if suite not in SUITES:
        raise UsageError(f"unknown Debian release {suite!r} (one of {', '.join(SUITES)})")
    return suite


# -- the host's apt sources -------------------------------------------------------------------


def _deb822(text: str) -> list[dict[str, str]]:
    stanzas, current = [], {}  # type: ignore[var-annotated]
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if current:
                stanzas.append(current)
            current = {}
        elif line.startswith("#"):
            continue
        elif line[0] in " \t" and current:
            key = list(current)[-1]
            current[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            current[key.strip().lower()] = value.strip()
    return stanzas


def _one_line(text: str) -> list[dict[str, str]]:
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        match = re.match(r"^(deb)\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s*(.*)$", line)
        if match:
            options = dict(
                o.split("=", 1) for o in (match[2] or "").strip("[] \t").split() if "=" in o
            )
            out.append(
                {
                    "types": "deb",
                    "uris": match[3],
                    "suites": match[4],
                    "components": match[5],
                    "signed-by": options.get("signed-by", ""),
                }
            )
    return out


def host_sources(suite: str, apt_dir: Path = APT_DIR) -> list[str]:
    """``deb`` lines for ``suite`` and its -updates/-security from this host's apt sources."""
    entries: list[dict[str, str]] = []
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            entries += _deb822(text)
        elif path.name == "sources.list" or path.suffix == ".list":
            entries += _one_line(text)
    lines = []
    for e in entries:
        if e.get("enabled", "yes").lower() == "no" or "deb" not in e.get("types", "").split():
            continue
        signed = e.get("signed-by", "")
        option = f"[signed-by={signed}] " if signed.startswith("/") else ""
        for uri in e.get("uris", "").split():
            for s in e.get("suites", "").split():
                if s == suite or s.startswith(f"{suite}-"):
                    lines.append(f"deb {option}{uri} {s} {e.get('components', 'main')}")
    return list(dict.fromkeys(lines))


def sources(suite: str) -> list[str]:
    """The host's sources for ``suite``, or Debian's own mirror when it has none."""
    return host_sources(suite) or [
        f"deb {DEFAULT_MIRROR} {suite} main",
        f"deb {DEFAULT_MIRROR} {suite}-updates main",
        f"deb {DEFAULT_MIRROR}-security {suite}-security main",
    ]


# -- mmdebstrap -------------------------------------------------------------------------------


def bootstrap(
    root: Path, suite: str, packages: Sequence[str], mirrors: Sequence[str], debs: Path, log: Log
) -> None:
    """A Debian ``suite`` root with ``packages`` at ``root``: a directory (which must not
    exist) or a ``.tar`` file."""
    exe = shutil.which("mmdebstrap")
    if exe is None:
        raise ToolError("mmdebstrap is not installed (Debian package mmdebstrap)")
    if os.geteuid() != 0:
        raise ToolError("building an image needs root (mmdebstrap, loop devices, chroot)")
    debs.mkdir(parents=True, exist_ok=True)
    cmd = [
        exe,
        "--mode=root",
        "--variant=minbase",
        f"--include={','.join(packages)}",
        '--aptopt=Acquire::Retries "3"',
        # the package cache lives outside the root, handed in and taken back
        "--skip=download/empty",
        "--skip=essential/unlink",
        '--setup-hook=mkdir -p "$1"/var/cache/apt/archives/',
        f"--setup-hook=sync-in {debs} /var/cache/apt/archives/",
        f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
        suite,
        str(root),
        *mirrors,
    ]
    env = {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stderr is not None
    tail: list[str] = []
    for raw in proc.stderr:
        line = raw.rstrip()
        tail = [*tail[-20:], line]
        if line.startswith("I: ") and not line.startswith("I: running"):
            log(f"mmdebstrap: {line[3:]}")
    if proc.wait() != 0:
        errors = [t for t in tail if t.startswith("E: ")] or tail or ["no output"]
        raise ToolError(f"mmdebstrap failed: {errors[-1]}")


def extract(tarball: Path, root: Path) -> None:
    """Unpack a root made as a tar file (owners, modes, xattrs as they were)."""
    root.mkdir(parents=True)
    cmd = ["tar", "--extract", "--file", str(tarball), "--directory", str(root)]
    cmd += ["--preserve-permissions", "--numeric-owner", "--xattrs", "--xattrs-include=*"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise ToolError(f"unpacking {tarball.name}: {lines[-1]}")


def kernel_version(root: Path) -> str:
    """The version of the kernel in ``root``'s /boot (the newest)."""
    kernels = sorted(p.name.removeprefix("vmlinuz-") for p in (root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ToolError(f"{root}/boot has no kernel")
    return kernels[-1]
