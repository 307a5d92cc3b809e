"""Stream endpoints as real processes (`lamina stream`), a test image, NBD client helpers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LAMINA, Cli, write_sparse
from tests.nbdtools import qemu_io
from tests.servers import Server, free_port, wait_port

MiB = 1 << 20
CHUNK = 256 << 10
PATTERN_AT = 3 * MiB  # 64 KiB of 0xA5 there, for qemu-io's pattern check


def make_image(path: Path) -> Path:
    """8 MiB: random data, a run of zeros, one chunk stored twice, a pattern region."""
    twice = os.urandom(CHUNK)
    return write_sparse(
        path,
        8 * MiB,
        [
            (0, os.urandom(2 * MiB)),
            (PATTERN_AT - CHUNK, os.urandom(CHUNK)),
            (PATTERN_AT, b"\xa5" * (64 << 10) + os.urandom(CHUNK - (64 << 10))),
            (5 * MiB, twice),
            (6 * MiB, twice),
            (7 * MiB, os.urandom(MiB - 4096)),
        ],
    )


@pytest.fixture
def image(cli: Cli, tmp_path: Path) -> Path:
    path = make_image(tmp_path / "img.raw")
    cli("image", "import", "img", str(path))
    return path


@pytest.fixture
def admin(cli: Cli) -> str:
    return cli("admin", "token").out.strip()


@dataclass
class Endpoint:
    args: list[str]
    cache: Path
    home: Path
    log: Path
    export: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/{self.export}"

    def start(self, *, wait: bool = True) -> Endpoint:
        env = {**os.environ, "LAMINA_HOME": str(self.home)}
        cmd = [LAMINA, "stream", *self.args, "--cache", str(self.cache)]
        cmd += ["--nbd", f"127.0.0.1:{self.port}"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        if wait:
            wait_port(self.port, self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def status(self) -> dict[str, Any]:
        out = subprocess.run(
            [LAMINA, "stream", "status", "--cache", str(self.cache), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        data: dict[str, Any] = json.loads(out)
        return data

    def wait_complete(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status["complete"]:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"not hydrated within {timeout} s: {status}")
            time.sleep(0.1)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out


@pytest.fixture
def stream(cli: Cli, tmp_path: Path) -> Iterator[Callable[..., Endpoint]]:
    """Start ``lamina stream ARGS...`` endpoints; every one is stopped afterwards."""
    started: list[Endpoint] = []

    def start(*args: str, cache: str = "cache", export: str | None = None) -> Endpoint:
        ep = Endpoint(
            list(args),
            tmp_path / cache,
            cli.home,
            tmp_path / f"{cache}.log",
            export or args[0],
        )
        started.append(ep)
        return ep.start()

    yield start
    for ep in started:
        ep.stop(signal.SIGKILL)


def convert(url: str, dest: Path, timeout: float = 60) -> Path:
    """The whole export through qemu-img (a real NBD client)."""
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(dest)],
        check=True,
        timeout=timeout,
        capture_output=True,
    )
    return dest


def read_range(port: int, export: str, offset: int, length: int, dest: Path) -> bytes:
    """``length`` bytes at ``offset`` through qemu-img (raw driver's offset/size)."""
    opts = (
        f"driver=raw,offset={offset},size={length},file.driver=nbd,"
        f"file.host=127.0.0.1,file.port={port},file.export={export}"
    )
    subprocess.run(
        ["qemu-img", "convert", "--image-opts", opts, "-O", "raw", str(dest)],
        check=True,
        timeout=60,
        capture_output=True,
    )
    return dest.read_bytes()


__all__ = ["Endpoint", "Server", "convert", "qemu_io", "read_range"]
