"""Agent test helpers: agent processes on their own homes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import LAMINA


class AgentProc:
    """A real ``lamina agent`` process with its own home (the machine's cache)."""

    def __init__(self, base: Path, manager: str, token: str, *args: str) -> None:
        """``args``: more options of ``lamina agent``."""
        self.home = base / "home"
        self.root = self.home / "sessions"  # the default: started without --root
        self.etc = base / "etc"
        self.log = base / "agent.log"
        self.manager, self.token, self.args = manager, token, args
        base.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return {**os.environ, "LAMINA_HOME": str(self.home)}

    def start(self) -> AgentProc:
        cmd = [LAMINA, "agent", "--manager", self.manager, "--token", self.token]
        cmd += ["--etc", str(self.etc), *self.args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=log)
        sock = self.home / "run" / "agent.sock"
        deadline = time.monotonic() + 30
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"agent did not start: {self.log.read_text()}")
            time.sleep(0.05)
        return self

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [LAMINA, "agent", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"lamina agent {' '.join(args)}: {proc.stderr}\n{self.logs()}")
        return proc

    def logs(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
