"""The demo image, built once and kept between runs.

The cache lives in ``$LAMINA_TEST_CACHE`` (default ``/var/tmp/lamina-test-cache``), not in
a test's home, so only the first run pays for the build (10-30 s and 33 MB of Debian
packages); later runs reuse it. Delete the folder to force a rebuild.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lamina.demo.image import DemoImage, demo_image
from tests.servers import free_port, wait_port


def cache_root() -> Path:
    return Path(os.environ.get("LAMINA_TEST_CACHE") or "/var/tmp/lamina-test-cache")


@pytest.fixture(scope="session")
def demo() -> DemoImage:
    return demo_image(cache_root() / "demo")


@pytest.fixture
def disk_copy(demo: DemoImage, tmp_path: Path) -> Callable[[str], Path]:
    """A machine's own writable copy of the demo image (sparse, like a fresh delta)."""

    def copy(name: str) -> Path:
        path = tmp_path / f"{name}.img"
        subprocess.run(["cp", "--sparse=always", str(demo.path), str(path)], check=True)
        return path

    return copy


@pytest.fixture
def qemu_nbd() -> Iterator[Callable[..., str]]:
    """Serve files with qemu-nbd on 127.0.0.1; returns nbd:// URLs; stops every server."""
    procs: list[subprocess.Popen[bytes]] = []

    def serve(path: Path, export: str, *, read_only: bool = False) -> str:
        port = free_port()
        args = ["qemu-nbd", "-f", "raw", "-x", export, "-b", "127.0.0.1", "-p", str(port)]
        args += ["--persistent", *(["-r"] if read_only else []), str(path)]
        procs.append(subprocess.Popen(args, stderr=subprocess.PIPE))
        wait_port(port, procs[-1], timeout=10)
        return f"nbd://127.0.0.1:{port}/{export}"

    try:
        yield serve
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
