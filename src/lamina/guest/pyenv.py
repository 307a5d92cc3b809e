"""The agent's Python packages for a guest: lamina and its dependencies, for the guest's
own Python, installed at build time (a machine has no package index at boot).

The dependencies come from the package index through pip (``pip install --target``), as
wheels for the guest's Python version; when it is this Python's version, they are pinned
to the versions installed here, so a machine runs the agent with what lamina was tested
with. They are cached per (version, pins), so the next build copies them. Lamina itself
is copied from the code running the build (pure Python; no wheel needed).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from lamina.errors import ToolError

Log = Callable[[str], None]
# The guest's glibc is at least Debian 12's (2.36); wheels of any older manylinux fit.
PLATFORMS = ("manylinux_2_36_x86_64", "manylinux_2_28_x86_64", "manylinux2014_x86_64")


def guest_python(root: Path) -> str:
    """The guest's Python version ("3.11"), from its ``/usr/bin/python3`` link."""
    link = root / "usr" / "bin" / "python3"
    try:
        target = os.readlink(link)
    except OSError:
        raise ToolError(f"{root} has no usr/bin/python3: install python3 in it") from None
    found = re.fullmatch(r"python(3\.\d+)", Path(target).name)
    if found is None:
        raise ToolError(f"{link} points at {target!r}: cannot tell the Python version")
    return found[1]


def requirements() -> list[str]:
    """Lamina's own requirements (no extras)."""
    return [r for r in importlib.metadata.requires("lamina") or [] if "extra ==" not in r]


def pins() -> list[str]:
    """``name==version`` of every distribution installed here but lamina."""
    found = set()
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() != "lamina":
            found.add(f"{name}=={dist.version}")
    return sorted(found)


def here() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def dependencies(version: str, cache: Path, log: Log) -> Path:
    """A directory of site-packages with lamina's dependencies for Python ``version``."""
    constraints = pins() if version == here() else []
    wanted = requirements()
    key = hashlib.sha256("\n".join([version, *wanted, *constraints]).encode()).hexdigest()
    dest = cache / f"py{version}-{key[:16]}"
    if (dest / ".complete").exists():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    work = cache / f".tmp-{uuid.uuid4().hex[:8]}"
    try:
        work.mkdir()
        (work / "constraints.txt").write_text("".join(f"{c}\n" for c in constraints))
        log(f"installing the agent's Python packages for Python {version} (pip)")
        _pip(work / "site", work / "constraints.txt", wanted, version)
        shutil.rmtree(work / "site" / "bin", ignore_errors=True)  # scripts for this host
        (work / "site" / ".complete").touch()
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(work / "site", dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _pip(target: Path, constraints: Path, wanted: list[str], version: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    cmd += ["--no-compile", "--target", str(target), "-c", str(constraints)]
    if version != here():
        # wheels only, for the guest's interpreter and platform
        cmd += ["--only-binary=:all:", "--python-version", version, "--implementation", "cp"]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
    proc = subprocess.run([*cmd, *wanted], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
        detail = (lines or proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise ToolError(f"pip could not install the agent's packages: {detail}")


def lamina_source() -> Path:
    """The ``lamina`` package directory of the running code."""
    import lamina

    return Path(lamina.__file__).parent


def install(site: Path, version: str, cache: Path, log: Log) -> None:
    """Fill ``site`` (the guest's site-packages directory) with lamina and its
    dependencies."""
    deps = dependencies(version, cache, log)
    site.mkdir(parents=True, exist_ok=True)
    shutil.copytree(deps, site, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".complete"))
    shutil.rmtree(site / "lamina", ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(lamina_source(), site / "lamina", ignore=ignore)
    from lamina import __version__

    info = site / f"lamina-{__version__}.dist-info"
    info.mkdir(exist_ok=True)
    requires = "".join(f"Requires-Dist: {r}\n" for r in requirements())
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: lamina\nVersion: {__version__}\n{requires}"
    )
    (info / "INSTALLER").write_text("lamina guest kit\n")
