"""Helpers shared by the benchmarks: scratch space, timing, the lamina CLI."""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

LAMINA = str(Path(sys.executable).with_name("lamina"))
MiB = 1 << 20


def scratch(name: str) -> Path:
    """A fresh scratch folder on the same filesystem as the repository's parent."""
    base = Path(os.environ.get("LAMINA_BENCH_DIR", tempfile.gettempdir())) / f"lamina-bench-{name}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    return base


def run(*cmd: str, env: dict[str, str] | None = None, quiet: bool = True) -> str:
    proc = subprocess.run(
        list(cmd), env={**os.environ, **(env or {})}, capture_output=quiet, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout or ""


def timed(prepare: Callable[[], None], action: Callable[[], None]) -> float:
    """Seconds for ``action`` after ``prepare`` (not timed) and a sync of dirty pages."""
    prepare()
    os.sync()
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values)


def du(path: Path) -> int:
    """Apparent bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)} (run `make install`)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until something listens on ``port`` (30 s at most; ``proc`` must stay alive)."""
    for _ in range(600):
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"process on port {port} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")
