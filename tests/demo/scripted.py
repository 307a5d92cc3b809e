"""A demo VM driven from its serial console: the init sources a script from a third disk
(label ``lmscript``) with the root file system mounted at /mnt/root; the test reads the
lines the script prints and answers on the console (the script's ``read``)."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from pathlib import Path

from lamina.demo.initramfs import SCRIPT_LABEL
from lamina.demo.vm import QemuChild, qemu_command
from lamina.identity import build_seed_iso

STEP = "lamina-step "


class ScriptedVm(QemuChild[bytes]):
    """Killed, and its console pipe closed, when the ``with`` block ends (``QemuChild``)."""

    def __init__(
        self,
        disk: str,
        seed: str,
        script: str,
        work: Path,
        *,
        reconnect_delay: int | None = None,
    ) -> None:
        iso = work / "script.iso"
        image = build_seed_iso({"run.sh": script.encode()}, label=SCRIPT_LABEL)
        iso.write_bytes(image.ljust(1 << 20, b"\0"))
        self.command = qemu_command(disk, seed, reconnect_delay=reconnect_delay, extra=(iso,))
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._errors = work / "qemu.err"

    def start(self) -> ScriptedVm:
        with open(self._errors, "wb") as errors:
            self._proc = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors
            )
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        # (the pipe is closed when the block ends, maybe before this thread saw its end)
        with contextlib.suppress(ValueError):
            for raw in self._proc.stdout:
                with self._seen:
                    self.lines.append(raw.decode(errors="replace").rstrip("\r\n"))
                    self._seen.notify_all()

    def expect(self, prefix: str, timeout: float = 120) -> str:
        """The rest of the first line starting with ``prefix`` (waits for it)."""
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line[len(prefix) :]
                left = deadline - time.monotonic()
                if left <= 0 or (self._proc is not None and self._proc.poll() is not None):
                    tail = " | ".join(self.lines[-8:])
                    raise AssertionError(f"no {prefix!r} line from the VM: {tail}")
                self._seen.wait(min(left, 0.5))

    def step(self, name: str, timeout: float = 120) -> str:
        return self.expect(f"{STEP}{name}", timeout).strip()

    def send(self, line: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(line.encode() + b"\n")
        self._proc.stdin.flush()

    def wait(self, timeout: float = 120) -> int:
        """qemu's exit status once the VM powered off."""
        assert self._proc is not None
        code = self._proc.wait(timeout)
        if code != 0:
            raise AssertionError(f"qemu exited {code}: {self._errors.read_text().strip()}")
        return code
