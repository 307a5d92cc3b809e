"""Running the host tools the demo image is built with; failures become ToolErrors."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from lamina.errors import ToolError

# Debian package of each tool, for the error message.
PACKAGES = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "mkfs.ext4": "e2fsprogs",
    "extlinux": "extlinux",
    "losetup": "mount",
    "mount": "mount",
    "umount": "mount",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-nbd": "qemu-utils",
}


def which(tool: str) -> str:
    exe = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if exe is None:
        package = PACKAGES.get(tool, tool)
        raise ToolError(f"{tool} is not installed (Debian package {package}; `make install`)")
    return exe


def run(args: list[str], what: str, *, cwd: Path | None = None) -> str:
    """Run a tool; its last line of stderr becomes the error message on failure."""
    env = {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
    try:
        proc = subprocess.run(
            [which(args[0]), *args[1:]],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env,
            check=False,
        )
    except OSError as e:
        raise ToolError(f"{what}: {e}") from None
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise ToolError(f"{what}: {detail}")
    return proc.stdout


def _apt_options() -> list[str]:
    # As root apt hands downloads to the _apt user, which cannot write to our work dir.
    return ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []


def kernel_package(meta: str) -> str:
    """The versioned kernel package a metapackage (linux-image-cloud-amd64) points to."""
    for attempt in range(2):
        try:
            out = run(["apt-cache", "depends", meta], f"looking up {meta}")
        except ToolError:
            if attempt or os.geteuid() != 0:
                raise
            run(["apt-get", *_apt_options(), "update", "-q"], "apt-get update")
            continue
        for line in out.splitlines():
            kind, _, package = line.strip().partition(": ")
            if kind == "Depends" and package.startswith("linux-image-"):
                return package
        break
    raise ToolError(f"{meta} depends on no linux-image package")


def download(packages: list[str], dest: Path) -> list[Path]:
    """``apt-get download`` the packages into ``dest``; the .deb files, in order."""
    run(["apt-get", *_apt_options(), "download", "-q", *packages], "apt-get download", cwd=dest)
    debs = []
    for package in packages:
        found = sorted(dest.glob(f"{package}_*.deb"))
        if not found:
            raise ToolError(f"apt-get download left no {package}_*.deb in {dest}")
        debs.append(found[-1])
    return debs


def deb_version(deb: Path) -> str:
    return run(["dpkg-deb", "-f", str(deb), "Version"], f"reading {deb.name}").strip()


def extract(deb: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", str(deb), str(dest)], f"extracting {deb.name}")
    return dest


def library_packages(package: str) -> list[str]:
    """``package`` and the library packages it depends on, recursively (``lib*`` only: a
    program's run-time libraries, not its maintainer scripts' tools such as debconf).
    One ``apt-cache`` call lists the whole graph; the walk keeps to libraries."""
    out = run(
        ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
         "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", package],
        f"looking up what {package} depends on",
    )  # fmt: skip
    graph: dict[str, list[str]] = {}
    current = ""
    for line in out.splitlines():
        if not line.startswith(" "):
            current = line.strip()
            graph.setdefault(current, [])
            continue
        kind, _, dep = line.strip().lstrip("|").partition(": ")
        if kind in ("Depends", "PreDepends"):
            graph[current].append(dep.strip("<>"))
    wanted, todo = [package], [package]
    while todo:
        for dep in graph.get(todo.pop(0), []):
            if dep.startswith("lib") and dep not in wanted:
                wanted.append(dep)
                todo.append(dep)
    return wanted
