"""A real `lamina serve` process, on free loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lamina.demo.showcase import free_port as demo_free_port
from tests.conftest import LAMINA


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range, as the demo picks its
    own: a server restarted on it cannot find it taken meanwhile as some outgoing
    connection's source port."""
    return demo_free_port(0)


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def wait_for(check: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``check()`` holds (AssertionError past ``timeout``)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - started


class Server:
    def __init__(
        self,
        home: Path,
        log: Path,
        *,
        nbd: bool = True,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        """``nbd=False``: a manager only (``--no-nbd``), as extra managers of a home run;
        ``args``: more options of ``lamina serve`` (``--tls``); ``env``: more settings
        (``LAMINA_...``)."""
        self.home = home
        self.env = env or {}
        self.log = log
        self.nbd = nbd
        self.args = args
        self.port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, export: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{export}"

    @property
    def http_url(self) -> str:
        """The manager's base URL."""
        scheme = "https" if "--tls" in self.args else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        env = {**os.environ, "LAMINA_HOME": str(self.home), **self.env}
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    LAMINA,
                    "serve",
                    *(["--nbd", f"127.0.0.1:{self.port}"] if self.nbd else ["--no-nbd"]),
                    "--http",
                    f"127.0.0.1:{self.http_port}",
                    *self.args,
                ],
                env=env,
                stdout=log,
                stderr=log,
            )
        if self.nbd:
            wait_port(self.port, self.proc)
        wait_port(self.http_port, self.proc)
        self._wait_serving(offset)
        # Even after it logs so, its first answer took 10 s on a loaded host: wait for one,
        # whatever its status, so tests' short timeouts hold.
        import httpx

        httpx.get(f"{self.http_url}/api/v1/", timeout=120, verify=False)

    def _wait_serving(self, offset: int, timeout: float = 90) -> None:
        """Until the server logs that it serves: its ports listen from the start, but
        requests wait in the backlog while its workers start (seconds on a loaded host)."""
        proc = self.proc
        assert proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log, "rb") as f:
                f.seek(offset)
                if b'"event": "serving"' in f.read():
                    return
            if proc.poll() is not None:
                raise AssertionError(f"lamina serve exited with {proc.returncode}")
            time.sleep(0.05)
        raise AssertionError(f"lamina serve did not start within {timeout} s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines()


@contextmanager
def member_servers(
    homes: tuple[Path, Path], tmp_path: Path, *args: str
) -> Iterator[tuple[Server, Server]]:
    """Block servers ``a`` and ``b`` of one cluster on ``homes`` (not started; stopped at
    the end), one worker each, heart-beating every 0.3 s."""
    a, b = (
        Server(
            home,
            tmp_path / f"serve-{name}.log",
            args=(*args, "--server-name", name, "--heartbeat", "0.3", "--workers", "1"),
        )
        for home, name in zip(homes, ("a", "b"), strict=True)
    )
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()
